"""Workdir bookkeeping: the config and library versions of a run, and refusing incompatible reuse.

A workdir belongs to one experiment. Re-running with the same config resumes; running a *different*
experiment config into it is refused with a clear error instead of mixing or clobbering results.
"""
import hashlib
import json
import os

import ml_collections

from b4b_jax.utils import files
from b4b_jax.utils.versions import library_versions

RUN_INFO = "run_info.json"
# Fields that may change between a run and its resumption without changing what is computed.
_VOLATILE_FIELDS = frozenset({"log_every_seconds", "progress_every_seconds", "max_steps_this_run"})


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  d = _strip(config.to_dict())
  blob = json.dumps(d, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _strip(d):
  if isinstance(d, dict):
    return {k: _strip(v) for k, v in d.items() if k not in _VOLATILE_FIELDS}
  return d


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, job: str) -> bool:
  """Creates the workdir and records config + versions. Returns True if this resumes a run.

  Raises ValueError if the workdir holds a run of another job or another config.
  """
  os.makedirs(workdir, exist_ok=True)
  info_path = os.path.join(workdir, RUN_INFO)
  fingerprint = config_fingerprint(config)
  if os.path.exists(info_path):
    try:
      previous = files.read_json(info_path)
    except (OSError, ValueError) as e:
      raise ValueError(f"workdir {workdir!r}: unreadable {RUN_INFO} ({e}); use a fresh workdir") from e
    if previous.get("job") != job or previous.get("config_fingerprint") != fingerprint:
      raise ValueError(
          f"workdir {workdir!r} holds an incompatible earlier run (job {previous.get('job')!r}, "
          f"config fingerprint {previous.get('config_fingerprint')}; this run: job {job!r}, "
          f"fingerprint {fingerprint}). Use a fresh --workdir, or the same config to resume.")
    resumed = True
  else:
    resumed = False
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    files.atomic_write_json(info_path, {"job": job, "config_fingerprint": fingerprint,
                                        "versions": library_versions()})
    files.atomic_write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  return resumed
