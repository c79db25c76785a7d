"""LSH coverage: random-hyperplane bucket ids and bit-packed per-user bucket occupancy.

A representation x falls, in projection p, into the bucket whose id packs the K bits `x @ R_p > 0`
(strict: 0 maps to bit 0), bit k of the id being hyperplane k. Each user has, per projection, one bit per
bucket (2^K bits packed into uint32 words) and a count of occupied buckets; coverage is
100 * mean_p(count_p) / 2^K percent.

OR-ing bits into packed words: XLA scatter has no bitwise-or, but adding a *set of distinct bits that
are not yet set* to a word equals OR-ing them. So the update picks one representative row of each
distinct (user, bucket) pair per projection, drops those whose bit is already set in the stored word,
and scatter-adds the remaining bits (and +1 to the user's count of that projection).

The rows are first sorted by user (one single-operand sort of N keys, shared with the step's noise
ranks), so a user's rows are one run and its state is read and written in one place. When no user has
more than 16 rows in the call, a row repeats a pair exactly when one of the 15 rows before it in that
order (fewer for shorter runs: 0 or 3, one compiled branch each) is the same user with the same bucket:
comparisons, no table (with 64 or 1024 users per call the step ran 0.05-0.18x the hashing matmul
faster than with the picking below alone; tested against it). Otherwise, hashed picking, which needs
no sort of the P x N pairs (XLA's CPU sort is a single-threaded comparison sort, and that sort cost
~0.09x the hashing matmul): each pending pair scatter-mins its row index into a table slot hashed from
the pair, reads the winner back, and is settled when the winner holds
the same pair (the winner is then the representative of all of them); pairs whose slot a different
pair won try again with another hash. The first hash is the bucket id itself (plus hashed user bits
above it), so one user's pairs never collide and settle in one round; the few pairs still unsettled
after the last round send the whole call through the sort (same result, any order of representatives
gives the same OR and the same counts).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def make_hyperplanes(key: jax.Array, num_projections: int, rep_dim: int,
                     num_hyperplanes: int) -> jax.Array:
  """(P, D, K) float32 hyperplane normals, i.i.d. N(0, 1), through the origin."""
  return jax.random.normal(key, (num_projections, rep_dim, num_hyperplanes), jnp.float32)


def projection_matrix(hyperplanes: jax.Array) -> jax.Array:
  """The (P*K, D) layout the hashing matmul uses (x @ R for all p as one dot; fastest on CPU)."""
  p, d, k = hyperplanes.shape
  return jnp.transpose(hyperplanes, (0, 2, 1)).reshape(p * k, d)


def words_per_projection(num_hyperplanes: int) -> int:
  return max(1, (1 << num_hyperplanes) // 32)


def hash_threshold(projection: jax.Array, center: Optional[jax.Array] = None) -> jax.Array:
  """[P*K] thresholds so that `x @ R > threshold` equals `(x - center) @ R > 0` (zeros: no centre)."""
  if center is None:
    return jnp.zeros((projection.shape[0],), jnp.float32)
  return jax.lax.dot_general(projection, center.astype(jnp.float32), (((1,), (0,)), ((), ())),
                             precision=_HIGHEST)


def bucket_ids(reps: jax.Array, projection: jax.Array, num_hyperplanes: int,
               threshold: Optional[jax.Array] = None) -> jax.Array:
  """int32 [N, P] bucket id of every representation in every projection.

  threshold: optional [P*K] offsets (see hash_threshold); None hashes through the origin as the paper.
  """
  return buckets_from_scores(hash_scores(reps, projection), num_hyperplanes, threshold)


def hash_scores(reps: jax.Array, projection: jax.Array) -> jax.Array:
  """float32 [N, P*K] x @ R for all projections (the hashing matmul)."""
  # Full float32 precision so a representation's buckets never depend on the device's matmul mode.
  return jax.lax.dot_general(reps, projection, (((1,), (1,)), ((), ())), precision=_HIGHEST)


def buckets_from_scores(scores: jax.Array, num_hyperplanes: int,
                        threshold: Optional[jax.Array] = None) -> jax.Array:
  """int32 [N, P] bucket ids from hash_scores [N, P*K] (see bucket_ids)."""
  n = scores.shape[0]
  k = num_hyperplanes
  if threshold is not None:
    scores = scores - threshold
  bits = (scores > 0).reshape(n, -1, k).astype(jnp.int32)
  return jnp.sum(bits << jnp.arange(k, dtype=jnp.int32), axis=-1)


# Rounds before the sort. Measured at 1024 users x 1024 rows, K=12, P=20 (20 calls): unsettled pairs
# per projection ~118 after round 1, ~1.7 after round 2, none after round 3 (expected ~0.007 per call);
# the 4th round makes the sort fallback practically unreachable there.
_HASH_ROUNDS = 4
_MAX_LOG_SLOTS = 16  # the table is P x 2^16 int32 at most for K <= 16 (the hardened fine codes)
# add_buckets indexes the state flat while every (user, projection, word) fits in one int32 index.
_MAX_FLAT_INDEX = int(np.iinfo(np.int32).max)


def mix32(x):
  """A 32-bit bijection with good avalanche (xorshift-multiply, the lowbias32 constants); uint32 in,
  uint32 out. Also hashes the hardened mode's fine codes (hardened.py)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _sorted_representatives(users_pn, buckets_pn, num_buckets, single_key):
  """bool [P, N]: the first row (in a sort by (user, bucket)) of each distinct pair per projection."""
  num_proj, n = users_pn.shape
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (num_proj, n))
  if single_key:
    # One int32 key per (user, bucket): a single-key sort is ~20x faster than a two-key sort on CPU.
    key, order = jax.lax.sort((users_pn * num_buckets + buckets_pn, rows), dimension=1, num_keys=1)
    first = jnp.concatenate([jnp.ones((num_proj, 1), bool), key[:, 1:] != key[:, :-1]], axis=1)
  else:
    su, sb, order = jax.lax.sort((users_pn, buckets_pn, rows), dimension=1, num_keys=2)
    first = jnp.concatenate(
        [jnp.ones((num_proj, 1), bool), (su[:, 1:] != su[:, :-1]) | (sb[:, 1:] != sb[:, :-1])], axis=1)
  proj = jnp.broadcast_to(jnp.arange(num_proj, dtype=jnp.int32)[:, None], (num_proj, n))
  return jnp.zeros((num_proj, n), bool).at[proj, order].set(first)


