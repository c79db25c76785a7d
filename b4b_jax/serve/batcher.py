"""Micro-batching: requests of many accounts gathered into one mixed-user device call, then journaled.

  batcher = Batcher(compute, commit, max_rows=256, max_wait_s=0.004)
  future = batcher.submit(account, images)        # thread-safe; a concurrent.futures.Future
  reps, seq = future.result()                     # resolved only after the batch's journal commit

Two threads, so the device never waits for the disk and the event loop never waits for either:
  * the compute thread takes what is queued (all of it up to `max_rows` rows, waiting at most
    `max_wait_s` for more once the first request is in), runs `compute(users_per_row, images)` (the
    jitted encoder + defense call) and hands the batch to
  * the commit thread, which runs `commit(users_per_row, result, requests)` (one SQLite transaction:
    the group commit) and only then resolves the batch's futures. Batches commit in compute order.
A request is never split across batches. `barrier()` (called on the compute thread between batches, e.g.
to snapshot) waits until every computed batch is committed, so the state then equals the journal.
If `commit` fails, the batch's requests fail and the batcher refuses all further work (`broken`): the
in-memory state counted a batch the journal lacks, so the only safe continuation is a restart (which
replays the journal: the unacknowledged batch is simply not counted).
"""
import collections
import concurrent.futures
import queue
import threading
import time
from typing import Callable, List, Optional

import numpy as np
from absl import logging

from b4b_jax.serve import errors


class _Request:
  __slots__ = ("account", "images", "future", "t_enqueued")

  def __init__(self, account, images):
    self.account = account
    self.images = images
    self.future = concurrent.futures.Future()
    self.t_enqueued = time.perf_counter()


class _Control:
  """A function to run on the compute thread between batches (state reads, snapshots)."""
  __slots__ = ("fn", "future")

  def __init__(self, fn):
    self.fn = fn
    self.future = concurrent.futures.Future()

  def run(self):
    try:
      self.future.set_result(self.fn())
    except BaseException as e:  # pylint: disable=broad-except
      self.future.set_exception(e)


