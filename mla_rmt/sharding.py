"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place arrays on it."""
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters are sharded over fsdp along their embed axis and over
# tensor along heads / MLP / vocab; the batch is split over data x fsdp.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("gate_up", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("q_latent", None),
    ("kv_latent", None),
    ("rope_dim", None),
    ("layers", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes from the config; one axis may be -1 (the devices left over)."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh: {num_devices} devices do not split into "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh):
    """NamedShardings for a tree whose leaves carry logical axis names (LogicallyPartitioned)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: jax.sharding.Mesh, leading: int = 0) -> NamedSharding:
    """Rows split by the "batch" rule, after `leading` unsplit axes (e.g. microbatches)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes((None,) * leading + ("batch",), LOGICAL_RULES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Assembles each process's rows into one array sharded over data x fsdp."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)
