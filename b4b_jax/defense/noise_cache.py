"""The image-keyed noise's W cache: hardened.py's Gaussian matrices W(account, sigma level) kept on
device, so that a returning account at the same level reads its W instead of drawing it again.

  cache = NoiseWeightCache(params, config_lib.noise_cache_mib(config), capacity)
  accounts, row_account = distinct_accounts(uids)     # or from the names, as DefendedEncoder does
  weights, index = cache.lookup(accounts, row_account)  # before a call: device pytree, [N] int32
  defense_step(..., noise_weights=weights, noise_weight_index_per_row=index)
  cache.record(accounts, row_account, info["noise_level"])  # after an answered call

Why: W is image_features x D standard normals (0.5 M at 256 x 2048), drawn once per (account, level)
in every call that account makes. With many accounts per batch those draws are most of the served
default's step (64 accounts per batch of 1,024 on the 2-core CPU: 7.4x the hashing matmul drawing
every W, 4.5x reading them all; 1,024 accounts: 78x against 32x; docs/defense.md "Cost").

What is kept: an LRU of entries (one W with its account uid and level), at most `cache_mib` MiB: as
many entries as the API has account slots, within that bound, allocated at the first call and grown
with the slots (`fit`), so the step compiles with the cache once, and for a new cache size only where
it does for a new state size anyway. (Growing from 8 entries by doubling, and no cache arrays before
the first write, recompiled the served step under traffic: benchmarks/serve_load.py stalled for
seconds, p99 latency 3.6 s.)

The level is only known inside the step, so an entry is written for the level of the account's last
answered call: its first call at a level draws W in the step, the next has W written just before it
(the same one draw, in its own device call), and the later ones read it. The step uses an entry only
where its uids and level are the row's own (hardened.keyed_weight_sum), so a stale entry (the
account's level moved on) is never used: values do not depend on the cache. It is derived data: not
saved, empty after a restore; a failed call leaves only correct entries behind.
"""
import collections
import functools
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.defense import hardened
from b4b_jax.defense import keys as keys_lib

# Writes per device call, padding included: one compiled shape (a shape per count of writes compiled
# the writer again under traffic).
_WRITES_PER_CALL = 8
# The level of an empty entry: the one level no group draws W for (sigma 0), so it never matches.
_EMPTY = hardened._NO_NOISE_LEVEL  # pylint: disable=protected-access


