"""The service's durable records in one SQLite database (WAL mode): accounts, API keys and the journal.

Tables
  accounts  name, quota_rows (0 = none), rate_rows_per_s (0 = none), and the counters `rows` (images
            answered), `requests`, `batches`, updated in the same transaction as the journal entry.
  keys      key_id (public part of the key), account, salt, pbkdf2-sha256 hash of the secret part,
            created, revoked. A key is `b4b_<key_id>_<secret>`; it is shown once, when created, and only
            its salted hash is stored; verification compares with hmac.compare_digest.
  journal   one row per answered micro-batch: seq, the batch's accounts, each row's account index and
            each row's LSH bucket codes [N, P] (2 bytes per code for K <= 16: P=20 -> 40 bytes per row),
            and a sha256 hash chain (digest_n = sha256(digest_{n-1}, seq, payload)) anchored in `meta`.
  meta      schema version and the journal anchor (seq, digest of the last entry deleted after a
            snapshot).

Durability: `append_batch` is one transaction (journal row + counters) with synchronous=FULL, i.e. one
group commit per micro-batch; the service answers a batch only after it returns. A torn last
transaction (the process died while SQLite wrote it) is dropped by SQLite's own WAL recovery: it never
committed, so it was never acknowledged. Anything else that does not verify (a gap in the sequence, a
hash that does not chain, an unreadable page) is a `StoreError` naming the entry, never skipped.

One connection, used by one thread at a time (a lock); the app calls it from worker threads only.
"""
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

