"""Where a short tiny trial's time goes on a CPU: XLA compilation under several compiler
settings, with the layers unrolled (the default) or under a rolled scan, and the ESD and
heatmap images. The test suite is made of such trials.

    python -m bench.cpu_trial_cost                 # two tables; about 5 minutes on 2 cores
    taskset -c 0 python -m bench.cpu_trial_cost    # on one core, as a test worker runs

Each setting runs in a fresh process (XLA reads its flags once) with no compilation cache: a
trial of the tiny mla_decoupled model, 10 steps of 8 x 32 tokens with spectra and probes every
step and images at step 0 only; XLA's defaults run once more with images every step. The
second table is what rolling the layers and -O0 cost a long trial: the step time of the
README's trial (configs/rope_budget_sweep.py:tiny, trial 1, 16 x 128 tokens).
"""
import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time

O1, O0 = "--xla_backend_optimization_level=1", "--xla_backend_optimization_level=0"
LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
SUITE = "-O0, loop emitters (the test suite's)"
STEP_BOUND = "-O1, loop emitters (the suite's README trial)"
SETTINGS = {
    "-O2 (XLA's default)": "",
    "-O1": O1,
    "-O0": O0,
    "-O2, loop emitters": LOOP_EMITTERS,
    STEP_BOUND: f"{O1} {LOOP_EMITTERS}",
    "-O1, loop emitters, no expensive LLVM passes":
        f"{O1} {LOOP_EMITTERS} --xla_llvm_disable_expensive_passes=true",
    SUITE: f"{O0} {LOOP_EMITTERS}",
}


def trial(images_every: int, scan_unroll: int) -> dict:
    """Runs the trial in this process; returns wall and compile seconds."""
    import io  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel
    from mla_rmt import presets, sweep, train  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_log_compiles", True)
    log = io.StringIO()
    logging.getLogger("jax").addHandler(logging.StreamHandler(log))
    config = sweep.apply(presets.apply_model_preset(presets.base_config(), "tiny"), {
        "model.attention.kind": "mla_decoupled", "model.attention.rope_fraction": 0.5,
        "data.seq_len": 32, "data.global_batch_size": 8, "train.eval_batches": 2,
        "train.num_steps": 10, "train.log_every": 1, "train.eval_every": 5,
        "train.checkpoint_every": 5, "diagnostics.every": 1, "diagnostics.images_every": images_every,
        "model.scan_unroll": scan_unroll})
    start = time.perf_counter()
    assert train.train_and_evaluate(config, tempfile.mkdtemp()).status == "finished"
    wall = time.perf_counter() - start
    compiles = [float(s) for s in re.findall(r"Finished XLA compilation of .*? in ([0-9.]+) sec", log.getvalue())]
    return {"wall": wall, "compile": sum(compiles)}


def readme_step(scan_unroll: int, steps: int = 10) -> dict:
    """Compile seconds of the README trial's init and train step, and ms per step after the
    first (synthetic tokens, diagnostics off)."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from configs import rope_budget_sweep  # pylint: disable=import-outside-toplevel
    from mla_rmt import config_check, sharding, step, sweep  # pylint: disable=import-outside-toplevel
    config = sweep.apply(rope_budget_sweep.get_config("tiny"), rope_budget_sweep.get_sweep("tiny")[1])
    config.diagnostics.every, config.model.scan_unroll = 0, scan_unroll
    trainer = step.make_trainer(config, config_check.validate(config), sharding.make_mesh(config.mesh))
    key = jax.random.key(0)
    start = time.perf_counter()
    trainer.init_state.lower(key).compile()
    init_compile = time.perf_counter() - start
    state = trainer.init_state(key)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (16, 129)).astype(np.int32)
    batch = {"inputs": jax.numpy.asarray(tokens[:, :-1]), "targets": jax.numpy.asarray(tokens[:, 1:])}
    start = time.perf_counter()
    train_step = trainer.train_step.lower(state, batch).compile()
    step_compile = time.perf_counter() - start
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    return {"init_compile": init_compile, "step_compile": step_compile,
            "step_ms": 1e3 * (time.perf_counter() - start) / steps}


def render_seconds(repeats: int = 10) -> dict:
    """Seconds per ESD image (a per-head matrix: 4 heads of 32 values) and per heatmap."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from mla_rmt import plots, spectral  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    gammas = spectral.chain_gammas((128, 32, 128))
    law, eigs = spectral.null_law(gammas), np.sort(rng.chisquare(3, (4, 32)), axis=1)
    out = {}
    for name, draw in (
            ("esd", lambda: plots.esd_figure(eigs, law, 2 + rng.random(4), "esd", gammas=gammas)),
            ("heatmap", lambda: plots.layer_step_heatmap(rng.random((4, 6)), list(range(6)), "heatmap"))):
        plots.figure_to_image(draw())
        start = time.perf_counter()
        for _ in range(repeats):
            plots.figure_to_image(draw())
        out[name] = (time.perf_counter() - start) / repeats
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--scan_unroll", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "readme":
        print(json.dumps(readme_step(args.scan_unroll)))
        return
    if args.child:
        print(json.dumps(trial(int(args.child), args.scan_unroll)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}

    def child(flags, *child_args):
        proc = subprocess.run([sys.executable, "-m", "bench.cpu_trial_cost", *child_args],
                              env={**env, "XLA_FLAGS": flags}, capture_output=True, text=True,
                              check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    print("| XLA setting | layers | images | trial s | compile s |\n| --- | --- | --- | ---: | ---: |")
    runs = [(name, flags, 1000, "step 0 only", 0) for name, flags in SETTINGS.items()]
    runs.insert(1, ("-O2 (XLA's default)", "", 1, "every step", 0))
    runs += [(name, SETTINGS[name], 1000, "step 0 only", 1) for name in (STEP_BOUND, SUITE)]
    for name, flags, images_every, label, unroll in runs:
        result = child(flags, f"--child={images_every}", f"--scan_unroll={unroll}")
        layers = "rolled scan" if unroll == 1 else "unrolled"
        print(f"| {name} | {layers} | {label} | {result['wall']:.1f} | {result['compile']:.1f} |",
              flush=True)
    print("\n| README trial | layers | init compile s | step compile s | ms per step |\n"
          "| --- | --- | ---: | ---: | ---: |")
    for name, unroll in ((STEP_BOUND, 0), (STEP_BOUND, 1), (SUITE, 0)):
        result = child(SETTINGS[name], "--child=readme", f"--scan_unroll={unroll}")
        layers = "rolled scan" if unroll == 1 else "unrolled (the default)"
        print(f"| {name} | {layers} | {result['init_compile']:.2f} | "
              f"{result['step_compile']:.2f} | {result['step_ms']:.0f} |", flush=True)
    seconds = render_seconds()
    print(f"\nper image: ESD {seconds['esd']:.3f} s, heatmap {seconds['heatmap']:.3f} s")


if __name__ == "__main__":
    main()