def hashed_representatives(users_pn, buckets_pn, pending, num_hyperplanes, rounds, single_key=False):
  """(chosen, unsettled), bool [P, N] each: after `rounds` rounds of hashed picking (module docstring),
  `chosen` holds exactly one row of each settled distinct (user, bucket) pair of a projection among
  the rows `pending` [P, N] marks; `unsettled` marks the pending rows whose pair is not settled yet.
  single_key: every user * 2^K + bucket fits in int32, so a row compares its pair with the winner's as
  one gathered key instead of two (one gather fewer per round)."""
  num_proj, n = users_pn.shape
  # >= 2N slots, and >= 2^K (one user settles in one round) while the table stays small.
  log_t = max(min(num_hyperplanes, _MAX_LOG_SLOTS), (2 * n - 1).bit_length())
  t = 1 << log_t
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (num_proj, n))
  proj = jnp.broadcast_to(jnp.arange(num_proj, dtype=jnp.int32)[:, None], (num_proj, n))
  u32, b32 = users_pn.astype(jnp.uint32), buckets_pn.astype(jnp.uint32)
  user_bits = mix32(u32 ^ jnp.uint32(0x9E3779B9)) << num_hyperplanes if log_t > num_hyperplanes else 0

  # Tables, users and buckets are indexed flat (projection-major), so every scatter and gather takes
  # one int32 index computed inside its own fusion: with [P, N, 2] index arrays XLA built each index
  # array in a fusion of its own first (more ops per round, and the rounds run 3-4 times with many
  # users). A settled row's index is P * t, past the table's end: dropped by the scatter, `n` (no
  # winner) from the gather.
  if single_key:
    pairs = (users_pn * (1 << num_hyperplanes) + buckets_pn,)
  else:
    pairs = (users_pn, buckets_pn)
  pairs_flat = tuple(a.reshape(-1) for a in pairs)

  def one_round(slot, chosen, pending):
    index = jnp.where(pending, proj * t + slot.astype(jnp.int32), num_proj * t)
    table = jnp.full((num_proj * t,), n, jnp.int32).at[index].min(rows, mode="drop")
    winner = jnp.minimum(table.at[index].get(mode="fill", fill_value=n), n - 1)
    winner_flat = proj * n + winner
    same = pending
    for mine, flat in zip(pairs, pairs_flat):
      same = same & (flat[winner_flat] == mine)
    return chosen | (same & (winner == rows)), pending & ~same

  def later_round(carry):  # a fresh hash of the pair per round
    r, chosen, left = carry
    salt = r.astype(jnp.uint32) * jnp.uint32(0x632BE5AB)
    chosen, left = one_round(mix32(mix32(u32 + salt) ^ b32) >> (32 - log_t), chosen, left)
    return r + 1, chosen, left

  chosen = jnp.zeros((num_proj, n), bool)
  if rounds < 1:
    return chosen, pending
  # The first slot is injective on one user's buckets (K <= 16): a single user settles in this round.
  chosen, pending = one_round((b32 | user_bits) & jnp.uint32(t - 1), chosen, pending)
  _, chosen, pending = jax.lax.while_loop(lambda c: (c[0] < rounds) & jnp.any(c[2]), later_round,
                                          (jnp.int32(1), chosen, pending))
  return chosen, pending


