"""The served demo (`configs/demo.py:served=1`): the defended users talk HTTP to a real server.

  with served.server(config, workdir, "attack_b4b", encoder_dir, defense_cfg) as srv:
    srv.api()          # a RemoteDefendedEncoder (b4b_jax.serve.client) on srv.url
    srv.token_file     # the provider's admin token (keys for new accounts, coverage/sigma read-outs)

Each defended user group (the legit user, the B4B thief, the sybils) gets a fresh server on 127.0.0.1
(b4b_jax.serve.testing.ServerProcess: `python -m b4b_jax.serve --config=configs/serve.py`) with its own
workdir under <workdir>/served/<stage>, the demo's victim encoder directory and its calibrated defense
written as a JSON file: a fresh service per group, as the in-process demo builds a fresh
DefendedEncoder per group, so the account names (and so the per-user noise and transforms) match. The
undefended thief is the baseline "no defense at all" and stays in-process. The servers share one JAX
compilation cache (<workdir>/served/jax_cache), so only the first pays for compiling.

The server runs on the CPU backend (ServerProcess's default): the demo's own process may hold the
accelerator.
"""
import contextlib
import json
import os
import secrets

from b4b_jax.utils import files

SERVED_DIR = "served"


class Served:

  def __init__(self, proc, token_file: str, start_seconds: float, batch_size: int):
    self.proc, self.token_file, self.start_seconds = proc, token_file, start_seconds
    self._batch_size = batch_size

  @property
  def url(self) -> str:
    return self.proc.url

  def api(self):
    from b4b_jax.serve import client as client_lib  # pylint: disable=g-import-not-at-top
    with open(self.token_file) as f:
      token = f.read().strip()
    return client_lib.RemoteDefendedEncoder(self.url, admin_token=token, batch_size=self._batch_size)

  def summary(self) -> dict:
    return {"url": self.url, "workdir": self.proc.workdir, "start_seconds": round(self.start_seconds, 2)}


@contextlib.contextmanager
def server(config, workdir: str, stage: str, encoder_dir: str, defense_cfg):
  """A fresh server for one stage's users (see the module docstring); stopped (SIGTERM) on exit."""
  from b4b_jax.serve import testing  # pylint: disable=g-import-not-at-top
  sc = config.serve
  root = os.path.join(os.path.abspath(workdir), SERVED_DIR)
  service_dir = os.path.join(root, stage)
  os.makedirs(service_dir, exist_ok=True)
  defense_json = os.path.join(root, "defense.json")
  files.atomic_write_json(defense_json, defense_cfg.to_dict())
  token_file = os.path.join(service_dir, "admin_token")
  if not os.path.exists(token_file):  # the server reads it (0600), the demo's clients too
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
      f.write(secrets.token_urlsafe(32) + "\n")
  rows = int(config.query_batch_size)
  overrides = {"defense_json": defense_json, "capacity": int(sc.capacity),
               "batching.max_rows": rows, "limits.max_rows_per_request": rows,
               "persistence.compilation_cache_dir": (str(sc.compilation_cache_dir) or
                                                     os.path.join(root, "jax_cache"))}
  proc = testing.ServerProcess(service_dir, os.path.abspath(encoder_dir), config="configs/serve.py",
                               overrides=[f"--config.{k}={v}" for k, v in overrides.items()],
                               log_path=os.path.join(root, f"{stage}.log"))
  start = proc.start(timeout=float(sc.start_timeout_s))
  try:
    yield Served(proc, token_file, start, rows)
  finally:
    code = proc.stop()
    if code != 0:
      raise RuntimeError(f"the {stage} server exited with status {code}:\n{proc.log_tail()}")


def note(results: dict) -> str:
  """The report's line on how the users reached the API."""
  served = results.get("served") or {}
  if not served:
    return ""
  return ("Served: the defended users (" + ", ".join(sorted(served)) + ") talked HTTP to the B4B "
          "service (b4b_jax.serve) on loopback, one fresh server per group: " +
          json.dumps(served, sort_keys=True))
