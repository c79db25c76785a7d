"""run_job: runs `config.job` into a workdir. Used by the absl entry point, by jobs that compose other
jobs (the demo runs the stealing job), and by tests. Kept apart from b4b_jax.main, whose absl flags
may only be defined once per process."""
import importlib

from b4b_jax.utils import cost_estimate
from b4b_jax.utils import workdir as workdir_lib


def run_job(config, workdir: str):
  """Runs `config.job` into `workdir` after checking the workdir holds no incompatible earlier run."""
  job = config.get("job")
  if not job:
    raise ValueError("config has no `job` field; every configs/*.py sets one")
  try:
    module = importlib.import_module(f"b4b_jax.jobs.{job}")
  except ModuleNotFoundError as e:
    if e.name == f"b4b_jax.jobs.{job}":
      raise ValueError(f"unknown job {job!r}: no module b4b_jax/jobs/{job}.py") from e
    raise
  # A job may check its config first, so a config it refuses never claims the workdir.
  validate = getattr(module, "validate_config", None)
  if validate is not None:
    validate(config)
  # Expected device time and host memory, logged; a run the host cannot hold is refused here, before
  # the workdir is claimed.
  cost_estimate.check(config)
  workdir_lib.prepare_workdir(workdir, config, job)
  return module.run(config, workdir)
