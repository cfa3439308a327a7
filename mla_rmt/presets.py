"""The default config and the model-size presets that config files build on.

Every field a module reads is declared here, so `--config.a.b=value` overrides are
type-checked by ml_collections and a typo fails at the command line.
"""
import ml_collections

from mla_rmt.model_config import ModelConfig

MODEL_PRESETS = {
    # Trains in minutes on 2 CPU cores on the embedded corpus.
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, d_head=32, mlp_dim=384, vocab_size=2048),
    # LLaMA-130M of the MLA paper: 12 layers, d_model 768, 12 heads of 64, SwiGLU 2048.
    "llama_130m": dict(num_layers=12, d_model=768, num_heads=12, d_head=64, mlp_dim=2048,
                       vocab_size=32000),
}


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (the tiny preset on the embedded corpus)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.preset = "tiny"             # the MODEL_PRESETS entry the sizes came from
    ModelConfig.default_config(m)  # every model field, declared in ModelConfig

    c.data = d = ml_collections.ConfigDict()
    d.source = "embedded"         # "embedded" | "text_files" | "tfds"
    d.corpora = "kjv"             # source=embedded: comma-separated corpora of mla_rmt/corpora.py
                                  # ("kjv", "sotu", "bbc"), e.g. "sotu,bbc,kjv"
    d.tfds_name = ""              # source=tfds: e.g. "c4/en:3.1.0"
    d.data_dir = ""               # source=tfds: TFDS data_dir (local or gs://); else the cache dir
    d.text_glob = ""              # source=text_files: a local glob of UTF-8 text files
    d.train_split = "train"
    d.eval_split = "validation"
    d.text_key = "text"           # the feature holding the document text
    d.tokenizer_path = ""         # SentencePiece model; empty = train one on the corpus and cache
    d.seq_len = 128
    d.global_batch_size = 32
    d.shuffle_seed = 0
    d.num_shards = 0              # document shards, each filling fixed rows of every batch
                                  # (0 = one per process; fix it to make batches independent
                                  # of the process count)
    d.worker_count = 0            # grain worker processes (0 = in the main process)
    d.max_epochs = 0.0            # > 0: refuse a run whose train.num_steps would read more than
                                  # this many passes over any shard of the train split (0 = no limit)

    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 3e-3
    o.warmup_steps = 50
    o.min_lr_ratio = 0.1          # cosine decays to min_lr_ratio * learning_rate
    o.weight_decay = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.clip_norm = 1.0             # global-norm clipping (0 = off)

    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 600
    t.log_every = 25
    t.eval_every = 100
    t.eval_batches = 8
    t.checkpoint_every = 100
    t.keep_checkpoints = 3
    t.preemption_check_every = 10  # multi-process: steps between agreeing on a SIGTERM (a
                                   # small all-gather); the stop waits for the next such step
    t.peak_flops_per_device = 0.0  # for perf/mfu; 0 = look up the device kind (none on CPU)
    t.microbatch_size = 0         # rows per gradient-accumulation microbatch (0 = the whole batch)
    t.loss_chunk_tokens = 8192    # LM head + loss over sequence chunks of at most this many
                                  # tokens, never the whole batch's fp32 logits (0 = plain loss)
    t.loss_one_pass = True        # chunked loss: log-sum-exp in one read of the logits (a third
                                  # less loss traffic, more arithmetic per logit: BENCHMARKS.md)

    c.diagnostics = g = ml_collections.ConfigDict()
    g.every = 0                   # weight spectra cadence in steps, inside the train step (0 = off)
    g.matrices = ""               # comma-separated matrices of the kind ("" or "default" = its gauge-invariant defaults)
    g.null = "product"            # null law: "product" (free product of Wisharts) or "mp"
    g.images_every = 0            # ESD and heatmap images cadence, a multiple of every (0 = every);
                                  # they render on a background thread that shares the host
    g.activations_every = 0       # activation probes cadence (0 = the same as every)
    g.probe_batch = 4             # sequences of the held-out probe batch

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1              # -1 = the devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def apply_model_preset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Sets the model sizes of a named preset; other fields keep their values."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"config.model.preset: unknown preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    config.model.preset = name
    config.model.update(MODEL_PRESETS[name])
    return config