class Batcher:

  def __init__(self, compute: Callable, commit: Callable, *, max_rows: int, max_wait_s: float,
               between_batches: Optional[Callable[[], None]] = None, on_batch=None,
               max_queued_rows: int = 65536, max_users: Optional[int] = None):
    self._compute, self._commit = compute, commit
    self.max_rows, self.max_wait_s = int(max_rows), float(max_wait_s)
    self._between = between_batches
    self._on_batch = on_batch
    self._queue: "queue.Queue[Optional[_Request]]" = queue.Queue()
    self._commits: "queue.Queue" = queue.Queue(maxsize=2)
    self._carry: "collections.deque" = collections.deque()  # taken from the queue, not yet batched
    self._stop = threading.Event()
    self._queued_rows = 0
    self._max_queued_rows = int(max_queued_rows)
    self._max_users = max_users  # distinct accounts one call may hold (matrix transforms' cache)
    self._lock = threading.Lock()
    self.broken: Optional[str] = None
    self._compute_thread = threading.Thread(target=self._compute_loop, name="b4b-compute", daemon=True)
    self._commit_thread = threading.Thread(target=self._commit_loop, name="b4b-commit", daemon=True)

  def start(self) -> None:
    self._compute_thread.start()
    self._commit_thread.start()

  def submit(self, account: str, images: np.ndarray) -> concurrent.futures.Future:
    if self.broken:
      raise errors.ServiceUnavailable(self.broken, retry_after=30)
    if self._stop.is_set():
      raise errors.ServiceUnavailable("the service is shutting down")
    n = int(images.shape[0])
    with self._lock:
      if self._queued_rows + n > self._max_queued_rows:
        raise errors.ServiceUnavailable(f"{self._queued_rows} rows are queued; try again shortly")
      self._queued_rows += n
    request = _Request(account, images)
    self._queue.put(request)
    return request.future

  def run_on_worker(self, fn) -> concurrent.futures.Future:
    """Runs fn() on the compute thread between batches (the only thread that touches the state)."""
    control = _Control(fn)
    self._queue.put(control)
    return control.future

  def stop(self, timeout: float = 30.0) -> None:
    """Finishes what is queued, then stops both threads."""
    self._stop.set()
    self._queue.put(None)
    self._compute_thread.join(timeout)
    self._commit_thread.join(timeout)

  def barrier(self) -> None:
    self._commits.join()

  # ------------------------------------------------------------------------------ compute thread
  def _next(self, timeout: Optional[float]):
    """The oldest carried item, else the queue's next (None: nothing within timeout)."""
    if self._carry:
      return self._carry.popleft()
    try:
      return self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
    except queue.Empty:
      return None

  def _gather(self) -> List[_Request]:
    """The next batch: the oldest request first, then later ones while they fit the row budget.
    A request that does not fit is carried to the next batch (ahead of newer ones), and smaller ones
    behind it may still fill this batch, so batches run close to the padded size they compile to."""
    while True:
      if self._stop.is_set() and not self._carry and self._queue.empty():
        return []
      first = self._next(0.5)
      if first is None:
        if self._between is not None:
          self._between()
        continue
      if isinstance(first, _Control):
        self.barrier()
        first.run()
        continue
      break
    batch, rows, accounts = [first], first.images.shape[0], {first.account}
    skipped = []
    deadline = time.perf_counter() + self.max_wait_s
    while rows < self.max_rows:
      item = self._next(None)
      if item is None:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
          break
        item = self._next(remaining)
        if item is None:
          break
      if isinstance(item, _Control):
        skipped.append(item)
        break
      if rows + item.images.shape[0] > self.max_rows or (
          self._max_users and item.account not in accounts and len(accounts) >= self._max_users):
        skipped.append(item)
        if len(skipped) >= 8:  # do not scan a long queue for fillers
          break
        continue
      accounts.add(item.account)
      batch.append(item)
      rows += item.images.shape[0]
    self._carry.extendleft(reversed(skipped))
    return batch

  def _compute_loop(self) -> None:
    while True:
      batch = self._gather()
      if not batch:
        break
      with self._lock:
        self._queued_rows -= sum(r.images.shape[0] for r in batch)
      if self.broken:
        for r in batch:
          r.future.set_exception(errors.ServiceUnavailable(self.broken, retry_after=30))
        continue
      users = [r.account for r in batch for _ in range(r.images.shape[0])]
      images = batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])
      t0 = time.perf_counter()
      try:
        result = self._compute(users, images)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("batch of %d rows failed in the defended encoder", len(users))
        for r in batch:
          r.future.set_exception(e)
        continue
      self._commits.put((batch, users, result, t0, time.perf_counter()))
      if self._between is not None:
        self._between()
    self._commits.put(None)

  # ------------------------------------------------------------------------------ commit thread
  def _commit_loop(self) -> None:
    while True:
      item = self._commits.get()
      try:
        if item is None:
          return
        batch, users, result, t0, t1 = item
        requests = {}
        for r in batch:
          requests[r.account] = requests.get(r.account, 0) + 1
        try:
          if self.broken:
            raise errors.ServiceUnavailable(self.broken, retry_after=30)
          seq = self._commit(users, result, requests)
        except Exception as e:  # pylint: disable=broad-except
          if not isinstance(e, errors.ServiceUnavailable):
            logging.exception("journal commit failed; refusing further requests until a restart")
            self.broken = (f"the service could not persist its accounting ({type(e).__name__}: {e}); "
                           "nothing was answered for this batch; an operator must restart it")
          for r in batch:
            r.future.set_exception(errors.ServiceUnavailable(self.broken, retry_after=30))
          continue
        t2 = time.perf_counter()
        start = 0
        for r in batch:
          n = r.images.shape[0]
          r.future.set_result((result.reps[start:start + n], seq))
          start += n
        if self._on_batch is not None:
          self._on_batch(len(users), len(batch), t1 - t0, t2 - t1, [t0 - r.t_enqueued for r in batch])
      finally:
        self._commits.task_done()
