"""Multi-process start-up: `jax.distributed.initialize()` when the environment has several processes.

Explicit flags win; otherwise SLURM (more than one task), a multi-host TPU slice, or the
JAX_COORDINATOR_ADDRESS variable each mean a multi-process run, and JAX's own cluster
detection fills in the rest. A single process does nothing here.
"""
import os

import jax
import numpy as np
from absl import logging


def is_multiprocess_environment(env=None) -> bool:
    env = os.environ if env is None else env
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    explicit = bool(coordinator_address)
    if not explicit and not is_multiprocess_environment():
        return
    if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms:
        # CPU collectives across processes (tests and CPU clusters) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    logging.info("Process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def any_process(flag: bool) -> bool:
    """True on every process when flag is True on any of them (a collective: every process
    calls it at the same point)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
