"""The TensorBoard HParams entry of a finished trial: its swept values and final metrics.

Written into the trial's own run directory, so TensorBoard's HParams tab shows a sweep as
one table with a row per trial.
"""
import jax
import ml_collections
import tensorboardX
from tensorboardX.summary import hparams as hparams_summary

# The attention fields every row shows, swept or not.
ALWAYS = ("model.attention.kind", "model.attention.rope_fraction", "model.attention.remove_gap")

# Final metric name -> (tag in the trial's metrics, how it is reduced over training).
FINAL_METRICS = {
    "final/eval_loss": "eval/loss",
    "final/eval_perplexity": "eval/perplexity",
    "final/max_mp_gap": "spectral/qk_circuit_sum/mp_gap/max",
    "final/mean_outlier_energy": "spectral/qk_circuit_sum/outlier_energy/mean",
    "final/max_head_mp_gap": "spectral/qk_circuit/mp_gap/head_max/max",
}


def _value(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {name: float(metrics[tag]) for name, tag in FINAL_METRICS.items() if tag in metrics}


def write(workdir: str, config: ml_collections.ConfigDict, overrides: dict,
          metrics: dict[str, float], step: int) -> None:
    if jax.process_index() != 0:
        return
    values = {key: _value(config, key) for key in (*ALWAYS, *overrides)}
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
    final = final_metrics(metrics)
    writer = tensorboardX.SummaryWriter(workdir)
    for summary in hparams_summary(values, final):
        writer.file_writer.add_summary(summary)
    for tag, value in final.items():
        writer.add_scalar(tag, value, step)
    writer.close()
