"""The papers' comparison at reduced scale, for one GPU: LLaMA-130M on the embedded corpus.

Six trials with the same token budget: mha, mla_prerope and mla_decoupled at rope_fraction 0.5,
mla_decoupled at 0.25 and 0.75, and NoPE (mha, rope_fraction 0); diagnostics every 100 steps.
The vocabulary is 8192 pieces: the embedded corpus is too small for a 32000-piece tokenizer.

    python -m mla_rmt.main --config=configs/replication.py --workdir=runs/replication
    python -m mla_rmt.main --config=configs/replication.py:smoke --workdir=/tmp/rep  # CPU check
"""
from mla_rmt import presets

TRIALS = (("mha", 0.5), ("mla_prerope", 0.5), ("mla_decoupled", 0.5), ("mla_decoupled", 0.25),
          ("mla_decoupled", 0.75), ("mha", 0.0))


def get_config(arg: str = "gpu"):
    config = presets.base_config()
    presets.apply_model_preset(config, "tiny" if arg == "smoke" else "llama_130m")
    config.model.vocab_size = 2048 if arg == "smoke" else 8192
    config.model.attention.kv_latent_dim = config.model.d_model // 2     # compression ratio 2
    config.data.seq_len = 256
    config.data.global_batch_size = 32
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.train.num_steps = 2000
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.eval_batches = 8
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 1
    config.diagnostics.every = 100
    config.diagnostics.images_every = 500   # 48+ figures per render: keep the host free
    if arg == "smoke":
        config.data.seq_len, config.data.global_batch_size = 64, 8
        config.train.num_steps, config.train.eval_every, config.train.checkpoint_every = 20, 10, 10
        config.train.log_every = config.diagnostics.every = config.diagnostics.images_every = 10
    elif arg != "gpu":
        raise ValueError(f"configs/replication.py: unknown variant {arg!r}; use ':smoke' or none")
    return config


def get_sweep(arg: str = "gpu"):
    del arg
    return [{"model.attention.kind": kind, "model.attention.rope_fraction": f} for kind, f in TRIALS]
