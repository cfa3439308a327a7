"""Does turning the weight spectra on change training? The spectra step against the plain step,
from the same state and batch, per attention kind and compute dtype.

    python bench/spectra_step_rounding.py                  # LLaMA-130M, seq 256, batch 64 (GPU)
    python bench/spectra_step_rounding.py --tiny           # tiny preset, 8 x 32 tokens (CPU)

For each kind x dtype x layer layout, --steps times: the plain step twice and the spectra step
once, each on a copy of the same incoming state and batch (synthetic tokens); then training goes
on from the plain step's state. Printed per row: how many of the steps gave the same loss, and how many
state leaves (params and optimizer moments) were bit-identical, for plain vs plain (is the step
deterministic here?) and plain vs spectra (what the spectra step changes), and the largest
difference of a leaf relative to the leaf's largest entry. docs/spectral.md, "The spectra step",
says what was found.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mla_rmt import config_check, presets, sharding, step as step_lib


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset on 8 x 32 tokens (CPU)")
    p.add_argument("--kinds", default="mha,mla_decoupled")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=0, help="rows (default 64, tiny 8)")
    p.add_argument("--seq_len", type=int, default=0, help="default 256, tiny 32")
    p.add_argument("--scan_unrolls", default="0,1", help="model.scan_unroll values: 0 = all layers "
                   "unrolled (the default), 1 = a rolled scan")
    return p.parse_args(argv)


def make(kind: str, dtype: str, unroll: int, args):
    config = presets.base_config()
    presets.apply_model_preset(config, "tiny" if args.tiny else "llama_130m")
    config.model.attention.kind, config.model.attention.rope_fraction = kind, 0.5
    config.model.attention.kv_latent_dim = config.model.d_model // 2   # the MLA kinds' ratio 2
    config.model.dtype, config.model.scan_unroll = dtype, unroll
    config.data.seq_len = args.seq_len or (32 if args.tiny else 256)
    config.data.global_batch_size = args.batch or (8 if args.tiny else 64)
    config.diagnostics.every = 1
    cfg = config_check.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    return config, cfg, mesh, step_lib.make_trainer(config, cfg, mesh)


def compare(a, b) -> tuple[int, float]:
    """(bit-identical leaves, largest |a - b| of a leaf over the leaf's largest |a|)."""
    same, worst = 0, 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        same += bool(np.array_equal(x, y))
        scale = np.abs(x).max()
        worst = max(worst, float(np.abs(x - y).max() / scale) if scale else 0.0)
    return same, worst


def run(kind: str, dtype: str, unroll: int, args) -> dict:
    config, cfg, mesh, trainer = make(kind, dtype, unroll, args)
    rng = np.random.default_rng(0)
    rows, seq = config.data.global_batch_size, config.data.seq_len
    state = trainer.init_state(jax.random.key(0))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the steps donate their state
    row = {"kind": kind, "dtype": dtype, "steps": args.steps, "leaves": len(jax.tree.leaves(state)),
           "loss_same_plain": 0, "loss_same_spectra": 0, "leaves_same_plain": [],
           "leaves_same_spectra": [], "rel_plain": 0.0, "rel_spectra": 0.0}
    for _ in range(args.steps):
        tokens = rng.integers(0, cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
        batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
        plain, m_plain = trainer.train_step(copy(state), batch)
        again, m_again = trainer.train_step(copy(state), batch)
        spectra, m_spectra = trainer.spectra_step(copy(state), batch)
        loss = float(m_plain["train/loss"])
        row["loss_same_plain"] += loss == float(m_again["train/loss"])
        row["loss_same_spectra"] += loss == float(m_spectra["train/loss"])
        for name, other in (("plain", again), ("spectra", spectra)):
            same, rel = compare(plain, other)
            row[f"leaves_same_{name}"].append(same)
            row[f"rel_{name}"] = max(row[f"rel_{name}"], rel)
        state = plain
    return row


def main(argv=None):
    args = parse_args(argv)
    print(f"devices: {jax.devices()}")
    print("| kind | dtype | layers | same loss, plain twice | same loss, plain vs spectra | "
          "bit-identical leaves per step, plain twice | ... plain vs spectra | "
          "max rel. diff, plain twice | max rel. diff, plain vs spectra |")
    print("| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: |")
    for kind in args.kinds.split(","):
        for dtype in args.dtypes.split(","):
            for unroll in map(int, args.scan_unrolls.split(",")):
                layers = "unrolled" if unroll == 0 else f"scan, unroll {unroll}"
                report(run(kind, dtype, unroll, args), layers)


def report(r: dict, layers: str) -> None:
    leaves = lambda name: "/".join(map(str, r[f"leaves_same_{name}"])) + f" of {r['leaves']}"
    print(f"| {r['kind']} | {r['dtype']} | {layers} | {r['loss_same_plain']}/{r['steps']} | "
          f"{r['loss_same_spectra']}/{r['steps']} | {leaves('plain')} | {leaves('spectra')} | "
          f"{r['rel_plain']:.1e} | {r['rel_spectra']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
