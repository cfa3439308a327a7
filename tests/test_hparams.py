"""The HParams entry of a trial, written in-process and read back from its event file through
TensorBoard's own reader and plugin protos."""
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from mla_rmt import hparams, presets, tags


def _read(run_dir) -> tuple[dict, dict]:
    """({'_hparams_/<entry>': HParamsPluginData}, {tag: (step, value)}) of the .hparams files."""
    files = sorted(run_dir.glob(f"events.out.tfevents.*{hparams.SUFFIX}"))
    assert len(files) == 1, files
    acc = event_accumulator.EventAccumulator(str(files[0]), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    plugin = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
              for tag, content in acc.PluginTagToContent("hparams").items()}
    scalars = {}
    for tag in acc.Tags()["scalars"]:
        (event,) = acc.Scalars(tag)
        scalars[tag] = (event.step, event.value)
    return plugin, scalars


def _value(proto_value):
    return getattr(proto_value, proto_value.WhichOneof("kind"))


def _config(rng):
    config = presets.base_config()
    config.model.attention.kind = ["mha", "gqa", "mla_decoupled"][rng.integers(3)]
    config.model.attention.rope_fraction = float(rng.choice([0.0, 0.25, 0.5, 1.0]))
    config.model.attention.remove_gap = bool(rng.integers(2))
    config.optim.learning_rate = float(rng.uniform(1e-4, 1e-2))
    return config


@pytest.mark.parametrize("seed", range(3))
def test_the_entry_holds_the_swept_values_status_and_final_metrics(tmp_path, seed):
    rng = np.random.default_rng(seed)
    config = _config(rng)
    metrics = {tag: float(rng.normal()) for tag in hparams.FINAL_METRICS.values()}
    metrics["train/loss"] = 3.0                                  # not a final metric
    del metrics[tags.spectral_over_layers("qk_circuit", "mp_gap", "max", "head_max")]  # not logged
    step = int(rng.integers(1, 10_000))
    hparams.write(str(tmp_path), config, {"optim.learning_rate": config.optim.learning_rate},
                  metrics, step, status="preempted")

    plugin, scalars = _read(tmp_path)
    assert sorted(plugin) == ["_hparams_/experiment", "_hparams_/session_end_info",
                              "_hparams_/session_start_info"]
    values = {k: _value(v) for k, v in plugin["_hparams_/session_start_info"].session_start_info.hparams.items()}
    attention = config.model.attention
    assert values == {"model.attention.kind": attention.kind,
                      "model.attention.rope_fraction": attention.rope_fraction,
                      "model.attention.remove_gap": attention.remove_gap,
                      "optim.learning_rate": pytest.approx(config.optim.learning_rate),
                      "status": "preempted"}
    assert plugin["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_RUNNING
    declared = {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos}
    assert declared == set(hparams.FINAL_METRICS)
    expected = {name: (step, metrics[tag]) for name, tag in hparams.FINAL_METRICS.items() if tag in metrics}
    assert tags.final("max_head_mp_gap") not in scalars and len(expected) == len(hparams.FINAL_METRICS) - 1
    assert scalars.keys() == expected.keys()
    for name, (s, v) in expected.items():
        assert scalars[name][0] == s and scalars[name][1] == pytest.approx(v, rel=1e-6), name


def test_a_new_status_replaces_the_entry(tmp_path):
    config = _config(np.random.default_rng(5))
    metrics = {tags.EVAL_LOSS: 2.5}
    hparams.write(str(tmp_path), config, {}, metrics, 10, status="preempted")
    hparams.write(str(tmp_path), config, {}, {tags.EVAL_LOSS: 2.0}, 20, status="failed")
    plugin, scalars = _read(tmp_path)                            # one file: the old one is gone
    assert plugin["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_FAILURE
    start = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert start["status"].string_value == "failed"
    assert scalars == {tags.final("eval_loss"): (20, 2.0)}


def test_an_override_the_config_lacks_is_an_error_naming_it(tmp_path):
    with pytest.raises(KeyError, match="optim.learning_rat"):
        hparams.write(str(tmp_path), presets.base_config(), {"optim.learning_rat": 1.0}, {}, 1)
