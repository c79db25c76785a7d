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
# Fields that may differ between a run and its resume: pacing, and where a server listens (restarting the
# service on another port is the same service over the same state).
_VOLATILE_FIELDS = frozenset({"log_every_seconds", "progress_every_seconds", "max_steps_this_run",
                              "host", "port", "compilation_cache_dir"})


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  d = _strip(config.to_dict())
  blob = json.dumps(d, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _strip(d):
  if isinstance(d, dict):
    return {k: _strip(v) for k, v in d.items() if k not in _VOLATILE_FIELDS}
  return d


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, job: str, *,
                    writable: bool = True) -> bool:
  """Creates the workdir and records config + versions. Returns True if this resumes a run.

  Raises files.PathError (a ValueError naming the path) if `workdir` cannot be a directory (a regular
  file in the way) or, with `writable` (every job run: it writes metrics and results), is not
  writable; ValueError if it holds a run of another job or another config. Nothing is written when
  run_info.json and config.json already say the same, so `writable=False` (reading a finished run's
  results) works on a read-only workdir.
  """
  files.check_output_dir(workdir, "workdir", must_be_writable=writable)
  if writable:
    files.make_dir(workdir)
  elif not os.path.isdir(workdir):
    raise files.PathError(f"workdir {workdir} does not exist")
  info_path = os.path.join(workdir, RUN_INFO)
  fingerprint = config_fingerprint(config)
  info = {"job": job, "config_fingerprint": fingerprint}
  previous = None
  if os.path.exists(info_path):
    try:
      previous = files.read_json(info_path)
    except (OSError, ValueError) as e:
      raise ValueError(f"workdir {workdir!r}: unreadable {RUN_INFO} ({e}); use a fresh workdir") from e
    if not isinstance(previous, dict) or previous.get("job") != job or (
        previous.get("config_fingerprint") != fingerprint):
      previous = previous if isinstance(previous, dict) else {}
      raise ValueError(
          f"workdir {workdir!r} holds an incompatible earlier run (job {previous.get('job')!r}, "
          f"config fingerprint {previous.get('config_fingerprint')}; this run: job {job!r}, "
          f"fingerprint {fingerprint}). Use a fresh --workdir, or the same config to resume.")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    # Versions of the first run are kept; a resume under other versions adds them, never replaces.
    versions = library_versions()
    if previous is None:
      info["versions"] = versions
    else:
      info = dict(previous)
      if previous.get("versions") != versions and versions not in previous.get("resumed_with", []):
        info["resumed_with"] = list(previous.get("resumed_with", [])) + [versions]
    _write_if_changed(info_path, json.dumps(info, indent=2, sort_keys=True) + "\n", writable)
    _write_if_changed(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2),
                      writable)
  return previous is not None


def _write_if_changed(path: str, text: str, writable: bool) -> None:
  try:
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
  except (OSError, UnicodeDecodeError):
    pass
  if writable:
    files.atomic_write_text(path, text)