def _representatives(users_pn, buckets_pn, pending, num_hyperplanes, single_key, hash_rounds):
  """bool [P, N]: one True among the rows of each distinct (user, bucket) pair of a projection that
  `pending` marks (others may be True too; add_buckets masks them): hashed picking, and the sort for
  the whole call when a pair is left unsettled (hash_rounds=0: the sort alone)."""
  chosen, unsettled = hashed_representatives(users_pn, buckets_pn, pending, num_hyperplanes,
                                             hash_rounds, single_key)
  return jax.lax.cond(jnp.any(unsettled),
                      lambda: _sorted_representatives(users_pn, buckets_pn, 1 << num_hyperplanes,
                                                      single_key),
                      lambda: chosen)


def rows_by_user(users: jax.Array, num_users: int):
  """(order, users[order]): the rows stably sorted by slot; users int32 [N] in [0, num_users].

  One int32 key slot * N + row sorted alone where it cannot overflow: a single-operand sort took 46 us
  at N = 1024 on the 2-core CPU against argsort's 170 us (a key sorted with an index operand), the same
  order; argsort otherwise."""
  n = users.shape[0]
  if (num_users + 1) * n - 1 <= np.iinfo(np.int32).max:
    key = jax.lax.sort(users * n + jnp.arange(n, dtype=jnp.int32))
    return key % n, key // n
  order = jnp.argsort(users, stable=True)
  return order, users[order]


def run_starts(sorted_users: jax.Array) -> jax.Array:
  """bool [N]: where a run of equal values starts in sorted_users [N]."""
  return jnp.concatenate([jnp.ones((1,), bool), sorted_users[1:] != sorted_users[:-1]])


def rank_in_run(sorted_users: jax.Array) -> jax.Array:
  """int32 [N]: each row's position within its run of equal values in sorted_users [N]."""
  positions = jnp.arange(sorted_users.shape[0], dtype=jnp.int32)
  return positions - jax.lax.cummax(jnp.where(run_starts(sorted_users), positions, 0))


def _run_representatives(sorted_users, sorted_buckets, max_run: int):
  """bool [N, P]: rows sorted by user (sorted_users [N], sorted_buckets [N, P]) whose bucket no earlier
  row of the same user has in that projection, provided no user has more than `max_run` rows: each row
  is compared with the max_run - 1 rows before it."""
  n, num_proj = sorted_buckets.shape
  repeated = jnp.zeros((n, num_proj), bool)
  for shift in range(1, min(max_run, n)):
    same = ((sorted_users[shift:] == sorted_users[:-shift])[:, None]
            & (sorted_buckets[shift:] == sorted_buckets[:-shift]))
    repeated = repeated | jnp.concatenate([jnp.zeros((shift, num_proj), bool), same])
  return ~repeated


# Runs (a user's rows in one call) up to which add_buckets finds repeated buckets by comparing each row
# with the ones before it, in rows sorted by user; each a compiled branch, the shortest that fits runs.
# Longer runs take the hashed picking.
_MAX_RUNS = (1, 4, 16)


