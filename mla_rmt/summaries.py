"""TensorBoard writing through tensorboardX (no TensorFlow); only process 0 writes."""
import concurrent.futures

import jax
import ml_collections
import numpy as np
import tensorboardX
from absl import logging

from mla_rmt import tags


class SummaryWriter:
    def __init__(self, logdir: str):
        self.enabled = jax.process_index() == 0
        self.writer = tensorboardX.SummaryWriter(logdir, flush_secs=30) if self.enabled else None
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
