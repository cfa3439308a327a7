"""Each attention kind side by side: parameters, KV-cache bytes per token, train tokens/s.

    python bench/attention_kinds.py                     # tiny preset (configs/llama.py:tiny)
    python bench/attention_kinds.py --preset=llama_130m --steps=0   # sizes only

Synthetic tokens (the model's speed, not the input pipeline's), jitted train step, timed over
--steps after one warm-up step, one block_until_ready at the end.
"""
import argparse
import time

import jax
import numpy as np

from mla_rmt import attention, config_check, presets, sharding
from mla_rmt.step import make_trainer
from mla_rmt.model import param_count

VARIANTS = (("mha", {}), ("gqa", {"num_kv_heads": 2}), ("mla_prerope", {}),
            ("mla_decoupled", {}), ("mha", {"rope_fraction": 0.0}), ("mha", {"remove_gap": True}))


def variant_config(preset: str, kind: str, options: dict):
    config = presets.base_config()
    presets.apply_model_preset(config, preset)
    a = config.model.attention
    a.kind, a.rope_fraction = kind, 0.5
    if kind.startswith("mla"):
        a.kv_latent_dim = config.model.d_model // 2         # compression ratio 2
    for key, value in options.items():
        a[key] = value
    return config


def tokens_per_sec(config, steps: int) -> float:
    cfg = config_check.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    trainer = make_trainer(config, cfg, mesh)
    state = trainer.init_state(jax.random.key(0))
    b, t = config.data.global_batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int32)
    batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
    state, metrics = trainer.train_step(state, batch)          # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return steps * b * t / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"preset {args.preset}, device {jax.devices()[0].device_kind} x {jax.device_count()}, "
          f"rope_fraction 0.5 unless named, MLA kv_latent_dim = d_model / 2")
    print("| variant | params (model) | params / attention layer | KV cache B/token | train tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, options in VARIANTS:
        config = variant_config(args.preset, kind, options)
        cfg = config_check.validate(config)
        name = kind + "".join(f", {k}={v}" for k, v in options.items())
        speed = f"{tokens_per_sec(config, args.steps):,.0f}" if args.steps else "-"
        print(f"| {name} | {param_count(cfg):,} | {attention.param_count(cfg):,} | "
              f"{attention.kv_cache_bytes_per_token(cfg):,} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