SCHEMA_VERSION = 1
DB_NAME = "service.sqlite"
KEY_PREFIX = "b4b_"
PBKDF2_ITERATIONS = 20_000  # keys are 256-bit random secrets: the KDF only slows offline guessing
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_KEY_RE = re.compile(r"^b4b_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
GENESIS = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
  name TEXT PRIMARY KEY, created REAL NOT NULL, quota_rows INTEGER NOT NULL DEFAULT 0,
  rate_rows_per_s REAL NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0,
  requests INTEGER NOT NULL DEFAULT 0, batches INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS keys (
  key_id TEXT PRIMARY KEY, account TEXT NOT NULL REFERENCES accounts(name), salt BLOB NOT NULL,
  hash BLOB NOT NULL, iterations INTEGER NOT NULL, created REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS journal (
  seq INTEGER PRIMARY KEY, created REAL NOT NULL, users TEXT NOT NULL, row_user BLOB NOT NULL,
  codes BLOB NOT NULL, codes_dtype TEXT NOT NULL, num_rows INTEGER NOT NULL, num_proj INTEGER NOT NULL,
  requests TEXT NOT NULL, digest TEXT NOT NULL);
"""


class StoreError(RuntimeError):
  """The database is damaged or inconsistent (message names the table/entry and what is wrong)."""


class JournalEntry:
  __slots__ = ("seq", "users_per_row", "codes", "requests")

  def __init__(self, seq: int, users_per_row: List[str], codes: np.ndarray, requests: Dict[str, int]):
    self.seq, self.users_per_row, self.codes, self.requests = seq, users_per_row, codes, requests


def validate_account_name(name) -> str:
  if not isinstance(name, str) or not ACCOUNT_NAME.match(name):
    raise ValueError(f"account name {name!r} is invalid: 1-64 characters from letters, digits and "
                     "_ . @ -, starting with a letter or digit")
  return name


def _hash_secret(secret: str, salt: bytes, iterations: int) -> bytes:
  return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


def _digest(prev: str, seq: int, users: str, row_user: bytes, codes: bytes, codes_dtype: str,
            num_proj: int, requests: str) -> str:
  h = hashlib.sha256()
  for part in (prev.encode(), str(seq).encode(), users.encode(), row_user, codes,
               codes_dtype.encode(), str(num_proj).encode(), requests.encode()):
    h.update(len(part).to_bytes(8, "little"))
    h.update(part)
  return h.hexdigest()


class Store:
  """Accounts, keys and the journal in `<workdir>/service.sqlite`."""

  def __init__(self, path: str, *, create: bool = True):
    self.path = os.path.abspath(path)
    if not create and not os.path.exists(self.path):
      raise FileNotFoundError(f"no service database at {self.path}")
    self._lock = threading.Lock()
    try:
      self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("PRAGMA synchronous=FULL")
      self._db.execute("PRAGMA foreign_keys=ON")
      check = self._db.execute("PRAGMA quick_check").fetchall()
      if check != [("ok",)]:
        raise StoreError(f"{self.path} failed SQLite's integrity check: {check[:5]}")
      self._db.executescript(_SCHEMA)
      version = self._meta("schema_version")
      if version is None:
        with self._tx():
          self._set_meta("schema_version", str(SCHEMA_VERSION))
          self._set_meta("journal_anchor", json.dumps([0, GENESIS]))
      elif int(version) != SCHEMA_VERSION:
        raise StoreError(f"{self.path} has schema version {version}; this code reads {SCHEMA_VERSION}")
    except sqlite3.DatabaseError as e:
      raise StoreError(f"{self.path} is not a readable SQLite database (damaged?): {e}") from e
    self._last_seq, self._last_digest = self._tail()

  def close(self) -> None:
    with self._lock:
      self._db.close()

  # --------------------------------------------------------------------------------- helpers
  def _tx(self):
    db = self._db

    class _Tx:
      def __enter__(self_inner):
        db.execute("BEGIN IMMEDIATE")

      def __exit__(self_inner, exc_type, exc, tb):
        if exc_type is None:
          db.execute("COMMIT")
        else:
          db.execute("ROLLBACK")
        return False

    return _Tx()

  def _meta(self, key: str) -> Optional[str]:
    row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else row[0]

  def _set_meta(self, key: str, value: str) -> None:
    self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

  def _anchor(self) -> Tuple[int, str]:
    seq, digest = json.loads(self._meta("journal_anchor"))
    return int(seq), str(digest)

  def _tail(self) -> Tuple[int, str]:
    row = self._db.execute("SELECT seq, digest FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    return self._anchor() if row is None else (int(row[0]), str(row[1]))

  @property
  def last_seq(self) -> int:
    return self._last_seq

  # --------------------------------------------------------------------------------- accounts
  def create_account(self, name: str, *, quota_rows: int = 0, rate_rows_per_s: float = 0.0) -> None:
    validate_account_name(name)
    if int(quota_rows) < 0 or float(rate_rows_per_s) < 0:
      raise ValueError("quota_rows and rate_rows_per_s must be >= 0 (0 = unlimited)")
    with self._lock, self._tx():
      if self._db.execute("SELECT 1 FROM accounts WHERE name=?", (name,)).fetchone():
        raise ValueError(f"account {name!r} already exists")
      self._db.execute("INSERT INTO accounts(name, created, quota_rows, rate_rows_per_s) "
                       "VALUES(?, ?, ?, ?)", (name, time.time(), int(quota_rows), float(rate_rows_per_s)))

  def set_limits(self, name: str, *, quota_rows: Optional[int] = None,
                 rate_rows_per_s: Optional[float] = None) -> None:
    with self._lock, self._tx():
      self._require_account(name)
      if quota_rows is not None:
        self._db.execute("UPDATE accounts SET quota_rows=? WHERE name=?", (int(quota_rows), name))
      if rate_rows_per_s is not None:
        self._db.execute("UPDATE accounts SET rate_rows_per_s=? WHERE name=?",
                         (float(rate_rows_per_s), name))

  def _require_account(self, name: str) -> None:
    if not self._db.execute("SELECT 1 FROM accounts WHERE name=?", (name,)).fetchone():
      raise KeyError(f"no account {name!r}")

  def create_key(self, account: str, *, create_account: bool = True, quota_rows: int = 0,
                 rate_rows_per_s: float = 0.0) -> Tuple[str, str]:
    """Returns (key_id, key). The key is not stored and cannot be shown again."""
    validate_account_name(account)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    digest = _hash_secret(secret, salt, PBKDF2_ITERATIONS)
    with self._lock, self._tx():
      exists = self._db.execute("SELECT 1 FROM accounts WHERE name=?", (account,)).fetchone()
      if not exists:
        if not create_account:
          raise KeyError(f"no account {account!r}")
        self._db.execute("INSERT INTO accounts(name, created, quota_rows, rate_rows_per_s) "
                         "VALUES(?, ?, ?, ?)", (account, time.time(), int(quota_rows),
                                                float(rate_rows_per_s)))
      self._db.execute("INSERT INTO keys(key_id, account, salt, hash, iterations, created) "
                       "VALUES(?, ?, ?, ?, ?, ?)", (key_id, account, salt, digest, PBKDF2_ITERATIONS,
                                                    time.time()))
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"

  def revoke_key(self, key_id: str) -> str:
    """Revokes a key (idempotent); returns its account."""
    with self._lock, self._tx():
      row = self._db.execute("SELECT account FROM keys WHERE key_id=?", (key_id,)).fetchone()
      if row is None:
        raise KeyError(f"no key with id {key_id!r}")
      self._db.execute("UPDATE keys SET revoked=COALESCE(revoked, ?) WHERE key_id=?",
                       (time.time(), key_id))
    return row[0]

  def verify_key(self, key: str) -> Tuple[str, str]:
    """(key_id, account) of a valid key; ValueError('invalid'|'revoked') otherwise (no detail leaks
    whether a key id exists)."""
    m = _KEY_RE.match(key or "")
    key_id, secret = (m.group(1), m.group(2)) if m else ("", "x")
    with self._lock:
      row = self._db.execute("SELECT account, salt, hash, iterations, revoked FROM keys WHERE "
                             "key_id=?", (key_id,)).fetchone()
    if row is None:  # same work as a real check, so timing does not tell which key ids exist
      _hash_secret(secret, b"\0" * 16, PBKDF2_ITERATIONS)
      raise ValueError("invalid")
    account, salt, stored, iterations, revoked = row
    if not hmac.compare_digest(_hash_secret(secret, bytes(salt), int(iterations)), bytes(stored)):
      raise ValueError("invalid")
    if revoked is not None:
      raise ValueError("revoked")
    return key_id, account

  def key_status(self, key_id: str) -> Optional[Tuple[str, bool]]:
    """(account, revoked) of a key id, or None (cheap re-check of a cached verification)."""
    with self._lock:
      row = self._db.execute("SELECT account, revoked FROM keys WHERE key_id=?", (key_id,)).fetchone()
    return None if row is None else (row[0], row[1] is not None)

  def accounts(self) -> Dict[str, dict]:
    with self._lock:
      rows = self._db.execute("SELECT name, created, quota_rows, rate_rows_per_s, rows, requests, "
                              "batches FROM accounts ORDER BY name").fetchall()
      keys = self._db.execute("SELECT key_id, account, created, revoked FROM keys").fetchall()
    out = {}
    for name, created, quota, rate, n, req, batches in rows:
      out[name] = {"created": created, "quota_rows": int(quota), "rate_rows_per_s": float(rate),
                   "rows": int(n), "requests": int(req), "batches": int(batches), "keys": []}
    for key_id, account, created, revoked in keys:
      out[account]["keys"].append({"key_id": key_id, "created": created, "revoked": revoked})
    return out

  def account(self, name: str) -> Optional[dict]:
    with self._lock:
      row = self._db.execute("SELECT quota_rows, rate_rows_per_s, rows, requests, batches FROM "
                             "accounts WHERE name=?", (name,)).fetchone()
    if row is None:
      return None
    return {"quota_rows": int(row[0]), "rate_rows_per_s": float(row[1]), "rows": int(row[2]),
            "requests": int(row[3]), "batches": int(row[4])}

  # --------------------------------------------------------------------------------- journal
  def append_batch(self, users_per_row: Sequence[str], codes: np.ndarray,
                   requests: Dict[str, int]) -> int:
    """Journals one answered micro-batch and adds its counters, in one durable transaction.

    users_per_row: the account of each row; codes: int [N, P] LSH bucket codes; requests: account ->
    number of requests in the batch. Returns the entry's seq.
    """
    codes = np.asarray(codes)
    n = len(users_per_row)
    if codes.ndim != 2 or codes.shape[0] != n:
      raise ValueError(f"codes must be [N={n}, P], got {codes.shape}")
    names = list(dict.fromkeys(users_per_row))
    index = {u: i for i, u in enumerate(names)}
    row_user = np.asarray([index[u] for u in users_per_row], "<u4").tobytes()
    dtype = "<u2" if codes.size == 0 or (codes.min() >= 0 and codes.max() < 1 << 16) else "<i4"
    code_bytes = np.ascontiguousarray(codes.astype(dtype)).tobytes()
    users_json = json.dumps(names)
    requests_json = json.dumps({u: int(requests.get(u, 0)) for u in names}, sort_keys=True)
    rows_per_user = {u: 0 for u in names}
    for u in users_per_row:
      rows_per_user[u] += 1
    with self._lock:
      seq = self._last_seq + 1
      digest = _digest(self._last_digest, seq, users_json, row_user, code_bytes, dtype,
                       int(codes.shape[1]), requests_json)
      with self._tx():
        self._db.execute("INSERT INTO journal(seq, created, users, row_user, codes, codes_dtype, "
                         "num_rows, num_proj, requests, digest) VALUES(?,?,?,?,?,?,?,?,?,?)",
                         (seq, time.time(), users_json, row_user, code_bytes, dtype, n,
                          int(codes.shape[1]), requests_json, digest))
        self._db.executemany(
            "UPDATE accounts SET rows=rows+?, requests=requests+?, batches=batches+1 WHERE name=?",
            [(rows_per_user[u], int(requests.get(u, 0)), u) for u in names])
      self._last_seq, self._last_digest = seq, digest
    return seq

  def read_journal(self, after_seq: int) -> Iterator[JournalEntry]:
    """Verified entries with seq > after_seq, in order (StoreError on any gap or broken hash)."""
    anchor_seq, anchor_digest = self._anchor()
    if after_seq < anchor_seq:
      raise StoreError(f"{self.path}: the journal starts after seq {anchor_seq} (older entries were "
                       f"deleted after a snapshot) but replay must start at seq {after_seq + 1}: the "
                       "snapshot is older than the journal")
    prev_seq, prev_digest = anchor_seq, anchor_digest
    with self._lock:
      try:
        rows = self._db.execute("SELECT seq, users, row_user, codes, codes_dtype, num_rows, num_proj, "
                                "requests, digest FROM journal ORDER BY seq").fetchall()
      except sqlite3.DatabaseError as e:
        raise StoreError(f"{self.path}: the journal table is unreadable: {e}") from e
    last = anchor_seq
    for seq, users_json, row_user, code_bytes, dtype, n, num_proj, requests_json, digest in rows:
      where = f"{self.path}: journal entry {seq}"
      if seq != prev_seq + 1:
        raise StoreError(f"{where} follows entry {prev_seq}: entries are missing")
      expected = _digest(prev_digest, seq, users_json, bytes(row_user), bytes(code_bytes), dtype,
                         int(num_proj), requests_json)
      if not hmac.compare_digest(expected, digest):
        raise StoreError(f"{where} does not match its hash chain: the entry (or one before it) was "
                         "altered or damaged")
      prev_seq, prev_digest, last = seq, digest, seq
      if seq <= after_seq:
        continue
      try:
        names = json.loads(users_json)
        idx = np.frombuffer(bytes(row_user), "<u4")
        codes = np.frombuffer(bytes(code_bytes), dtype).astype(np.int32).reshape(int(n), int(num_proj))
        users_per_row = [names[i] for i in idx]
        requests = {str(k): int(v) for k, v in json.loads(requests_json).items()}
      except (ValueError, IndexError, TypeError) as e:
        raise StoreError(f"{where} cannot be decoded: {e}") from e
      if len(users_per_row) != int(n):
        raise StoreError(f"{where} has {len(users_per_row)} rows, its header says {n}")
      yield JournalEntry(seq, users_per_row, codes, requests)
    if last < after_seq:
      raise StoreError(f"{self.path}: the journal ends at seq {last} but the snapshot covers up to "
                       f"seq {after_seq}: committed journal entries are missing")

  def truncate_journal(self, upto_seq: int) -> None:
    """Deletes entries with seq <= upto_seq (they are inside a durable snapshot); moves the anchor."""
    with self._lock:
      anchor_seq, _ = self._anchor()
      if upto_seq <= anchor_seq:
        return
      row = self._db.execute("SELECT digest FROM journal WHERE seq=?", (upto_seq,)).fetchone()
      if row is None:
        raise StoreError(f"cannot truncate the journal at seq {upto_seq}: no such entry")
      with self._tx():
        self._db.execute("DELETE FROM journal WHERE seq<=?", (upto_seq,))
        self._set_meta("journal_anchor", json.dumps([int(upto_seq), row[0]]))

  def journal_stats(self) -> dict:
    with self._lock:
      n, rows, size = self._db.execute(
          "SELECT COUNT(*), COALESCE(SUM(num_rows), 0), COALESCE(SUM(LENGTH(codes) + "
          "LENGTH(row_user) + LENGTH(users) + LENGTH(requests) + 64), 0) FROM journal").fetchone()
    return {"entries": int(n), "rows": int(rows), "bytes": int(size), "last_seq": self._last_seq,
            "anchor_seq": self._anchor()[0]}

  def checkpoint_wal(self) -> None:
    with self._lock:
      self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
