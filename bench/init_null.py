"""The init false-outlier rate of every default spectral matrix, per attention kind and shape.

    python bench/init_null.py --presets=tiny,llama_130m --draws=20 [--fractions=0.5] [--seed=0]
        [--kinds=mha,...] [--matrices=qk_circuit,...]   # a subset: the same draws, fewer rows

For each kind (gqa with num_heads/2 kv heads), rope_fraction and preset, draws fresh inits of one
attention layer (seeds apart from the one the sampled nulls are built from), runs the diagnostics
on each and prints a markdown table: mean outlier_count, mean mp_gap, the share of matrices
(heads, for per-head ones) with an outlier, the null (analytic chain or sampled) and p. The
table in docs/spectral.md is this script's output.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mla_rmt import attention, diagnostics, presets
from mla_rmt.model_config import ModelConfig

KINDS = ("mha", "gqa", "mla_prerope", "mla_decoupled")


def model_config(preset: str, kind: str, f: float) -> ModelConfig:
    config = presets.base_config()
    presets.apply_model_preset(config, preset)
    a = config.model.attention
    a.kind, a.rope_fraction = kind, f
    a.num_kv_heads = config.model.num_heads // 2 if kind == "gqa" else 0
    return ModelConfig.from_config(config.model)


def rates(cfg: ModelConfig, draws: int, seed: int, names: tuple[str, ...] = ()):
    specs = [m for m in diagnostics.matrices(cfg) if not names or m.name in names]
    module = attention.get(cfg.kind)(cfg)
    x, pos = jnp.zeros((1, 1, cfg.d_model)), jnp.zeros((1, 1), jnp.int32)
    one = jax.jit(lambda key: diagnostics.spectra_of_maps(
        *module.qk_maps(cfg, module.init(key, x, pos)["params"]), specs))
    got = [jax.device_get(one(k)) for k in jax.random.split(jax.random.key(seed), draws)]
    for m in specs:
        count = np.stack([g[m.name]["outlier_count"] for g in got])
        gap = np.stack([g[m.name]["mp_gap"] for g in got])
        yield m, float(count.mean()), float(gap.mean()), float(np.mean(count > 0))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="tiny,llama_130m")
    parser.add_argument("--fractions", default="0.5")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--matrices", default="", help="comma-separated; empty: every default")
    args = parser.parse_args()
    print(f"init false-outlier rate, {args.draws} fresh draws per row (seed {args.seed}), "
          f"{jax.default_backend()}")
    print("| preset | kind | f | matrix | p | null | mean outlier_count | mean mp_gap | share flagged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for f in (float(v) for v in args.fractions.split(",")):
            for kind in args.kinds.split(","):
                start = time.time()
                cfg = model_config(preset, kind, f)
                names = tuple(filter(None, args.matrices.split(",")))
                for m, count, gap, flagged in rates(cfg, args.draws, args.seed + 1, names):
                    null = "sampled" if m.gammas is None else f"chain {m.spec.chain}"
                    print(f"| {preset} | {kind} | {f:g} | {m.name} | {m.rank} | {null} | {count:.3f} "
                          f"| {gap:.4f} | {flagged:.3f} |", flush=True)
                print(f"  ({preset} {kind} f={f:g}: {time.time() - start:.0f}s)", flush=True,
                      file=__import__("sys").stderr)


if __name__ == "__main__":
    main()
