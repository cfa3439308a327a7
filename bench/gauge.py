"""How far a reparametrisation that changes no logit moves each matrix's metrics, at init.

    python bench/gauge.py [--preset=llama_130m] [--kind=mha] [--rope_fraction=0.5] [--seed=0]

One init of one attention layer; its effective maps W_Q, W_K are transformed per head by
q_h -> c_h q_h, k_h -> k_h / c_h with c_h ~ lognormal(0, 1) ("scalars"), and additionally by an
invertible map R_h on the unrotated dims, q_h -> q_h R_h, k_h -> k_h R_h^-T ("maps"). Prints
mp_gap, outlier_count and outlier_energy of the cross-Gram qk_gram and of the default matrices
(head max for per-head ones) before and after.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mla_rmt import attention, diagnostics, presets
from mla_rmt.model_config import ModelConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama_130m")
    parser.add_argument("--kind", default="mha")
    parser.add_argument("--rope_fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = presets.base_config()
    presets.apply_model_preset(config, args.preset)
    config.model.attention.kind, config.model.attention.rope_fraction = args.kind, args.rope_fraction
    cfg = ModelConfig.from_config(config.model)
    module = attention.get(cfg.kind)(cfg)
    params = module.init(jax.random.key(args.seed), jnp.zeros((1, 1, cfg.d_model)),
                         jnp.zeros((1, 1), jnp.int32))["params"]
    wq, wk = (np.asarray(w, np.float64) for w in attention.get(cfg.kind).qk_maps(cfg, params))
    rng = np.random.default_rng(args.seed)
    c = rng.lognormal(0.0, 1.0, cfg.num_heads)
    scaled = (wq * c[None, :, None], wk / c[None, :, None])
    mapped = [w.copy() for w in scaled]
    r, n = cfg.rope_dims, cfg.d_head - cfg.rope_dims
    for h in range(cfg.num_heads):
        m = rng.standard_normal((n, n)) / np.sqrt(n) + 1.5 * np.eye(n)
        mapped[0][:, h, r:] = mapped[0][:, h, r:] @ m
        mapped[1][:, h, r:] = mapped[1][:, h, r:] @ np.linalg.inv(m).T
    specs = diagnostics.matrices(cfg) + diagnostics.matrices(cfg, "product", ("qk_gram",))
    run = jax.jit(lambda a, b: diagnostics.spectra_of_maps(a, b, specs))
    print(f"{args.preset} {args.kind} f={args.rope_fraction:g}, seed {args.seed}")
    print("| matrix | maps | mp_gap | outlier_count | outlier_energy |")
    print("|---|---|---|---|---|")
    for label, (a, b) in (("init", (wq, wk)), ("scalars", scaled), ("scalars+maps", mapped)):
        got = jax.device_get(run(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
        for m in specs:
            v = {k: float(np.max(got[m.name][k])) for k in ("mp_gap", "outlier_count", "outlier_energy")}
            name = m.name + (" (head max)" if m.per_head else "")
            print(f"| {name} | {label} | {v['mp_gap']:.3g} | {v['outlier_count']:.0f} | "
                  f"{v['outlier_energy']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
