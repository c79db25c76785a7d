"""Multi-device / multi-host set-up for data parallelism (jit over globally sharded arrays).

The same code runs on 1 CPU, 8 GPUs or a TPU pod slice: a 1-D mesh with axis "data", the batch sharded
along it, parameters replicated. Multi-host runs call `initialize_distributed()` first (a no-op on a
single host), each process feeds its own shard of the batch, and only process 0 writes.
"""
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> None:
  """Calls jax.distributed.initialize() where a cluster is detectable; harmless on one host."""
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  on_cluster = any(v in os.environ for v in (
      "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
      "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  if on_cluster and os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") != "localhost":
    jax.distributed.initialize()
  elif "JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_NTASKS" in os.environ:
    jax.distributed.initialize()


def data_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A 1-D ("data",) mesh over the first `num_devices` devices (all devices by default)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"global batch size {global_batch} does not divide by the {n} devices of the "
                     f"mesh; choose a multiple of {n}")
  if global_batch % jax.process_count():
    raise ValueError(f"global batch size {global_batch} does not divide by the "
                     f"{jax.process_count()} processes")


def global_batch(local_tree, mesh: jax.sharding.Mesh):
  """Assembles this process's slice of a batch (a pytree of numpy arrays) into global sharded arrays."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_tree)


def replicate(tree, mesh: jax.sharding.Mesh):
  return jax.device_put(tree, replicated(mesh))