class NoiseWeightCache:
  """Host side of the cache: which entry holds which (account uid, level), and the device arrays."""

  def __init__(self, params, cache_mib: float, capacity: int):
    s = params.settings
    self._stream = keys_lib.stream_key(s.seed, "image_noise")
    self._shape = (s.image_features, s.rep_dim)
    uses_weights = s.enabled and s.noise_keying == "per_input" and s.image_weight > 0
    entry_bytes = 4 * s.image_features * s.rep_dim
    self.bound = int(float(cache_mib) * 2**20 // entry_bytes) if uses_weights else 0
    self._capacity = int(capacity)
    self._arrays: Optional[Dict[str, jax.Array]] = None
    # Accounts are their uid as one int, uid[0] << 32 | uid[1].
    self._entry_of: "collections.OrderedDict[int, int]" = collections.OrderedDict()
    self._held: Dict[int, int] = {}  # entry -> the level of the W it holds
    self._last_level: Dict[int, int] = {}  # account -> level of its last answered call

  def entries(self) -> int:
    return 0 if self._arrays is None else int(self._arrays["levels"].shape[0])

  def fit(self, capacity: int) -> None:
    """The API's account slots are now `capacity`: entries allocated grow to min(bound, capacity)."""
    self._capacity = int(capacity)
    if self._arrays is not None and min(self.bound, self._capacity) > self.entries():
      self._grow(min(self.bound, self._capacity))

  def lookup(self, accounts: List[int], row_account: np.ndarray):
    """(device arrays or None, int32 [N] entry per row or None) for a call whose rows belong to
    accounts[row_account[n]] (account_key of each distinct account's uid, in order of first
    appearance): the entries of the call's accounts, first writing W for each account whose last
    answered call's level its entry does not hold yet. None, None without a cache (bound 0)."""
    if not self.bound or not len(accounts):
      return None, None
    if self._arrays is None:  # at the first call, so that the step compiles with the cache once
      self._grow(min(self.bound, self._capacity))
    writes, served = [], set()
    for account in accounts[:self.bound]:  # beyond the bound, a call's other accounts draw
      served.add(account)
      level = self._last_level.get(account)
      entry = self._entry_of.get(account)
      if entry is not None:
        self._entry_of.move_to_end(account)
      if level is None or (entry is not None and self._held.get(entry) == level):
        continue
      if entry is None:
        entry = self._free_entry(served)
        self._entry_of[account] = entry
      writes.append((entry, account, level))
      self._held[entry] = level
    for i in range(0, len(writes), _WRITES_PER_CALL):
      self._write(writes[i:i + _WRITES_PER_CALL])
    entries = np.asarray([self._entry_of.get(a, -1) for a in accounts], np.int32)
    return self._arrays, entries[np.asarray(row_account)]

  def record(self, accounts: List[int], row_account: np.ndarray, levels: np.ndarray) -> None:
    """Notes each account's level after an answered call (levels: info["noise_level"] of its rows)."""
    row_account = np.asarray(row_account)
    first = np.zeros(len(accounts), np.int64)  # each account's first row
    first[row_account[::-1]] = np.arange(len(row_account))[::-1]
    for account, level in zip(accounts, np.asarray(levels)[first].tolist()):
      if level != _EMPTY:  # sigma 0: no W was used
        self._last_level[account] = level

  def _free_entry(self, keep) -> int:
    """An entry for a new account: unused, or the least recently used account's outside `keep`."""
    used = len(self._entry_of)
    if used < self.bound:
      if used >= self.entries():  # more accounts than slots: a caller that does not `fit`
        self._grow(min(self.bound, max(self._capacity, 2 * self.entries())))
      taken = set(self._entry_of.values())
      return next(e for e in range(self.entries()) if e not in taken)
    victim = next(a for a in self._entry_of if a not in keep)  # exists: len(keep) <= bound
    entry = self._entry_of.pop(victim)
    self._held.pop(entry, None)
    return entry

  def _grow(self, size: int) -> None:
    old = self.entries()
    f, dim = self._shape
    grown = {"weights": np.zeros((size - old, f, dim), np.float32),
             "uids": np.zeros((size - old, 2), np.uint32),
             "levels": np.full((size - old,), _EMPTY, np.int32)}
    if self._arrays is None:
      self._arrays = {k: jax.device_put(v) for k, v in grown.items()}
    else:
      self._arrays = {k: jnp.concatenate([self._arrays[k], jax.device_put(v)])
                      for k, v in grown.items()}

  def _write(self, writes) -> None:
    """Draws W(account, level) into each entry in one device call (padded to _WRITES_PER_CALL)."""
    size = _WRITES_PER_CALL
    entries = np.full((size,), -1, np.int32)
    uids = np.zeros((size, 2), np.uint32)
    levels = np.zeros((size,), np.int32)
    for i, (entry, account, level) in enumerate(writes):
      entries[i], uids[i], levels[i] = entry, (account >> 32, account & 0xFFFFFFFF), level
    self._arrays = _write_entries(self._arrays, self._stream, entries, uids, levels)


def account_key(uid) -> int:
  """An account as one int: uid[0] << 32 | uid[1] (uid: its two uint32 words, keys.uid_from_name)."""
  return (int(uid[0]) << 32) | int(uid[1])


def distinct_accounts(uids: np.ndarray) -> Tuple[List[int], np.ndarray]:
  """(account_key of each distinct row uid [N, 2], in order of first appearance; index [N] of each
  row's account among them): the arguments of lookup and record for rows given by uid."""
  uids = np.asarray(uids, np.uint32)
  keys = (uids[:, 0].astype(np.uint64) << np.uint64(32)) | uids[:, 1].astype(np.uint64)
  distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return [int(k) for k in distinct[order]], rank[inverse.reshape(-1)]


@functools.partial(jax.jit, donate_argnums=0)
def _write_entries(arrays, stream, entries, uids, levels):
  f, dim = arrays["weights"].shape[1:]

  def write(i, arrays):
    def draw(arrays):
      weights = hardened.draw_weights(stream, uids[i, 0], uids[i, 1], levels[i], f, dim)
      return {"weights": arrays["weights"].at[entries[i]].set(weights),
              "uids": arrays["uids"].at[entries[i]].set(uids[i]),
              "levels": arrays["levels"].at[entries[i]].set(levels[i])}

    return jax.lax.cond(entries[i] >= 0, draw, lambda arrays: arrays, arrays)

  return jax.lax.fori_loop(0, entries.shape[0], write, arrays)
