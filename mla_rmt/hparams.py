"""The TensorBoard HParams entry of a trial: its swept values, status and final metrics.

Written into the trial's own run directory, so TensorBoard's HParams tab shows a sweep as
one table with a row per trial: finished, failed and preempted trials alike, each with its
status (the `status` column and the session status). The entry lives in an event file of its
own (suffix `.hparams`), replaced each time the trial's status changes, so a run directory
holds one entry.
"""
import jax
import ml_collections
import tensorboardX
from etils import epath
from tensorboardX.proto.api_pb2 import Status
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.summary import hparams as hparams_summary

from mla_rmt import dotted, tags

# Final metric name -> its tag among the trial's last metrics.
FINAL_METRICS = {
    tags.final("eval_loss"): tags.EVAL_LOSS,
    tags.final("eval_perplexity"): tags.EVAL_PERPLEXITY,
    tags.final("max_mp_gap"): tags.spectral_over_layers("qk_circuit_sum", "mp_gap", "max"),
    tags.final("mean_outlier_energy"): tags.spectral_over_layers("qk_circuit_sum", "outlier_energy", "mean"),
    tags.final("max_head_mp_gap"): tags.spectral_over_layers("qk_circuit", "mp_gap", "max", "head_max"),
}


SUFFIX = ".hparams"
# Trial status -> the session status TensorBoard shows (a preempted trial resumes: running).
STATUSES = {"finished": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "preempted": "STATUS_RUNNING"}


def final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {name: float(metrics[tag]) for name, tag in FINAL_METRICS.items() if tag in metrics}


def _session_end(status: str) -> Summary:
    content = HParamsPluginData(session_end_info=SessionEndInfo(status=Status.Value(STATUSES[status])),
                                version=0)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="hparams", content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])


def write(workdir: str, config: ml_collections.ConfigDict, overrides: dict,
          metrics: dict[str, float], step: int, status: str = "finished") -> None:
    """Replaces the trial's HParams entry; status is 'finished', 'failed' or 'preempted'."""
    if jax.process_index() != 0:
        return
    values = {key: dotted.get(config, key) for key in (*tags.SWEPT.values(), *overrides)}
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
    values["status"] = status
    final = final_metrics(metrics)
    for old in epath.Path(workdir).glob(f"events.out.tfevents.*{SUFFIX}"):
        old.unlink()
    writer = tensorboardX.SummaryWriter(workdir, filename_suffix=SUFFIX)
    experiment, session_start, _ = hparams_summary(values, dict.fromkeys(FINAL_METRICS, 0.0))
    for summary in (experiment, session_start, _session_end(status)):
        writer.file_writer.add_summary(summary)
    for tag, value in final.items():
        writer.add_scalar(tag, value, step)
    writer.close()
