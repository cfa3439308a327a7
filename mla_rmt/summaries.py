"""TensorBoard writing through tensorboardX (no TensorFlow); only process 0 writes."""
import concurrent.futures
import os
import time

import jax
import ml_collections
import numpy as np
import tensorboardX
from absl import logging
from tensorboardX import event_file_writer, record_writer

from mla_rmt import tags


class _EventFile:
    """An event file written on the caller's thread. tensorboardX's own queues events for a
    thread of its own and its flush() does not wait for that queue, so a scalar logged before
    a checkpoint could be lost with the process after the checkpoint was committed. Events
    reach the disk at flush() and at least every FLUSH_SECONDS (for a live TensorBoard)."""

    FLUSH_SECONDS = 30

    def __init__(self, logdir: str):
        self._logdir = logdir
        record_writer.directory_check(logdir)
        self._events = event_file_writer.EventsWriter(os.path.join(logdir, "events"))  # thread-safe
        self._flushed = time.monotonic()

    def get_logdir(self):
        return self._logdir

    def add_event(self, event):
        self._events.write_event(event)
        if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
            self.flush()

    def flush(self):
        self._events.flush()
        self._flushed = time.monotonic()

    def close(self):
        self._events.close()


class _FileWriter(tensorboardX.FileWriter):
    def __init__(self, logdir: str):  # pylint: disable=super-init-not-called  (no queue thread)
        self.event_writer = _EventFile(logdir)
        self._default_metadata = {}


class _TensorboardXWriter(tensorboardX.SummaryWriter):
    """tensorboardX's SummaryWriter on one _EventFile: flush() puts every event so far on disk."""

    def _get_file_writer(self):
        if self.file_writer is None:
            self.file_writer = _FileWriter(self.logdir)
            self.all_writers = {self.logdir: self.file_writer}
        return self.file_writer


class SummaryWriter:
    def __init__(self, logdir: str):
        self.enabled = jax.process_index() == 0
        self.writer = _TensorboardXWriter(logdir) if self.enabled else None
        # Figures render on one background thread, off the training loop's critical path.
        self._renders = concurrent.futures.ThreadPoolExecutor(1, "summaries") if self.enabled else None
        self._pending: list[concurrent.futures.Future] = []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            for tag, value in values.items():
                self.writer.add_scalar(tag, float(value), step)

    def histogram(self, step: int, tag: str, values) -> None:
        if self.enabled:
            self.writer.add_histogram(tag, np.asarray(values, np.float64), step)

    def image(self, step: int, tag: str, image_HxWxC) -> None:
        if self.enabled:
            self.writer.add_image(tag, image_HxWxC, step, dataformats="HWC")

    def images_later(self, step: int, render) -> None:
        """Writes the images of render() -> {tag: [H, W, 3] uint8} from a background thread.

        At most one render waits behind the running one (a slow renderer holds the caller back
        instead of piling up figures); close() waits for all of them.
        """
        if not self.enabled:
            return
        self._pending = [f for f in self._pending if not f.done()]
        while len(self._pending) > 1:
            self._pending.pop(0).result()
        self._pending.append(self._renders.submit(self._write_images, step, render))

    def _write_images(self, step: int, render) -> None:
        try:
            for tag, image in render().items():
                self.image(step, tag, image)
        except Exception:  # pylint: disable=broad-except
            logging.exception("TensorBoard images of step %d failed; training goes on.", step)

    def config(self, config: ml_collections.ConfigDict) -> None:
        if self.enabled:
            self.writer.add_text(tags.CONFIG, "```\n" + config.to_json_best_effort(indent=2) + "\n```", 0)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._renders.shutdown(wait=True)
            self.writer.close()
