"""Who may query, and how much: API-key authentication (cached), per-account quotas and rate limits.

  gate = Gatekeeper(store, auth_cache_seconds=1.0)
  account = gate.authenticate(key)            # RequestError 401 (no/wrong/revoked key)
  gate.admit(account, rows)                   # RequestError 429 (quota or rate), else reserves rows
  gate.settle(account, rows, answered=True)   # after the batch committed (or failed: released)

A verified key is cached (by sha256 of the whole key) for `auth_cache_seconds`; after that its
revocation status is re-read from the database (a cheap indexed read, no KDF), so a key revoked with the
admin CLI while the server runs stops working within that time, and at once through the admin endpoint.
Quota: total rows an account may ever be answered (0 = no quota); committed rows come from the database
and rows of requests in flight are reserved, so concurrent requests cannot overrun it. Rate: a token
bucket of `rate_rows_per_s` rows per second with a burst of max(2 s of rate, one full request).
"""
import hashlib
import threading
import time
from typing import Dict, Tuple

from b4b_jax.serve import errors
from b4b_jax.serve.store import Store


class Gatekeeper:

  def __init__(self, store: Store, *, auth_cache_seconds: float = 1.0, max_rows_per_request: int = 1):
    self._store = store
    self._ttl = float(auth_cache_seconds)
    self._max_rows = int(max_rows_per_request)
    self._lock = threading.Lock()
    self._cache: Dict[bytes, Tuple[str, str, float]] = {}  # sha256(key) -> (key_id, account, checked)
    self._limits: Dict[str, Tuple[int, float]] = {}
    self._committed: Dict[str, int] = {}
    self._reserved: Dict[str, int] = {}
    self._buckets: Dict[str, Tuple[float, float]] = {}  # account -> (tokens, last refill time)
    self._loaded_at = 0.0
    self.reload()

  def reload(self) -> None:
    """Re-reads limits and committed counters (at start, and after admin changes)."""
    accounts = self._store.accounts()
    with self._lock:
      self._limits = {n: (a["quota_rows"], a["rate_rows_per_s"]) for n, a in accounts.items()}
      self._committed = {n: a["rows"] for n, a in accounts.items()}
      self._loaded_at = time.monotonic()

  def refresh_limits(self, max_age_s: float = 5.0) -> None:
    """Re-reads the limits if older than max_age_s (changes made with the admin CLI)."""
    if time.monotonic() - self._loaded_at < max_age_s:
      return
    accounts = self._store.accounts()
    with self._lock:
      self._limits = {n: (a["quota_rows"], a["rate_rows_per_s"]) for n, a in accounts.items()}
      self._loaded_at = time.monotonic()

  def forget_keys(self) -> None:
    with self._lock:
      self._cache.clear()

  def authenticate(self, key: str) -> str:
    if not key:
      raise errors.unauthorized("missing_key", "no API key: send 'Authorization: Bearer <key>'")
    h = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    now = time.monotonic()
    with self._lock:
      hit = self._cache.get(h)
    if hit is not None:
      key_id, account, checked = hit
      if now - checked < self._ttl:
        return account
      status = self._store.key_status(key_id)
      if status is not None and not status[1]:
        with self._lock:
          self._cache[h] = (key_id, account, now)
        return account
      with self._lock:
        self._cache.pop(h, None)
    try:
      key_id, account = self._store.verify_key(key)
    except ValueError as e:
      if str(e) == "revoked":
        raise errors.unauthorized("revoked_key", "this API key was revoked") from None
      raise errors.unauthorized("invalid_key", "the API key is not valid") from None
    with self._lock:
      self._cache[h] = (key_id, account, now)
      if account not in self._limits:
        self._limits[account] = (0, 0.0)
        self._committed.setdefault(account, 0)
    if account not in self._limits:
      self.reload()
    return account

  def admit(self, account: str, rows: int) -> None:
    with self._lock:
      quota, rate = self._limits.get(account, (0, 0.0))
      used = self._committed.get(account, 0) + self._reserved.get(account, 0)
      if quota and used + rows > quota:
        raise errors.too_many("quota_exceeded", f"account {account!r} has used {used} of its quota of "
                              f"{quota} images; this request needs {rows} more", retry_after=3600)
      if rate > 0:
        burst = max(2.0 * rate, float(self._max_rows))
        now = time.monotonic()
        tokens, last = self._buckets.get(account, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens < rows:
          wait = (rows - tokens) / rate
          self._buckets[account] = (tokens, now)
          raise errors.too_many("rate_limited", f"account {account!r} is limited to {rate:g} images/s; "
                                f"retry in {wait:.2f} s", retry_after=wait)
        self._buckets[account] = (tokens - rows, now)
      self._reserved[account] = self._reserved.get(account, 0) + rows

  def settle(self, account: str, rows: int, *, answered: bool) -> None:
    with self._lock:
      self._reserved[account] = self._reserved.get(account, 0) - rows
      if answered:
        self._committed[account] = self._committed.get(account, 0) + rows
