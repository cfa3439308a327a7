"""Sharded training on 8 CPU devices equals one device; parameters are really sharded."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from jax.sharding import PartitionSpec

from mla_rmt import attention, model, sharding
from mla_rmt.model_config import ModelConfig
from mla_rmt.presets import base_config


@pytest.fixture(scope="module", params=["mha", "mla_decoupled"])
def runs(request):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_steps.py"), request.param],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, json.loads(proc.stdout.strip().splitlines()[-1])


def test_losses_match_one_device(runs):
    _, result = runs
    reference = result["1 device"]["losses"]
    assert reference[-1] < reference[0]
    for name in ("data", "data+fsdp", "data+fsdp+tensor"):
        run = result[name]
        np.testing.assert_allclose(run["losses"], reference, rtol=2e-5, err_msg=name)


def test_parameters_and_optimizer_state_are_sharded(runs):
    kind, result = runs
    full = result["1 device"]["shard_shapes"]
    for name in ("data+fsdp", "data+fsdp+tensor"):
        shards = result[name]["shard_shapes"]
        smaller = [k for k in full if np.prod(shards[k]) < np.prod(full[k])]
        assert len(smaller) >= len(full) // 2, (name, smaller)
        assert any("fsdp" in s for s in result[name]["opt_specs"]), result[name]["opt_specs"]
    embed = "['embed']"
    assert result["data+fsdp"]["shard_shapes"][embed] == [2048, 128 // 4]
    assert result["data+fsdp+tensor"]["shard_shapes"][embed] == [2048 // 2, 128 // 2]
    assert all(np.prod(v) == np.prod(full[k]) for k, v in result["data"]["shard_shapes"].items())


def test_checkpoint_written_on_one_mesh_restores_on_another(runs):
    _, result = runs
    assert result["restore"] == {"values_equal": True, "on_target_layout": True}


def test_mesh_shape_fills_the_rest_and_rejects_bad_sizes():
    mesh = base_config().mesh
    mesh.data, mesh.fsdp, mesh.tensor = -1, 2, 1
    assert sharding.mesh_shape(mesh, 8) == (4, 2, 1)
    mesh.fsdp = 3
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.mesh_shape(mesh, 8)


def test_the_batch_is_placed_by_the_batch_rule_and_every_rule_places_something():
    config = base_config()
    mesh = sharding.make_mesh(config.mesh)
    rules = dict(sharding.LOGICAL_RULES)
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(rules["batch"])
    assert sharding.batch_sharding(mesh, leading=1).spec == PartitionSpec(None, rules["batch"])
    config.model.attention.q_latent_dim = config.model.d_model // 2   # query compression too
    used = {"batch"}
    for kind in attention.kinds():
        config.model.attention.kind = kind
        cfg = ModelConfig.from_config(config.model)
        shapes = jax.eval_shape(lambda cfg=cfg: model.Transformer(cfg).init(
            jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        for spec in jax.tree.leaves(nn.get_partition_spec(shapes),
                                    is_leaf=lambda x: isinstance(x, PartitionSpec)):
            used.update(axis for axis in spec if axis is not None)
    assert used == set(rules), (sorted(set(rules) - used), sorted(used - set(rules)))
