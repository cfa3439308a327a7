"""A trial's saved model, offline: its config and the parameters of one checkpoint.

What `mla_rmt.analyze --workdir` and `mla_rmt.export_hf` read; no flags, so both can import it.
"""
import json

import ml_collections
from etils import epath

from mla_rmt import checkpoint, config_check, sharding
from mla_rmt.step import make_trainer


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json; is {workdir} a trial directory written "
                                "by mla_rmt.main? (a sweep's trials are its subdirectories)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore(workdir: str, step: int | None = None):
    """(config, ModelConfig, params, step) of one checkpoint of a trial."""
    config = load_config(workdir)
    cfg = config_check.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    trainer = make_trainer(config, cfg, mesh)
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
    return config, cfg, state.params, step
