"""LSH coverage: random-hyperplane bucket ids and bit-packed per-user bucket occupancy.

A representation x falls, in projection p, into the bucket whose id packs the K bits `x @ R_p > 0`
(strict: 0 maps to bit 0), bit k of the id being hyperplane k. Each user has, per projection, one bit per
bucket (2^K bits packed into uint32 words) and a count of occupied buckets; coverage is
100 * mean_p(count_p) / 2^K percent.

OR-ing bits into packed words: XLA scatter has no bitwise-or, but adding a *set of distinct bits that
are not yet set* to a word equals OR-ing them. So the update sorts the batch's (user, bucket) pairs per
projection, keeps the first of each run of equal pairs, drops those whose bit is already set in the
stored word, and scatter-adds the remaining bits (and +1 to the user's count of that projection).
"""
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


def add_buckets(occupancy: jax.Array, counts: jax.Array, user_per_row: jax.Array,
                buckets: jax.Array, num_hyperplanes: int, single_key: Optional[bool] = None):
  """Marks every row's buckets as occupied for its user; returns the new (occupancy, counts).

  Args:
    occupancy: uint32 [U, P, W] packed bits, W = words_per_projection(K).
    counts: int32 [U, P] number of set bits per (user, projection).
    user_per_row: int32 [N]; rows with a value outside [0, U) are ignored (padding, rejected rows).
    buckets: int32 [N, P] from `bucket_ids`.
    num_hyperplanes: K.
    single_key: sort one int32 key user * 2^K + bucket (default when it cannot overflow) or the
      (user, bucket) pair with a two-key sort (same result; for very many users at large K).
  """
  num_users, num_proj, _ = occupancy.shape
  n = buckets.shape[0]
  num_buckets = 1 << num_hyperplanes
  ignored = (user_per_row < 0) | (user_per_row >= num_users)
  users = jnp.where(ignored, num_users, user_per_row).astype(jnp.int32)  # num_users sorts last, dropped
  users_pn = jnp.broadcast_to(users[None, :], (num_proj, n))
  buckets_pn = buckets.T.astype(jnp.int32)
  if single_key is None:
    single_key = (num_users + 1) * num_buckets <= np.iinfo(np.int32).max
  if single_key:
    # One int32 key per (user, bucket): a single-key sort is ~20x faster than a two-key sort on CPU.
    key = jnp.sort(users_pn * num_buckets + buckets_pn, axis=1)
    su, sb = key // num_buckets, key % num_buckets
    first = jnp.concatenate([jnp.ones((num_proj, 1), bool), key[:, 1:] != key[:, :-1]], axis=1)
  else:
    su, sb = jax.lax.sort((users_pn, buckets_pn), dimension=1, num_keys=2)
    first = jnp.concatenate(
        [jnp.ones((num_proj, 1), bool), (su[:, 1:] != su[:, :-1]) | (sb[:, 1:] != sb[:, :-1])], axis=1)
  word = sb >> 5
  bit = jnp.left_shift(jnp.uint32(1), (sb & 31).astype(jnp.uint32))
  proj = jnp.broadcast_to(jnp.arange(num_proj, dtype=jnp.int32)[:, None], (num_proj, n))
  old = occupancy.at[su, proj, word].get(mode="fill", fill_value=0)
  new = first & (su < num_users) & ((old & bit) == 0)
  occupancy = occupancy.at[su, proj, word].add(jnp.where(new, bit, jnp.uint32(0)), mode="drop")
  counts = counts.at[su, proj].add(new.astype(counts.dtype), mode="drop")
  return occupancy, counts


def coverage_percent(counts: jax.Array, num_hyperplanes: int) -> jax.Array:
  """Coverage in percent from int [..., P] occupied-bucket counts: 100 * mean_p(count_p) / 2^K."""
  num_proj = counts.shape[-1]
  scale = 100.0 / (num_proj * float(1 << num_hyperplanes))
  return jnp.sum(counts, axis=-1).astype(jnp.float32) * jnp.float32(scale)


def popcount(occupancy) -> np.ndarray:
  """Host-side int64 [U, P] number of set bits (integrity check of saved/restored state)."""
  occupancy = np.asarray(occupancy)
  return np.bitwise_count(occupancy).sum(axis=-1, dtype=np.int64)
