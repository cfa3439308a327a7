"""The weight spectra of a saved checkpoint, offline: `python -m mla_rmt.analyze --workdir=DIR`.

Rebuilds the model from DIR/config.json (written by the trainer), restores the parameters of
one checkpoint (the latest, or --step=N) and runs the same jitted `diagnostics.weight_spectra`
as the train step, so the numbers equal what was logged at that step. Prints a per-layer table
and writes DIR/analysis/step_<N>.json (or --output).
"""
import json

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from mla_rmt import checkpoint, diagnostics, sharding, spectral, train

_WORKDIR = flags.DEFINE_string("workdir", None, "A trial's directory (holds config.json and checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MATRICES = flags.DEFINE_string("matrices", None, "Comma-separated matrices (default: the run's).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: DIR/analysis/step_<N>.json).")

TABLE_METRICS = ("mp_gap", "outlier_count", "outlier_energy", "stable_rank", "stable_rank_frac",
                 "spectral_entropy", "lambda_plus", "lambda_max")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json; is {workdir} a trial directory written "
                                "by mla_rmt.main? (a sweep's trials are its subdirectories)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def analyze(workdir: str, step: int | None = None, matrices: str | None = None) -> dict:
    """{'step', 'scalars': the TensorBoard scalars, 'layers': {matrix: {metric: [L] (or [L, H])}}}."""
    config = load_config(workdir)
    if matrices is not None:
        config.diagnostics.matrices = matrices
    cfg = train.validate_config(config)
    mesh = sharding.make_mesh(config.mesh)
    trainer = train.make_trainer(config, cfg, mesh)
    ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), keep=1 << 30)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to analyse")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"--step={step}: no such checkpoint in {workdir}; there are {steps}")
        state = ckpt.restore_state(step, trainer.abstract_state)
    finally:
        ckpt.close()
    specs = diagnostics.configured_matrices(cfg, config.diagnostics)
    spectra = jax.device_get(jax.jit(lambda p: diagnostics.weight_spectra(p, cfg, specs))(state.params))
    return {"step": step,
            "scalars": diagnostics.layer_scalars(spectra),
            "layers": {name: {k: np.asarray(v).tolist() for k, v in values.items() if k != "eigenvalues"}
                       for name, values in spectra.items()}}


def table(result: dict) -> str:
    """One row per matrix and layer (per-head values averaged over heads)."""
    header = f"{'matrix':<16}{'layer':>5}" + "".join(f"{m:>18}" for m in TABLE_METRICS)
    rows = [f"step {result['step']}", header]
    for name, values in result["layers"].items():
        num_layers = len(values["mp_gap"])
        for layer in range(num_layers):
            cells = "".join(f"{float(np.mean(values[m][layer])):>18.6g}" for m in TABLE_METRICS)
            rows.append(f"{name:<16}{layer:>5}{cells}")
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    result = analyze(_WORKDIR.value, _STEP.value, _MATRICES.value)
    output = epath.Path(_OUTPUT.value or epath.Path(_WORKDIR.value) / "analysis" / f"step_{result['step']}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"metrics: {', '.join(spectral.METRIC_NAMES)}; written to {output}")


if __name__ == "__main__":
    app.run(main)
