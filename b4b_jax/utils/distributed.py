"""Multi-device / multi-host set-up for data parallelism (jit over globally sharded arrays).

The same code runs on 1 CPU, 8 GPUs or a TPU pod slice: a 1-D mesh with axis "data", the batch sharded
along it, parameters replicated. Multi-host runs call `initialize_distributed()` first (a no-op on a
single host), each process feeds its own shard of the batch, and only process 0 writes.
"""
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def check_process_args(coordinator_address: Optional[str], num_processes: Optional[int],
                       process_id: Optional[int]) -> None:
  """Refuses an incomplete or inconsistent explicit set-up with a ValueError naming the flags."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if all(v is None for v in given.values()):
    return
  missing = sorted(k for k, v in given.items() if v is None)
  if missing:
    raise ValueError(f"--coordinator_address, --num_processes and --process_id go together (or none "
                     f"of them: cluster auto-detection on TPU pods / SLURM / Open MPI); missing "
                     f"{', '.join('--' + m for m in missing)}")
  host, sep, port = str(coordinator_address).rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address must be HOST:PORT (process 0's address and a free port), "
                     f"got {coordinator_address!r}")
  if int(num_processes) < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  if not 0 <= int(process_id) < int(num_processes):
    raise ValueError(f"--process_id must be in 0..{int(num_processes) - 1} (--num_processes="
                     f"{num_processes}), got {process_id}")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None, process_id: Optional[int] = None, *,
                           initialization_timeout: int = 300) -> bool:
  """Joins the processes of one run into one JAX system; returns whether it initialised.

  Explicit: all three of coordinator_address ("host:port" of process 0), num_processes and process_id
  (e.g. several processes on one machine, or hosts without a cluster manager). Without them,
  `jax.distributed.initialize()` runs where a cluster is detectable (TPU pod slices, SLURM, Open MPI,
  JAX_COORDINATOR_ADDRESS) and nothing happens on a single host. Must run before JAX's backends start.

  CPU processes exchange collectives through gloo (TCP): with it, several CPU processes form one mesh
  (XLA_FLAGS=--xla_force_host_platform_device_count=N gives each N virtual devices). The setting only
  concerns the CPU client, so it is harmless on GPU and TPU hosts.
  """
  check_process_args(coordinator_address, num_processes, process_id)
  if jax.distributed.is_initialized():
    return False
  explicit = coordinator_address is not None
  if explicit or _cluster_detectable():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id),
                               initialization_timeout=int(initialization_timeout))
    return True
  if _cluster_detectable():
    jax.distributed.initialize()
    return True
  return False


def _cluster_detectable() -> bool:
  """A multi-process launch jax.distributed.initialize() can configure itself."""
  env = os.environ
  if env.get("TPU_WORKER_HOSTNAMES", "localhost") != "localhost":  # a TPU pod slice (not one VM)
    return True
  if "JAX_COORDINATOR_ADDRESS" in env:
    return True
  # SLURM / Open MPI launches of more than one task (a single task needs no coordinator).
  return any(env.get(v, "1").isdigit() and int(env.get(v, "1")) > 1
             for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def is_writer() -> bool:
  """Whether this process writes shared outputs (results, reports, metrics, caches): process 0 only."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier over all processes (a no-op with one): e.g. after process 0 wrote what the others read.
  Every process must call it with the same name, in the same order."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def written_by_process_zero(write: Callable[[], Any], name: str) -> None:
  """Runs `write()` on process 0 only, then waits until it is done on every process, so all of them
  can read what it wrote (e.g. a random-init encoder directory). A collective call: every process
  calls it. If process 0 fails, the others stop when JAX's coordination service notices."""
  if is_writer():
    write()
  sync(name)


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (a collective call).

  For decisions read from the file system that decide which collective work follows (skip an
  embedding that an earlier run cached, resume a finished phase): process 0 may write the file
  between two processes' looks, so each process looking for itself could take another branch and
  leave the others waiting in a collective forever.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


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