def add_buckets(occupancy: jax.Array, counts: jax.Array, user_per_row: jax.Array,
                buckets: jax.Array, num_hyperplanes: int, single_key: Optional[bool] = None,
                hash_rounds: int = _HASH_ROUNDS, max_runs=_MAX_RUNS, rows_by_user_order=None):
  """Marks every row's buckets as occupied for its user; returns the new (occupancy, counts).

  Args:
    occupancy: uint32 [U, P, W] packed bits, W = words_per_projection(K).
    counts: int32 [U, P] number of set bits per (user, projection).
    user_per_row: int32 [N]; rows with a value outside [0, U) are ignored (padding, rejected rows).
    buckets: int32 [N, P] from `bucket_ids`.
    num_hyperplanes: K.
    single_key: the hashed picking compares, and the fallback sort sorts, one int32 key
      user * 2^K + bucket (default when it cannot overflow) or the (user, bucket) pair (two gathers per
      round, a two-key sort; same result; very many users at large K).
    hash_rounds: rounds of hashed representative picking before the sort (0: the sort alone; the
      result never depends on it).
    max_runs: when no user has more than max(max_runs) rows in the call, repeated (user, bucket) pairs
      are found by comparing each row with the ones before it in rows sorted by user, up to the
      smallest of max_runs that is at least the longest run, instead of by the hashed picking (():
      the hashed picking always; the result never depends on it).
    rows_by_user_order: rows_by_user(users, U) of the rows' users with every ignored row as U, when
      the caller has it (step.charge), else computed here.
  """
  num_users, num_proj, _ = occupancy.shape
  n = buckets.shape[0]
  ignored = (user_per_row < 0) | (user_per_row >= num_users)
  users = jnp.where(ignored, num_users, user_per_row).astype(jnp.int32)  # num_users: dropped below
  # Rows sorted by user (stable): a user's rows are one run, and its state is read and written in one
  # place (1024 users mixed in 1024 rows, 10 MB of state: in [P, N] order the word gather had missed
  # the TLB at every access).
  order, users = rows_by_user(users, num_users) if rows_by_user_order is None else rows_by_user_order
  buckets = buckets.astype(jnp.int32)[order]
  if single_key is None:
    single_key = (num_users + 1) * (1 << num_hyperplanes) <= np.iinfo(np.int32).max
  writing = users < num_users

  def hashed():
    return _representatives(jnp.broadcast_to(users[None, :], (num_proj, n)), buckets.T,
                            jnp.broadcast_to(writing[None, :], (num_proj, n)), num_hyperplanes,
                            single_key, hash_rounds).T

  if max_runs:
    # The hashed picking's later rounds (users sharing a table slot) and its ~40 small ops cost 0.1-0.2x
    # the hashing matmul with 64 or 1024 users per call; comparing a run's rows costs less.
    runs = sorted(max_runs)
    longest = jnp.max(jnp.where(writing, rank_in_run(users), 0)) + 1
    branch = jnp.searchsorted(jnp.asarray(runs, jnp.int32), longest)  # len(runs): none fits
    first = jax.lax.switch(branch, [functools.partial(_run_representatives, users, buckets, m)
                                    for m in runs] + [hashed])
  else:
    first = hashed()
  users_np = jnp.broadcast_to(users[:, None], (n, num_proj))
  word = buckets >> 5
  bit = jnp.left_shift(jnp.uint32(1), (buckets & 31).astype(jnp.uint32))
  proj = jnp.broadcast_to(jnp.arange(num_proj, dtype=jnp.int32)[None, :], (n, num_proj))
  words = occupancy.shape[2]
  if (num_users + 1) * num_proj * words - 1 <= _MAX_FLAT_INDEX:
    # Flat indices (one int32 per update, see hashed_representatives); an ignored row's user index
    # num_users puts it past the end: read as 0, dropped by the scatters.
    pair = users_np * num_proj + proj
    occupancy_view, at_word = occupancy.reshape(-1), pair * words + word
    counts_view, at_count = counts.reshape(-1), pair
  else:  # per axis: the same updates where a flat index could overflow int32
    occupancy_view, at_word = occupancy, (users_np, proj, word)
    counts_view, at_count = counts, (users_np, proj)
  old = occupancy_view.at[at_word].get(mode="fill", fill_value=0)
  new = first & writing[:, None] & ((old & bit) == 0)
  new_occupancy = occupancy_view.at[at_word].add(jnp.where(new, bit, jnp.uint32(0)), mode="drop")
  new_counts = counts_view.at[at_count].add(new.astype(counts.dtype), mode="drop")
  return new_occupancy.reshape(occupancy.shape), new_counts.reshape(counts.shape)


def coverage_percent(counts: jax.Array, num_hyperplanes: int) -> jax.Array:
  """Coverage in percent from int [..., P] occupied-bucket counts: 100 * mean_p(count_p) / 2^K."""
  num_proj = counts.shape[-1]
  scale = 100.0 / (num_proj * float(1 << num_hyperplanes))
  return jnp.sum(counts, axis=-1).astype(jnp.float32) * jnp.float32(scale)


def popcount(occupancy) -> np.ndarray:
  """Host-side int64 [U, P] number of set bits (integrity check of saved/restored state)."""
  occupancy = np.asarray(occupancy)
  return np.bitwise_count(occupancy).sum(axis=-1, dtype=np.int64)
