"""The service core (no HTTP): durable accounts, the defended encoder, micro-batching, snapshots.

  service = Service(config, workdir, encoder_dir)
  service.start()                       # checks the workdir, restores snapshot + journal, then serves
                                        # (the batch shapes keep compiling on a thread, see serve())
  service.start_in_background(done)     # the same on a thread; `ready` is set once it serves
  reps, seq = await service.embed(account, images_uint8)   # answered after its journal commit
  service.stop()                        # drains, snapshots, closes

Workdir layout (everything the service must not lose):
  service.sqlite (+ -wal)   accounts, key hashes, counters and the journal (store.py)
  snapshots/<seq>/          orbax snapshot of the defense state covering journal entries <= seq;
                            written as snapshots/.partial-<seq>, then renamed (a crash mid-save leaves a
                            .partial directory, which is removed at start; the previous snapshot and the
                            journal after it are intact)
  admin_token               the admin bearer token (0600), unless B4B_ADMIN_TOKEN is set

Start-up restores the newest snapshot, replays the journal after it (`replay`: bit-identical state) and
checks every account's answered-row counter in the database against the restored defense state. Any
damage (unreadable snapshot, broken hash chain, missing entries, disagreeing counters) is a StartupError
that names it: the service never starts from a silently reset state.
"""
import asyncio
import errno
import os
import re
import secrets
import shutil
import stat
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import logging

from b4b_jax.serve import accounts as accounts_lib
from b4b_jax.serve import batcher as batcher_lib
from b4b_jax.serve import defended
from b4b_jax.serve import errors
from b4b_jax.serve import images as images_lib
from b4b_jax.serve import metrics as metrics_lib
from b4b_jax.serve import store as store_lib

SNAPSHOTS = "snapshots"
ADMIN_TOKEN_FILE = "admin_token"
ADMIN_TOKEN_ENV = "B4B_ADMIN_TOKEN"
_SNAPSHOT_RE = re.compile(r"^\d{12}$")


# ------------------------------------------------------------------------------------------ workdir
def check_workdir(workdir: str, min_free_bytes: int) -> None:
  """StartupError unless the workdir exists (or can be made), is writable, and has room."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.StartupError(f"cannot create the workdir {workdir}: {e.strerror} ({_errname(e)})")
  probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"\0" * 65536)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    _remove_quietly(probe)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise errors.StartupError(f"the workdir {workdir} is on a full disk ({_errname(e)}): the service "
                                "must write its journal before answering; free space first") from e
    raise errors.StartupError(f"the workdir {workdir} is not writable ({_errname(e)}: {e.strerror}); "
                              "the service must write its journal before answering") from e
  _remove_quietly(probe)
  free = shutil.disk_usage(workdir).free
  if free < int(min_free_bytes):
    raise errors.StartupError(f"the workdir {workdir} has {free / 2**20:.1f} MiB free; the service "
                              f"needs at least {int(min_free_bytes) / 2**20:.1f} MiB "
                              "(config.persistence.min_free_bytes) for its journal and snapshots")


def process_age_seconds() -> Optional[float]:
  """Seconds since this process started (Linux /proc; None elsewhere): the start-up breakdown's
  clock, so interpreter start and imports are counted too."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return round(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 3)
  except (OSError, ValueError, IndexError):
    return None


