"""Data-parallel scaling: train tokens/s on 1 device vs all visible devices, same per-device batch.

    python bench/scaling.py                     # LLaMA-130M, seq 256, 128 rows per device
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/scaling.py --tiny   # CPU check

The real train step (mla_rmt.step.make_trainer) on a mesh of 1 device and on one of all
devices along the 'data' axis (parameters and optimizer state replicated, the batch split,
gradients all-reduced by XLA), synthetic tokens, bf16 compute / fp32 params, diagnostics off.
Both steps compile first (in parallel), then each runs --warmup steps and --steps timed ones
with one block_until_ready at each end. Speedup = tokens/s on N devices / tokens/s on 1;
efficiency = speedup / N.
"""
import argparse
import concurrent.futures
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny preset, seq 128, 8 rows per device, 3 steps")
    p.add_argument("--preset", default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--per_device_batch", type=int, default=None, help="rows per device per step (128; 8 with --tiny)")
    p.add_argument("--per_device_microbatch", type=int, default=0,
                   help="gradient-accumulation rows per device (0 = off)")
    p.add_argument("--kind", default="mha")
    p.add_argument("--attention_impl", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (20; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="(2; 1 with --tiny)")
    p.add_argument("--peak_flops", type=float, default=989e12, help="dense bf16 FLOP/s per device, for MFU")
    args = p.parse_args()
    for key, full, tiny in (("preset", "llama_130m", "tiny"), ("seq", 256, 128),
                            ("per_device_batch", 128, 8), ("steps", 20, 3), ("warmup", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)

    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from mla_rmt import config_check, presets, sharding  # pylint: disable=import-outside-toplevel
    from mla_rmt.step import make_trainer  # pylint: disable=import-outside-toplevel
    from mla_rmt.model import flops_per_token  # pylint: disable=import-outside-toplevel

    devices = jax.devices()
    print(f"python {sys.version.split()[0]}, jax {jax.__version__}, {len(devices)} x "
          f"{devices[0].device_kind} ({jax.default_backend()})", flush=True)
    counts = [1] if len(devices) == 1 else [1, len(devices)]

    def setup(n):
        config = presets.base_config()
        presets.apply_model_preset(config, args.preset)
        config.model.attention.kind = args.kind
        config.model.attention_impl = args.attention_impl
        config.data.seq_len = args.seq
        config.data.global_batch_size = args.per_device_batch * n
        config.train.microbatch_size = args.per_device_microbatch * n
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = n, 1, 1
        cfg = config_check.validate(config)
        mesh = sharding.make_mesh(config.mesh, devices[:n])
        trainer = make_trainer(config, cfg, mesh)
        batch_spec = jax.ShapeDtypeStruct((config.data.global_batch_size, args.seq), np.int32,
                                          sharding=sharding.batch_sharding(mesh))
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(trainer.abstract_state,
                                            {"inputs": batch_spec, "targets": batch_spec}).compile()
        print(f"compiled the {n}-device step in {time.perf_counter() - t0:.1f}s", flush=True)
        return config, cfg, mesh, trainer, compiled

    with concurrent.futures.ThreadPoolExecutor(len(counts)) as pool:
        setups = dict(zip(counts, pool.map(setup, counts)))

    rows = []
    for n in counts:
        config, cfg, mesh, trainer, compiled = setups[n]
        b = config.data.global_batch_size
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, args.seq + 1), dtype=np.int32)
        batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
        state = trainer.init_state(jax.random.key(0))
        for _ in range(args.warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - t0) / args.steps
        tps = b * args.seq / seconds
        mfu = tps * flops_per_token(cfg, args.seq) / (args.peak_flops * n)
        rows.append(dict(n=n, batch=b, step_ms=1e3 * seconds, tps=tps, mfu=mfu,
                         loss=float(metrics["train/loss"])))
        print(f"{n} device(s): global batch {b}, {1e3 * seconds:.1f} ms/step, {tps:,.0f} tokens/s, "
              f"MFU {100 * mfu:.1f}%, loss {rows[-1]['loss']:.3f}", flush=True)
        del state, metrics, batch

    base = rows[0]["tps"]
    print(f"\nData-parallel scaling: {args.preset} ({args.kind}), seq {args.seq}, "
          f"{args.per_device_batch} rows per device, microbatch per device "
          f"{args.per_device_microbatch or 'off'}, {args.steps} timed steps")
    print("| devices | global batch | step ms | tokens/s | tokens/s per device | MFU % | speedup | efficiency |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        speedup = r["tps"] / base
        print(f"| {r['n']} | {r['batch']} | {r['step_ms']:.1f} | {r['tps']:,.0f} | {r['tps'] / r['n']:,.0f} | "
              f"{100 * r['mfu']:.1f} | {speedup:.2f}x | {100 * speedup / r['n']:.0f}% |")
    if len(rows) == 1:
        print("Only one device is visible: no speedup to report.")


if __name__ == "__main__":
    main()
