"""The weight spectra of a saved model, offline, from a trial or from a Hugging Face checkpoint.

    python -m mla_rmt.analyze --workdir=DIR [--step=N]   # a trial of this project
    python -m mla_rmt.analyze --hf=DIR                   # config.json + *.safetensors

--workdir rebuilds the model from DIR/config.json (written by the trainer), restores one
checkpoint (the latest, or --step=N) and runs the same jitted `diagnostics.weight_spectra` as
the train step, so the numbers equal what was logged at that step.

--hf maps a LLaMA-family or DeepSeek-MLA checkpoint onto the attention kind of the same
layout (mla_rmt/hf_checkpoint.py) and runs the same function one layer at a time: only one
layer's attention tensors are ever in host memory, and the eigensolvers run on the
accelerator when there is one. It also writes a TensorBoard run with the training tags
(step 0) and the ESD figures, next to the JSON unless --logdir says otherwise.

Both print a per-layer table and write the JSON {'step', 'scalars', 'layers', 'tail_fit'}:
the scalars under the TensorBoard tags, the per-layer (per-head) metrics, and the power-law
fit of every ESD's tail (mla_rmt/tail_fit.py), reported next to the MP metrics.
"""
import json
import pathlib

import jax
import numpy as np
from absl import app, flags
from etils import epath

from mla_rmt import diagnostics, hf_checkpoint, plots, spectral, summaries, tags, tail_fit, trial

TABLE_METRICS = ("mp_gap", "outlier_count", "outlier_energy", "stable_rank", "stable_rank_frac",
                 "spectral_entropy", "lambda_plus", "lambda_max")


def result_of(step: int, spectra: dict, fit_tails: bool = True) -> dict:
    """The JSON of an analysis: scalars (TensorBoard tags), per-layer metrics, tail fits."""
    out = {"step": step,
           "scalars": diagnostics.layer_scalars(spectra),
           "layers": {name: {k: np.asarray(v).tolist() for k, v in values.items() if k != "eigenvalues"}
                      for name, values in spectra.items()}}
    if fit_tails:
        out["tail_fit"] = {name: tail_fit.fit_spectra(values["eigenvalues"])
                           for name, values in spectra.items()}
    return out


def analyze(workdir: str, step: int | None = None, matrices: str | None = None,
            null: str | None = None, fit_tails: bool = True) -> dict:
    """{'step', 'scalars': the TensorBoard scalars, 'layers': {matrix: {metric: [L] (or [L, H])}},
    'tail_fit': {matrix: {field: [L] (or [L, H])}}} of one checkpoint of a trial."""
    config, cfg, params, step = trial.restore(workdir, step)
    if matrices is not None:
        config.diagnostics.matrices = matrices
    if null is not None:
        config.diagnostics.null = null
    specs = diagnostics.configured_matrices(cfg, config.diagnostics)
    spectra = jax.device_get(jax.jit(lambda p: diagnostics.weight_spectra(p, cfg, specs))(params))
    return result_of(step, spectra, fit_tails)


def spectra_by_layer(cfg, specs, layers) -> dict[str, dict[str, np.ndarray]]:
    """`diagnostics.weight_spectra` of an iterable of one-layer attention params, one layer at
    a time (one compiled function; each layer's weights are dropped before the next is read)."""
    one_layer = jax.jit(lambda p: diagnostics.weight_spectra(
        {"layers": {"attention": jax.tree.map(lambda w: w[None], p)}}, cfg, specs))
    per_layer = []
    for params in layers:
        per_layer.append(jax.device_get(one_layer(params)))
        del params
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *per_layer)


def analyze_hf(directory: str, matrices: str | None = None, null: str | None = None,
               fit_tails: bool = True):
    """(result JSON, spectra, specs, checkpoint) of a Hugging Face-layout checkpoint."""
    ckpt = hf_checkpoint.open_checkpoint(directory)
    diag = hf_checkpoint.diagnostics_config(matrices or "", null or "product")
    specs = diagnostics.configured_matrices(ckpt.cfg, diag)
    spectra = spectra_by_layer(ckpt.cfg, specs, hf_checkpoint.iter_layers(ckpt))
    result = result_of(0, spectra, fit_tails)
    result["source"] = ckpt.source()
    return result, spectra, specs, ckpt