def _errname(e: OSError) -> str:
  return errno.errorcode.get(e.errno or 0, str(e.errno))


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def admin_token(workdir: str) -> str:
  """The admin token: $B4B_ADMIN_TOKEN, else <workdir>/admin_token (created 0600 on first start)."""
  env = os.environ.get(ADMIN_TOKEN_ENV)
  if env:
    if len(env) < 16:
      raise errors.StartupError(f"${ADMIN_TOKEN_ENV} is shorter than 16 characters")
    return env
  path = os.path.join(workdir, ADMIN_TOKEN_FILE)
  if not os.path.exists(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
      f.write(secrets.token_urlsafe(32) + "\n")
      f.flush()
      os.fsync(f.fileno())
  mode = stat.S_IMODE(os.stat(path).st_mode)
  if mode & 0o077:
    raise errors.StartupError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
  with open(path) as f:
    return f.read().strip()


# ------------------------------------------------------------------------------------------ snapshots
def snapshot_dirs(workdir: str) -> List[Tuple[int, str]]:
  root = os.path.join(workdir, SNAPSHOTS)
  if not os.path.isdir(root):
    return []
  out = [(int(n), os.path.join(root, n)) for n in os.listdir(root) if _SNAPSHOT_RE.match(n)]
  return sorted(out)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


# ------------------------------------------------------------------------------------------ service
class Service:

  def __init__(self, config, workdir: str, encoder_dir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.encoder_dir = encoder_dir
    self.metrics = metrics_lib.Metrics(tuple(config.observability.coverage_thresholds))
    self.limits = images_lib.Limits.from_config(config.limits)
    self.store: Optional[store_lib.Store] = None
    self.gate: Optional[accounts_lib.Gatekeeper] = None
    self.api = None
    self.geometry: Optional[images_lib.Geometry] = None
    self.batcher: Optional[batcher_lib.Batcher] = None
    self.admin_token: Optional[str] = None
    self.started_at = None
    self.start_seconds = None
    self._snapshot_seq = 0
    self._last_snapshot_time = time.monotonic()
    self._coverage: Dict[str, float] = {}
    self._stopping = threading.Event()
    self.encoder = None
    self.startup: Dict[str, float] = {}   # seconds per start-up phase (logged, and in /healthz)
    self._warm_thread: Optional[threading.Thread] = None
    self._warm_error: Optional[BaseException] = None
    self._start_thread: Optional[threading.Thread] = None
    self.ready = threading.Event()        # set once start() finished: requests are served
    self.start_error: Optional[BaseException] = None   # why a background start failed
    self._shard_rows = bool(config.batching.get("shard_over_devices", True))

  # -------------------------------------------------------------------------------- start/stop
  def start(self) -> None:
    """open() then serve(); the batch shapes compile (warm-up) on a thread while the state is
    restored. `startup` holds where the seconds went."""
    t0 = time.perf_counter()
    self.open(warm_up=True)
    self.serve()
    self.start_seconds = time.perf_counter() - t0
    self.startup["service_total_s"] = round(self.start_seconds, 3)
    self.startup["process_s_at_ready"] = process_age_seconds()
    self.ready.set()
    logging.info("service ready in %.1f s: %d accounts, journal at seq %d, snapshot seq %d",
                 self.start_seconds, len(self.store.accounts()), self.store.last_seq,
                 self._snapshot_seq)

  def start_in_background(self, done=None) -> None:
    """start() on a thread (the HTTP server listens meanwhile; requests wait for `ready`). A failure
    is kept in `start_error` (never served from); `done()` runs after either outcome."""

    def run():
      try:
        self.start()
      except BaseException as e:  # pylint: disable=broad-except  (reported by the caller)
        self.start_error = e
      finally:
        if done is not None:
          done()

    self._start_thread = threading.Thread(target=run, name="b4b-start", daemon=True)
    self._start_thread.start()

  def _phase(self, name: str, t0: float) -> float:
    t1 = time.perf_counter()
    self.startup[name] = round(t1 - t0, 3)
    return t1

  def open(self, warm_up: bool = False) -> None:
    """Checks the workdir, opens the database, restores snapshot + journal and checks the counters.
    Writes nothing but the database file and the admin token (read-only inspection uses this).
    warm_up: also starts compiling the batch shapes on a thread (joined by serve())."""
    p = self.config.persistence
    t = time.perf_counter()
    check_workdir(self.workdir, int(p.min_free_bytes))
    self.admin_token = admin_token(self.workdir)
    try:
      self.store = store_lib.Store(os.path.join(self.workdir, store_lib.DB_NAME))
    except store_lib.StoreError as e:
      raise errors.StartupError(str(e)) from e
    except OSError as e:
      raise errors.StartupError(f"cannot open the service database in {self.workdir}: {e}") from e
    t = self._phase("open_database_s", t)
    self.encoder = defended.load_encoder(self.encoder_dir)
    t = self._phase("load_encoder_s", t)
    if warm_up and self.config.batching.warm_up:
      # XLA compiles (or loads from the persistent cache) in native code, off the GIL: restoring the
      # snapshot and replaying the journal proceed meanwhile.
      scratch = defended.scratch_api(self.encoder, self.config.defense,
                                     capacity=int(self.config.capacity), shard_rows=self._shard_rows)
      self._warm_thread = threading.Thread(target=self._warm_up, args=(scratch,), name="b4b-warm-up",
                                           daemon=True)
      self._warm_thread.start()
    self._restore()
    t = time.perf_counter()
    self.gate = accounts_lib.Gatekeeper(self.store,
                                        auth_cache_seconds=float(self.config.limits.auth_cache_seconds),
                                        max_rows_per_request=self.limits.max_rows_per_request)
    self._check_counters()
    self.geometry = images_lib.Geometry(defended.preprocessing(self.api))
    self._phase("check_counters_s", t)

  def serve(self) -> None:
    """Starts the batching threads. With batching.serve_during_warm_up (the default) the batch shapes
    go on compiling on their thread meanwhile: a call whose shape is not compiled yet compiles it
    itself (on a restart a persistent-cache hit: tracing plus loading, no XLA compile), so a restart
    answers as soon as the state is restored. Without it, serving waits for every shape."""
    t = time.perf_counter()
    capacity = int(defended.inner(self.api).capacity)
    wait = not bool(self.config.batching.get("serve_during_warm_up", True))
    if self._warm_thread is not None and (wait or capacity != int(self.config.capacity)):
      self._warm_thread.join()
      if self._warm_error is not None:
        raise self._warm_error
    if self._warm_thread is None or capacity != int(self.config.capacity):
      # (a restored state that outgrew config.capacity has other shapes: compile those)
      self._warm_up(defended.scratch_api(self.encoder, self.config.defense, capacity=capacity,
                                         shard_rows=self._shard_rows))
    self._phase("warm_up_wait_s", t)
    b = self.config.batching
    self.batcher = batcher_lib.Batcher(self._compute, self._commit, max_rows=int(b.max_rows),
                                       max_wait_s=float(b.max_wait_ms) / 1000.0,
                                       between_batches=self._maybe_snapshot,
                                       on_batch=self.metrics.on_batch,
                                       max_queued_rows=int(b.max_queued_rows),
                                       max_users=defended.max_users_per_call(self.api))
    self._last_snapshot_time = time.monotonic()
    self.batcher.start()
    self.metrics.up.set(1)
    self.started_at = time.time()

  def _restore(self) -> None:
    root = os.path.join(self.workdir, SNAPSHOTS)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
      if name.startswith(".partial-"):  # an interrupted snapshot: the previous one + journal cover it
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    snaps = snapshot_dirs(self.workdir)
    capacity = int(self.config.capacity)
    t = time.perf_counter()
    if snaps:
      seq, path = snaps[-1]
      try:
        self.api = defended.open_api(self.encoder, self.config.defense, capacity=capacity,
                                     snapshot=path, shard_rows=self._shard_rows)
      except (ValueError, FileNotFoundError) as e:
        raise errors.StartupError(f"the snapshot {path} cannot be restored: {e}. The service will not "
                                  "start from a reset state; restore the snapshot from a backup (or, "
                                  "knowingly, move it away together with service.sqlite)") from e
      saved = defended.defense_fingerprint(defended.inner(self.api).config)
      wanted = defended.defense_fingerprint(self.config.defense)
      if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise errors.StartupError(f"the snapshot {path} was made with another defense config (fields "
                                  f"{diff} differ); serve it with the config it was made with")
      self._snapshot_seq = seq
    else:
      if self.store.last_seq > 0 and self.store.journal_stats()["anchor_seq"] > 0:
        raise errors.StartupError(f"{self.workdir} has no snapshot but its journal starts after entry "
                                  f"{self.store.journal_stats()['anchor_seq']}: the snapshots were lost")
      self.api = defended.open_api(self.encoder, self.config.defense, capacity=capacity,
                                   shard_rows=self._shard_rows)
      self._snapshot_seq = 0
    t = self._phase("restore_snapshot_s", t)
    try:
      replayed, calls = defended.replay_entries(self.api, self.store.read_journal(self._snapshot_seq))
    except store_lib.StoreError as e:
      raise errors.StartupError(str(e)) from e
    except ValueError as e:
      raise errors.StartupError(f"the journal could not be replayed onto the snapshot: {e}") from e
    self._phase("replay_s", t)
    self.startup["replayed_entries"], self.startup["replay_calls"] = replayed, calls
    logging.info("restored snapshot seq %d and replayed %d journal entries in %d calls",
                 self._snapshot_seq, replayed, calls)
    self.metrics.journal_entries.set(replayed)

  def _check_counters(self) -> None:
    stats = defended.stats(self.api)
    db = self.store.accounts()
    for name, a in db.items():
      in_state = stats["users"].get(name, {}).get("num_queries", 0)
      if a["rows"] != in_state:
        raise errors.StartupError(f"account {name!r}: the database counts {a['rows']} answered images, "
                                  f"the restored defense state {in_state}: the snapshot or journal is "
                                  "inconsistent")
    for name in stats["users"]:
      if name not in db:
        raise errors.StartupError(f"the defense state holds user {name!r}, which has no account")
    self._coverage = {n: u["coverage"] for n, u in stats["users"].items()}
    self.metrics.set_coverage(self._coverage)

  def _warm_up(self, scratch) -> None:
    """Compiles every padded batch shape now, on a scratch API, so no user pays for compilation."""
    if not self.config.batching.warm_up:
      return
    t0 = time.perf_counter()
    sizes = defended.padded_sizes(int(self.config.batching.max_rows))
    try:
      defended.warm_up(scratch, sizes, stop=self._stopping)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by serve())
      self._warm_error = e
      logging.exception("warm-up failed (a call compiles its batch shape when it first needs it)")
      return
    if self._stopping.is_set():
      return
    self._phase("warm_up_s", t0)
    logging.info("warm-up compiled batch sizes %s in %.1f s", sizes, time.perf_counter() - t0)

  def stop(self) -> None:
    if self._start_thread is not None and self._start_thread is not threading.current_thread():
      self._start_thread.join()  # a stop during start-up: finish starting (restore, replay) first
    if self._stopping.is_set():
      return
    self._stopping.set()
    self.metrics.up.set(0)
    if self._warm_thread is not None and self._warm_thread is not threading.current_thread():
      self._warm_thread.join(timeout=300)  # it stops after the size compiling now (not torn down
                                           # inside an XLA compile at exit)
    if self.batcher is not None:
      if not self.batcher.broken:
        try:
          self.batcher.run_on_worker(lambda: self._snapshot(force=True)).result(timeout=120)
        except Exception:  # pylint: disable=broad-except
          logging.exception("final snapshot failed (the journal still holds everything)")
      self.batcher.stop()
    if self.store is not None:
      self.store.close()

  # -------------------------------------------------------------------------------- batches
  def _compute(self, users, images):
    return defended.query_mixed(self.api, users, images)

  def _commit(self, users, result, requests) -> int:
    seq = self.store.append_batch(users, result.buckets, requests)  # (timed by the batcher: on_batch)
    cov = {}
    for u, c in zip(users, np.asarray(result.coverage)):
      cov[u] = float(c)
    self.metrics.set_coverage(cov)
    self.metrics.journal_entries.inc()
    return seq

  def _maybe_snapshot(self) -> None:
    p = self.config.persistence
    due = (self.store.last_seq - self._snapshot_seq >= int(p.snapshot_every_entries) or
           (time.monotonic() - self._last_snapshot_time >= float(p.snapshot_every_seconds)))
    if due and self.store.last_seq > self._snapshot_seq:
      self._snapshot()

  def _snapshot(self, force: bool = False) -> Optional[int]:
    """Runs on the compute thread: waits for pending commits, then saves state == journal[:seq]."""
    self.batcher.barrier()
    seq = self.store.last_seq
    if seq == self._snapshot_seq and not force:
      return None
    if seq == self._snapshot_seq and snapshot_dirs(self.workdir):
      return seq
    t0 = time.perf_counter()
    root = os.path.join(self.workdir, SNAPSHOTS)
    partial = os.path.join(root, f".partial-{seq:012d}")
    final = os.path.join(root, f"{seq:012d}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
      defended.save(self.api, partial)
      os.rename(partial, final)
      _fsync_dir(root)
    except OSError as e:
      shutil.rmtree(partial, ignore_errors=True)
      logging.error("snapshot at seq %d failed (%s); the journal keeps growing", seq, e)
      self._last_snapshot_time = time.monotonic()
      return None
    self.store.truncate_journal(seq)
    self.store.checkpoint_wal()
    for old_seq, path in snapshot_dirs(self.workdir):
      if old_seq < seq:
        shutil.rmtree(path, ignore_errors=True)
    self._snapshot_seq = seq
    self._last_snapshot_time = time.monotonic()
    self.metrics.snapshot.observe(time.perf_counter() - t0)
    self.metrics.journal_entries.set(0)
    logging.info("snapshot at seq %d in %.2f s", seq, time.perf_counter() - t0)
    return seq

  # -------------------------------------------------------------------------------- requests
  async def embed(self, account: str, images: np.ndarray) -> Tuple[np.ndarray, int]:
    n = int(images.shape[0])
    self.gate.admit(account, n)
    answered = False
    try:
      future = self.batcher.submit(account, images)
      reps, seq = await asyncio.wrap_future(future)
      answered = True
      return reps, seq
    finally:
      self.gate.settle(account, n, answered=answered)

  @property
  def warming_up(self) -> bool:
    """True while the batch shapes still compile on their thread (calls of a shape not compiled yet
    compile it themselves meanwhile)."""
    return self._warm_thread is not None and self._warm_thread.is_alive()

  @property
  def out_dim(self) -> int:
    return int(defended.inner(self.api).out_dim)

  def account_view(self, account: str) -> dict:
    a = self.store.account(account) or {"rows": 0, "requests": 0, "quota_rows": 0,
                                        "rate_rows_per_s": 0.0}
    return {"account": account, "num_queries": a["rows"], "num_requests": a["requests"],
            "quota_rows": a["quota_rows"] or None, "rate_rows_per_s": a["rate_rows_per_s"] or None}

  def admin_accounts(self) -> dict:
    """Every account with coverage, sigma and counters (provider only: sigma helps thieves)."""
    stats = self.batcher.run_on_worker(lambda: defended.stats(self.api)).result(timeout=60)
    out = {}
    for name, a in self.store.accounts().items():
      u = stats["users"].get(name, {})
      out[name] = {"coverage": u.get("coverage", 0.0), "sigma": u.get("sigma", None),
                   "num_queries": a["rows"], "num_requests": a["requests"],
                   "num_query_batches": u.get("num_query_batches", 0),
                   "quota_rows": a["quota_rows"], "rate_rows_per_s": a["rate_rows_per_s"],
                   "keys": a["keys"]}
    return {"accounts": out, "journal": self.store.journal_stats(), "snapshot_seq": self._snapshot_seq,
            "state_bytes_per_account": stats["state_bytes_per_user"], "capacity": stats["capacity"]}

  def snapshot_now(self) -> Optional[int]:
    return self.batcher.run_on_worker(lambda: self._snapshot(force=True)).result(timeout=300)

  def state_arrays(self) -> Tuple[List[str], dict]:
    """(users in slot order, state arrays); on the worker thread when serving."""
    read = lambda: (defended.inner(self.api).users, defended.state_arrays(self.api))  # noqa: E731
    if self.batcher is None:
      return read()
    return self.batcher.run_on_worker(read).result(timeout=60)

  def close(self) -> None:
    """Closes a service that was only opened (no snapshot written)."""
    if self.store is not None:
      self.store.close()
