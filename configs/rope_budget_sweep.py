"""The RoPE-budget sweep: attention in {mha, mla_prerope, mla_decoupled} x rope_fraction in
{0.25, 0.5, 0.75}, plus NoPE (mha with rope_fraction 0).

Default: paper scale (LLaMA-130M, seq 256, global batch 512, 20k steps, C4 through TFDS).
`:tiny`: the same sweep shape on the tiny preset and the embedded corpus, minutes on a CPU.

    python -m mla_rmt.main --config=configs/rope_budget_sweep.py:tiny --workdir=runs/sweep
    python -m mla_rmt.main --config=configs/rope_budget_sweep.py --workdir=gs://BUCKET/sweep \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.data.tokenizer_path=gs://BUCKET/c4_sp32000.model --trial=3
"""
from mla_rmt import presets, sweep

KINDS = ("mha", "mla_prerope", "mla_decoupled")
ROPE_FRACTIONS = (0.25, 0.5, 0.75)


def get_config(arg: str = "paper"):
    config = presets.base_config()
    if arg == "tiny":
        presets.apply_model_preset(config, "tiny")
        config.data.seq_len = 128
        config.data.global_batch_size = 16
        config.optim.warmup_steps = 20
        config.train.num_steps = 150
        config.train.log_every = 25
        config.train.eval_every = 75
        config.train.eval_batches = 4
        config.train.checkpoint_every = 75
        config.diagnostics.every = 25
        return config
    if arg != "paper":
        raise ValueError(f"configs/rope_budget_sweep.py: unknown variant {arg!r}; use ':tiny' or none")
    presets.apply_model_preset(config, "llama_130m")
    config.model.attention.kv_latent_dim = 384        # compression ratio 2
    config.data.source = "tfds"
    config.data.tfds_name = "c4/en:3.1.0"
    config.data.seq_len = 256
    config.data.global_batch_size = 512
    config.data.worker_count = 8         # grain workers: BENCHMARKS.md, "Input pipeline"
    config.train.microbatch_size = 256      # 2 microbatches per step (bench/throughput.py)
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1000
    config.train.num_steps = 20000
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.eval_batches = 20
    config.train.checkpoint_every = 1000
    config.diagnostics.every = 250
    return config


def get_sweep(arg: str = "paper"):
    del arg  # the same trials at both scales
    return sweep.product({"model.attention.kind": list(KINDS),
                          "model.attention.rope_fraction": list(ROPE_FRACTIONS)}) + \
        [{"model.attention.kind": "mha", "model.attention.rope_fraction": 0.0}]