def write_run(logdir, result: dict, spectra: dict, specs, hf_config: dict | None = None,
              figures: bool = True) -> None:
    """A TensorBoard run with the training tags at the result's step, and the ESD figures as
    TensorBoard images and PNG files (logdir/esd/<matrix>_layer_<LL>.png)."""
    step = result["step"]
    logdir = pathlib.Path(logdir)
    writer = summaries.SummaryWriter(str(logdir))
    try:
        if hf_config is not None and writer.enabled:
            text = json.dumps({"config.json": hf_config, "source": result.get("source", {})}, indent=1)
            writer.writer.add_text(tags.CONFIG, f"```\n{text}\n```", step)
        writer.scalars(step, result["scalars"])
        for name, fits in result.get("tail_fit", {}).items():
            alpha, ok_share = tail_fit.table_values(fits)
            writer.scalars(step, {tags.tail_fit(name, "alpha", layer): a
                                  for layer, a in enumerate(alpha) if np.isfinite(a)})
            writer.scalars(step, {tags.tail_fit(name, "ok_share", layer): s
                                  for layer, s in enumerate(ok_share)})
        by_name = {m.name: m for m in specs}
        for name, values in spectra.items():
            for layer, eigs in enumerate(values["eigenvalues"]):
                writer.histogram(step, tags.eigenvalues(name, layer), eigs)
                if not figures:
                    continue
                fig = plots.esd_figure(eigs, by_name[name].null, values["lambda_plus"][layer],
                                       f"{name} layer {layer}", gammas=by_name[name].gammas)
                (logdir / "esd").mkdir(parents=True, exist_ok=True)
                fig.savefig(logdir / "esd" / f"{name}_layer_{layer:02d}.png")
                writer.image(step, tags.esd(name, layer), plots.figure_to_image(fig))
    finally:
        writer.close()


def table(result: dict) -> str:
    """One row per matrix and layer (per-head values averaged over heads); with tail fits, the
    mean alpha over the fits of status ok and the share of such fits."""
    fits = result.get("tail_fit", {})
    extra = ("alpha", "alpha_ok") if fits else ()
    header = f"{'matrix':<16}{'layer':>5}" + "".join(f"{m:>18}" for m in TABLE_METRICS + extra)
    rows = [f"step {result['step']}", header]
    for name, values in result["layers"].items():
        num_layers = len(values["mp_gap"])
        alpha, ok = tail_fit.table_values(fits[name]) if name in fits else (None, None)
        for layer in range(num_layers):
            cells = "".join(f"{float(np.mean(values[m][layer])):>18.6g}" for m in TABLE_METRICS)
            if alpha is not None:
                cells += f"{alpha[layer]:>18.4g}{ok[layer]:>18.3g}"
            rows.append(f"{name:<16}{layer:>5}{cells}")
    return "\n".join(rows)


def define_flags() -> None:
    """The command line, defined when the module runs as a program and not on import: the
    functions above are imported by programs that have flags of their own (mla_rmt.main's
    --workdir among them)."""
    flags.DEFINE_string("workdir", None, "A trial's directory (holds config.json and checkpoints/).")
    flags.DEFINE_string("hf", None, "A Hugging Face model directory: config.json and *.safetensors "
                        "(one file, or shards with model.safetensors.index.json).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("matrices", None, "Comma-separated matrices (default: the run's; "
                        "--hf: all of the kind's).")
    flags.DEFINE_string("null", None, "Null law, 'product' or 'mp' (default: the run's; "
                        "--hf: product).")
    flags.DEFINE_string("output", None, "JSON path (default: DIR/analysis/step_<N>.json; "
                        "--hf: DIR/analysis/spectra.json).")
    flags.DEFINE_string("logdir", None, "--hf: TensorBoard run and ESD figures (default: "
                        "the JSON's directory).")
    flags.DEFINE_bool("tail_fit", True, "Power-law fit of each ESD's tail.")
    flags.DEFINE_bool("figures", True, "--hf: ESD figures (PNG and TensorBoard images).")


def main(argv):
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if bool(f.workdir) == bool(f.hf):
        raise app.UsageError("Give exactly one of --workdir (a trial) and --hf (a Hugging Face model).")
    if f.hf:
        if f.step is not None:
            raise app.UsageError("--step applies to --workdir only.")
        result, spectra, specs, ckpt = analyze_hf(f.hf, f.matrices, f.null, f.tail_fit)
        output = epath.Path(f.output or epath.Path(f.hf) / "analysis" / "spectra.json")
        logdir = pathlib.Path(f.logdir or output.parent)
        write_run(logdir, result, spectra, specs, ckpt.hf_config, f.figures)
    else:
        result = analyze(f.workdir, f.step, f.matrices, f.null, f.tail_fit)
        output = epath.Path(f.output or epath.Path(f.workdir) / "analysis" / f"step_{result['step']}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"metrics: {', '.join(spectral.METRIC_NAMES)}; written to {output}")
    if f.hf:
        print(f"TensorBoard run{' and ESD figures' if f.figures else ''}: {logdir}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
