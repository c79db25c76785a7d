r"""Entry point for every b4b-jax experiment.

  python -m b4b_jax.main --config=configs/<name>.py[:variant] --workdir=DIR [--config.field=value]

`config.job` names a module in `b4b_jax.jobs`; that module's `run(config, workdir)` does the work.
Several processes (hosts of a GPU cluster without a cluster manager, or CPU processes on one machine)
form one JAX system with

  python -m b4b_jax.main ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

run once per process (I = 0..N-1, HOST:PORT process 0's address and a free port; the same config and
workdir everywhere). On TPU pod slices, SLURM and Open MPI leave the three flags out: the cluster is
detected. On CPU the processes exchange collectives through gloo, e.g. 2 processes x 2 devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m b4b_jax.main ... \
      --coordinator_address=127.0.0.1:29500 --num_processes=2 --process_id=0   # and =1 in a second shell

Every job but `serve` keeps XLA's CPU step buffers mapped between steps (b4b_jax/host_memory.py:
JAX's CPU dispatch inline, glibc's main arena without mmap or trimming; on the 2-core CPU the ResNet
stealing steps took 5-13 % less time and up to ~25 % more resident memory); `B4B_HOST_MEMORY=default`
in the environment leaves glibc and JAX as they are. The `serve` job keeps each thread's malloc heaps
mapped once grown instead (`host_memory.apply_serving`: the defense step's buffers are not faulted in
afresh per call), unless B4B_HOST_MEMORY is set. The log's `host memory:` line says which applies.

Every job but `serve` keeps the programs XLA compiles in a persistent cache under ~/.cache/b4b_jax/xla
(b4b_jax/compilation_cache.py: a rerun of the demo took 188-190 s instead of 237-245;
B4B_COMPILATION_CACHE=none turns it off); `serve` keeps its own in its workdir. The log's
`compilation cache:` line says where.

A workdir that cannot be used (a regular file, not writable) ends the run with one `error:` line naming
it and exit status 1, before anything is written.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from b4b_jax import compilation_cache
from b4b_jax import host_memory
from b4b_jax import xla_flags
from b4b_jax.jobs.runner import run_job  # re-exported: tests and scripts call b4b_jax.main.run_job
from b4b_jax.utils import distributed
from b4b_jax.utils import files

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator (with "
    "--num_processes and --process_id). Leave out on TPU pods / SLURM / Open MPI (auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id, 0..N-1.")
flags.mark_flags_as_required(["config", "workdir"])


def _hide_gpus_from_tensorflow() -> None:
  # tf.data only feeds the accelerator; it must never grab GPU memory JAX needs.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass


class _QuietLibraries:
  """Drops INFO chatter of orbax/etils (several lines per checkpoint) so progress lines stay readable."""
  _NOISY = ("/orbax/", "/etils/")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(part in record.pathname for part in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Both before JAX starts. A server compiles once and keeps JAX's async dispatch for its request
  # threads (xla_flags.py) and each thread's malloc arena, whose heaps it keeps once grown; every other
  # job trains or evaluates in this one process, so it keeps XLA's CPU step buffers mapped. Either
  # unless B4B_HOST_MEMORY says otherwise (host_memory.py).
  if _CONFIG.value.get("job") == "serve":
    xla_flags.apply(serving=True)
    host_memory.apply_serving()
  elif not os.environ.get(host_memory.ENV):
    host_memory.apply()
  _hide_gpus_from_tensorflow()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:  # flags that do not fit together: one line, before JAX starts
    raise SystemExit(f"error: {e}") from None
  workdir = os.path.abspath(_WORKDIR.value)
  logging.info("job %s -> workdir %s", _CONFIG.value.get("job"), workdir)
  logging.info("XLA_FLAGS: %s", os.environ.get("XLA_FLAGS", ""))
  logging.info("host memory: %s", host_memory.describe())
  if _CONFIG.value.get("job") != "serve":  # the server's cache lives in its workdir (jobs/serve.py)
    logging.info("compilation cache: %s", compilation_cache.apply())
  try:
    run_job(_CONFIG.value, workdir)
  except files.PathError as e:  # a path the user gave is unusable: one line, not a traceback
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
