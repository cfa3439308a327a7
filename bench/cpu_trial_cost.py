"""Where a short tiny trial's time goes on a CPU: XLA compilation under several compiler
settings, and the ESD and heatmap images. The test suite is made of such trials.

    python -m bench.cpu_trial_cost                 # a table; about 3 minutes on 2 cores

Each setting runs in a fresh process (XLA reads its flags once) with no compilation cache: a
trial of the tiny mla_decoupled model, 10 steps of 8 x 32 tokens with spectra and probes every
step and images at step 0 only; XLA's defaults run once more with images every step.
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
SETTINGS = {
    "-O2 (XLA's default)": "",
    "-O1": O1,
    "-O0": O0,
    "-O2, loop emitters": LOOP_EMITTERS,
    "-O1, loop emitters (the test suite's)": f"{O1} {LOOP_EMITTERS}",
    "-O1, loop emitters, no expensive LLVM passes":
        f"{O1} {LOOP_EMITTERS} --xla_llvm_disable_expensive_passes=true",
    "-O0, loop emitters": f"{O0} {LOOP_EMITTERS}",
}


def trial(images_every: int) -> dict:
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
        "train.checkpoint_every": 5, "diagnostics.every": 1, "diagnostics.images_every": images_every})
    start = time.perf_counter()
    assert train.train_and_evaluate(config, tempfile.mkdtemp()).status == "finished"
    wall = time.perf_counter() - start
    compiles = [float(s) for s in re.findall(r"Finished XLA compilation of .*? in ([0-9.]+) sec", log.getvalue())]
    return {"wall": wall, "compile": sum(compiles)}


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
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trial(int(args.child))))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    print("| XLA setting | images | trial s | compile s |\n| --- | --- | ---: | ---: |")
    runs = [(name, flags, 1000, "step 0 only") for name, flags in SETTINGS.items()]
    runs.insert(1, ("-O2 (XLA's default)", "", 1, "every step"))
    for name, flags, images_every, label in runs:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cpu_trial_cost", f"--child={images_every}"],
            env={**env, "XLA_FLAGS": flags}, capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {label} | {result['wall']:.1f} | {result['compile']:.1f} |", flush=True)
    seconds = render_seconds()
    print(f"\nper image: ESD {seconds['esd']:.3f} s, heatmap {seconds['heatmap']:.3f} s")


if __name__ == "__main__":
    main()
