"""Every check of a config that can fail before data is read or anything compiles, in one
place, so a bad field fails with its name instead of a shape error inside compilation."""
import ml_collections

from mla_rmt import attention  # noqa: F401  (importing it registers the kinds' checks)
from mla_rmt import data
from mla_rmt.model_config import ConfigError, ModelConfig


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
    """Every check of the config that needs no devices and no data (check_mesh needs the mesh);
    the validated ModelConfig. Errors name the field."""
    cfg = ModelConfig.from_config(config.model)      # the model fields and the kind's own
    data.validate(config)                            # the data fields, seq_len and batch > 0
    t = config.train
    for field in ("num_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints", "preemption_check_every"):
        if t[field] <= 0:
            raise ConfigError(f"config.train.{field}: must be positive, got {t[field]}")
    batch = config.data.global_batch_size
    if t.microbatch_size < 0 or (t.microbatch_size and batch % t.microbatch_size):
        raise ConfigError(f"config.train.microbatch_size: {t.microbatch_size} must be 0 (off) or a "
                          f"positive divisor of config.data.global_batch_size={batch}")
    if t.loss_chunk_tokens < 0:
        raise ConfigError("config.train.loss_chunk_tokens: must be >= 0 (0 = plain loss), got "
                          f"{t.loss_chunk_tokens}")
    if t.peak_flops_per_device < 0:
        raise ConfigError("config.train.peak_flops_per_device: must be >= 0 (0 = look up the "
                          f"device kind), got {t.peak_flops_per_device}")
    g = config.diagnostics
    if g.every < 0:
        raise ConfigError(f"config.diagnostics.every: must be >= 0 (0 = off), got {g.every}")
    if g.images_every < 0 or (g.images_every and g.every and g.images_every % g.every):
        raise ConfigError(f"config.diagnostics.images_every: {g.images_every} must be 0 (with every "
                          f"spectra step) or a multiple of diagnostics.every={g.every}")
    if g.activations_every < 0:
        raise ConfigError("config.diagnostics.activations_every: must be >= 0 (0 = the spectra "
                          f"cadence), got {g.activations_every}")
    if g.probe_batch <= 0:
        raise ConfigError(f"config.diagnostics.probe_batch: must be positive, got {g.probe_batch}")
    if config.optim.learning_rate <= 0:
        raise ConfigError(f"config.optim.learning_rate: must be positive, got {config.optim.learning_rate}")
    return cfg


def check_mesh(config: ml_collections.ConfigDict, mesh) -> int:
    """The devices the batch is split over (data x fsdp); raises unless they divide the batch
    and its microbatches."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.global_batch_size % batch_devices:
        raise ConfigError(f"config.data.global_batch_size: {config.data.global_batch_size} rows do "
                          f"not split over the {batch_devices} devices of the mesh's data x fsdp "
                          "axes; make it a multiple of them")
    micro = config.train.microbatch_size
    if 0 < micro < config.data.global_batch_size and micro % batch_devices:
        raise ConfigError(f"config.train.microbatch_size: {micro} rows do not split over the "
                          f"{batch_devices} devices of the mesh's data x fsdp axes")
    return batch_devices
