"""The summary writer, in-process: scalars, histograms, images (also rendered in the background)
and the config, read back from the real event files by TensorBoard's reader."""
import json

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.util import tensor_util

from mla_rmt import presets, summaries, tags


def _reload(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={
        "scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _decoded(image_event):
    import io  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)))


def test_scalars_histograms_images_and_config_read_back(tmp_path):
    rng = np.random.default_rng(0)
    writer = summaries.SummaryWriter(str(tmp_path))
    assert writer.enabled
    steps = sorted(rng.choice(1000, size=4, replace=False).tolist())
    values = {tags.spectral("m", "mp_gap", layer): rng.normal(size=len(steps)) for layer in range(3)}
    for i, step in enumerate(steps):
        writer.scalars(step, {tag: v[i] for tag, v in values.items()})
    eigs = rng.gamma(2.0, size=500)
    writer.histogram(steps[0], tags.eigenvalues("m", 0), eigs)
    image = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    writer.image(steps[1], tags.esd("m", 0), image)
    config = presets.base_config()
    writer.config(config)
    writer.close()

    acc = _reload(tmp_path)
    for tag, v in values.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == steps
        np.testing.assert_allclose([e.value for e in events], v, rtol=1e-6)   # stored as float32

    (hist,) = acc.Histograms(tags.eigenvalues("m", 0))
    assert hist.step == steps[0]
    h = hist.histogram_value
    assert h.num == eigs.size and np.isclose(h.sum, eigs.sum()) and np.isclose(h.sum_squares, (eigs ** 2).sum())
    assert h.min == eigs.min() and h.max == eigs.max()
    assert sum(h.bucket) == eigs.size

    (img,) = acc.Images(tags.esd("m", 0))
    assert img.step == steps[1] and (img.height, img.width) == (6, 9)
    np.testing.assert_array_equal(_decoded(img), image)         # PNG: lossless

    written = f"{tags.CONFIG}/text_summary"                     # tensorboardX's suffix
    assert tags.parse(written).kind == "config"
    (text,) = acc.Tensors(written)
    assert acc.SummaryMetadata(written).plugin_data.plugin_name == text_metadata.PLUGIN_NAME
    body = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    assert json.loads(body.strip().strip("`")) == json.loads(config.to_json_best_effort())


def test_background_renders_are_all_written_and_a_failing_one_loses_nothing_else(tmp_path, caplog):
    rng = np.random.default_rng(1)
    writer = summaries.SummaryWriter(str(tmp_path))
    images = {step: rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8) for step in range(6)}

    def render(step):
        if step == 3:
            raise RuntimeError("a figure that fails")
        return {tags.heatmap("m", "mp_gap"): images[step], tags.esd("m", 1): images[step][::-1]}

    for step in images:
        writer.images_later(step, lambda step=step: render(step))
        writer.scalars(step, {tags.TRAIN_LOSS: float(step)})     # the loop goes on meanwhile
    writer.close()                                               # waits for every render
    assert "images of step 3 failed" in caplog.text              # reported, not silent

    acc = _reload(tmp_path)
    assert [e.step for e in acc.Scalars(tags.TRAIN_LOSS)] == list(images)
    heatmaps = acc.Images(tags.heatmap("m", "mp_gap"))
    assert [e.step for e in heatmaps] == [0, 1, 2, 4, 5]
    for event in heatmaps:
        np.testing.assert_array_equal(_decoded(event), images[event.step])
    for event in acc.Images(tags.esd("m", 1)):
        np.testing.assert_array_equal(_decoded(event), images[event.step][::-1])


def test_flush_puts_every_scalar_so_far_on_disk_without_a_close(tmp_path):
    """What the loop relies on before each checkpoint commit: a process killed after flush()
    has written every scalar logged before it (read here from the open file, no close)."""
    writer = summaries.SummaryWriter(str(tmp_path))
    for step in range(1, 3001):
        writer.scalars(step, {"train/loss": 1.0 / step, "train/grad_norm": float(step)})
    writer.flush()
    acc = _reload(tmp_path)
    for tag in ("train/loss", "train/grad_norm"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 3001)), tag
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1      # one event file
    writer.close()
