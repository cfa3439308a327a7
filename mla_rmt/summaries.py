"""TensorBoard writing through tensorboardX (no TensorFlow); only process 0 writes."""
import jax
import ml_collections
import numpy as np
import tensorboardX


class SummaryWriter:
    def __init__(self, logdir: str):
        self.enabled = jax.process_index() == 0
        self.writer = tensorboardX.SummaryWriter(logdir, flush_secs=30) if self.enabled else None

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

    def config(self, config: ml_collections.ConfigDict) -> None:
        if self.enabled:
            self.writer.add_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```", 0)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
