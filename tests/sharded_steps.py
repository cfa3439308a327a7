"""Runs a few train steps of the tiny model on several meshes of 8 CPU devices; prints JSON.

Run as a script (the device count must be set before jax is imported):
    python tests/sharded_steps.py KIND
"""
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from mla_rmt import checkpoint, presets, sharding  # pylint: disable=wrong-import-position
from mla_rmt.step import make_trainer  # pylint: disable=wrong-import-position
from mla_rmt.model_config import ModelConfig  # pylint: disable=wrong-import-position

MESHES = {"1 device": (1, 1, 1), "data": (8, 1, 1), "data+fsdp": (2, 4, 1), "data+fsdp+tensor": (2, 2, 2)}


def make(kind: str, shape):
    config = presets.base_config()
    config.model.dtype = "float32"
    config.model.attention.kind = kind
    config.model.attention.rope_fraction = 0.5
    config.model.attention.kv_latent_dim = 64
    config.data.seq_len, config.data.global_batch_size = 32, 16
    config.optim.warmup_steps = 1
    # The layers under a rolled scan, as in the suite's other short trials (tests/test_model.py
    # holds it to the unrolled default's numbers): it compiles faster (BENCHMARKS.md, "The test
    # suite").
    config.model.scan_unroll = 1
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    mesh = sharding.make_mesh(config.mesh, jax.devices()[: int(np.prod(shape))])
    trainer = make_trainer(config, ModelConfig.from_config(config.model), mesh)
    tokens = np.random.default_rng(1).integers(0, config.model.vocab_size, (16, 33)).astype(np.int32)
    batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
    return trainer, batch


def run(kind: str, shape, steps: int = 3):
    trainer, batch = make(kind, shape)
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["train/loss"]))
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    return {"losses": losses,
            "specs": {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves},
            "shard_shapes": {jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape)
                             for p, x in leaves},
            "opt_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state)
                                 if x.ndim >= 2})}


def restore_across_meshes(kind: str, source, target) -> dict:
    """Saves after one step on `source`, restores onto `target`'s layout; compares."""
    trainer, batch = make(kind, source)
    state, _ = trainer.train_step(trainer.init_state(jax.random.key(0)), batch)
    with tempfile.TemporaryDirectory() as directory:
        ckpt = checkpoint.Checkpointer(directory, keep=1)
        ckpt.save(1, state, force=True)
        ckpt.close()
        other, _ = make(kind, target)
        restored = checkpoint.Checkpointer(directory, keep=1).restore_state(1, other.abstract_state)
    pairs = list(zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
    wanted = jax.tree.leaves(other.state_shardings)
    return {"values_equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs),
            "on_target_layout": all(b.sharding.is_equivalent_to(s, b.ndim)
                                    for (_, b), s in zip(pairs, wanted))}


if __name__ == "__main__":
    kind = sys.argv[1]
    result = {name: run(kind, shape) for name, shape in MESHES.items()}
    result["restore"] = restore_across_meshes(kind, (8, 1, 1), (2, 2, 2))
    print(json.dumps(result))
