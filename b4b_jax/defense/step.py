"""The jitted defense step: count coverage, pick sigma, add noise, apply each user's transform.

  defense_step(params, state, user_index_per_row, reps) -> (state, returned, info)
  replay_step(settings, state, user_index_per_row, codes) -> state   (journal replay)

One call serves a batch whose rows may belong to different users (row n belongs to slot
user_index_per_row[n]; rows with an index outside [0, capacity) are ignored: no state change, zeros
returned). A user's rows within one call are one query batch of that user: they are all counted, then
all get the same sigma, and the user's batch counter advances by one. So a mixed batch returns exactly
what one call per user (in any order) returns, noise included.

Per row, in order:
  1. coverage: the clean representation is hashed and the user's occupancy updated (lsh.add_buckets).
  2. sigma = noise_std(coverage) with the user's coverage *after* this batch is counted (default,
     sigma_from="after", as the original code) or *before* it (sigma_from="before": a fresh user's
     first batch is noise free). static_sigma replaces the cost by a constant.
  3. noise: i.i.d. N(0, sigma^2) per element, key = fold(noise stream, user id, the user's batch
     counter, the row's rank among the user's rows in this call): fresh for every query ever made.
     The values come from noise.standard_normal (a keyed counter hash + a polynomial inverse CDF,
     fused with the add; ~5x cheaper than jax.random.normal per row on a CPU).
     With noise_keying="per_input" hardened.py keys it by (user, input code, sigma level) instead.
  4. the user's transform (transforms.py).
With config.enabled False the clean representation is returned (no noise, no transform, sigma 0) while
coverage and counters are still tracked.

Robustness: if any counted row is not finite, nothing is written (the scatter updates are masked, so the
state stays bit-identical) and info["all_finite"] is False; callers must check it (DefendedEncoder
raises). The state argument is donated.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from b4b_jax.defense import cost
from b4b_jax.defense import hardened
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import lsh
from b4b_jax.defense import noise as noise_lib
from b4b_jax.defense import transforms
from b4b_jax.defense.state import DefenseParams, DefenseState


def charge(state: DefenseState, users_w: jax.Array, codes: jax.Array, settings):
  """Everything a call writes to the state: rows' buckets, the hardened mode's seen codes, and the
  users' query and batch counters.

  users_w: int32 [N] slot per row, `capacity` (or any out-of-range value) for rows that write nothing.
  codes: int32 [N, P + E] the call's charge codes: the P LSH buckets, then the E =
  hardened.seen_columns(settings) seen codes (E = 0 with the paper's keying), i.e. info["buckets"].
  Returns (new state, rank [N] of each row among its user's rows in this call, in row order). Shared by
  the step and by `replay_step`, so replaying a call's codes advances exactly what the call did.
  """
  p = settings.num_projections
  buckets = codes[:, :p]
  n = buckets.shape[0]
  # Rows sorted by user (stable: row order), for the coverage update and each row's rank among its
  # user's rows in this call (the noise key), and the batch counters.
  order, sorted_users = lsh.rows_by_user(users_w, state.occupancy.shape[0])
  occupancy, counts = lsh.add_buckets(state.occupancy, state.counts, users_w, buckets,
                                      settings.num_hyperplanes, rows_by_user_order=(order, sorted_users))
  first = lsh.run_starts(sorted_users)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(lsh.rank_in_run(sorted_users))
  num_batches = state.num_batches.at[sorted_users].add(first.astype(jnp.int32), mode="drop")
  num_queries = state.num_queries.at[users_w].add(1, mode="drop")
  # replace, not a new DefenseState: the hardened mode's fields (fine_occupancy, ...) pass through.
  state = state.replace(occupancy=occupancy, counts=counts, num_batches=num_batches,
                        num_queries=num_queries)
  if hardened.seen_columns(settings):
    state = hardened.mark_seen(settings, state, users_w, codes[:, p:], (order, sorted_users))
  return state, rank


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def replay_step(settings, state: DefenseState, user_index_per_row: jax.Array,
                codes: jax.Array) -> DefenseState:
  """The state after a call whose rows (slot per row; out-of-range slots ignored) had charge codes
  `codes` [N, P + E] int32 (info["buckets"] of that call): bit-identical to what `defense_step` wrote
  for those rows, the hardened mode's seen codes included. settings: the defense's Settings (static).
  State donated."""
  num_users = state.occupancy.shape[0]
  users = user_index_per_row.astype(jnp.int32)
  users_w = jnp.where((users >= 0) & (users < num_users), users, num_users)
  return charge(state, users_w, codes.astype(jnp.int32), settings)[0]


def defense_step_impl(params: DefenseParams, state: DefenseState, user_index_per_row: jax.Array,
                      reps: jax.Array, transform_table: Optional[dict] = None,
                      transform_index_per_row: Optional[jax.Array] = None,
                      image_descriptors: Optional[jax.Array] = None, noise_weights: Optional[dict] = None,
                      noise_weight_index_per_row: Optional[jax.Array] = None):
  """Un-jitted body of `defense_step` (for fusing into a bigger jitted function, e.g. with an encoder).

  Args:
    params: DefenseParams from make_params.
    state: DefenseState (leading user axis U).
    user_index_per_row: int [N] slot of each row.
    reps: float [N, D] clean representations.
    transform_table: per-user transform parameters with a leading axis (transforms.make_table). None:
      derived here from state.uids for all U slots (fine for O(D) transforms and few users; the
      DefendedEncoder caches tables instead).
    transform_index_per_row: int [N] entry of transform_table per row; defaults to the user index.
    image_descriptors: float [N, G*G] hardened.image_descriptor of the queried images, or None (the
      hardened mode's image-keyed noise needs them; every other mode ignores them).
    noise_weights, noise_weight_index_per_row: the image-keyed noise's W's drawn before and the entry
      to look in per row (-1: none; hardened.keyed_weight_sum's cache, cache_index; the DefendedEncoder
      keeps them, noise_cache.py), or None. An entry holds the W the step would draw, so answers do
      not depend on them (up to float32 rounding: the same function of the key, in another program).
  Returns:
    (new state, returned [N, out_dim] float32, info) with info = {"coverage": [N] float32 percent,
    after this batch; "sigma": [N] float32 noise std applied; "all_finite": bool scalar; "buckets":
    [N, P + E] int32 charge codes: the LSH bucket ids the row charged, then (hardened mode only,
    E = hardened.seen_columns) the codes it marked seen; what `replay_step` needs to repeat the call;
    with noise_keying="per_input" also "noise_level": [N] int32, the row's sigma level
    (hardened.sigma_level; which W the image-keyed noise used)}.
  """
  s = params.settings
  num_users = state.occupancy.shape[0]
  n, d = reps.shape
  if d != s.rep_dim:
    raise ValueError(f"representations have dimension {d}, the defense expects {s.rep_dim}")
  reps = reps.astype(jnp.float32)
  users = user_index_per_row.astype(jnp.int32)
  valid = (users >= 0) & (users < num_users)
  scores = lsh.hash_scores(reps, params.projection)
  all_finite = _all_finite(reps, scores, valid)
  # Rows that write state: a single non-finite row rejects the whole call, state untouched.
  writing = valid & all_finite
  users_w = jnp.where(writing, users, num_users)
  slot = jnp.clip(users, 0, num_users - 1)

  # 1. coverage.
  buckets = lsh.buckets_from_scores(scores, s.num_hyperplanes, params.threshold if s.centered else None)
  coverage_before = lsh.coverage_percent(state.counts[slot], s.num_hyperplanes)
  if hardened.seen_columns(s):  # the charge codes a journal keeps: buckets, then the seen codes
    buckets = jnp.concatenate([buckets, hardened.seen_codes(params, reps)], axis=1)
  new_state, rank = charge(state, users_w, buckets, s)
  coverage_after = lsh.coverage_percent(new_state.counts[slot], s.num_hyperplanes)

  zeros = jnp.zeros((n,), jnp.float32)
  if not s.enabled:
    returned = jnp.where(valid[:, None], reps, 0.0)
    info = {"coverage": jnp.where(valid, coverage_after, 0.0), "sigma": zeros,
            "all_finite": all_finite, "buckets": buckets}
    return new_state, returned, info

  # 2. sigma.
  if s.static_sigma is not None:
    sigma = jnp.full((n,), s.static_sigma, jnp.float32)
  else:
    used = coverage_after if s.sigma_from == "after" else coverage_before
    if s.repeat_charge:  # hardened: repeats/near-duplicates charged as new buckets (hardened.py)
      counted = new_state if s.sigma_from == "after" else state
      used = hardened.charged_coverage(s, used, counted.num_queries[slot],
                                       counted.fine_counts[slot, 0])
    sigma = cost.noise_std(used, s.lam, s.alpha, s.beta)
  sigma = jnp.where(valid, sigma, 0.0)

  # 3. noise, keyed by (user id, the user's batch counter before this call, rank in this call).
  uids = state.uids[slot]
  counter = state.num_batches[slot]

  # fold_in(fold_in(user_key(noise_key, uid), counter), rank) per row (keys.fold_in_rows: the same keys
  # as vmapped jax.random.fold_in, as straight-line ops instead of a rolled threefry loop per fold).
  if s.noise_keying == "per_input":
    sigma, noise_level, noise, row_keys = hardened.input_keyed_noise(
        params, uids, sigma, reps, image_descriptors, noise_weights, noise_weight_index_per_row)
    sigma = jnp.where(valid, sigma, 0.0)
  else:
    row_keys = keys_lib.fold_in_rows(params.noise_key, uids[:, 0], uids[:, 1], counter, rank)
    noise = noise_lib.standard_normal(keys_lib.fold_in_rows(row_keys, 0), d)
  noised = reps + sigma[:, None] * noise

  # 4. per-user transform.
  if transform_table is None:
    transform_table = transforms.make_table(s, params.transform_key, state.uids)
    table_index = slot
  else:
    table_index = slot if transform_index_per_row is None else transform_index_per_row.astype(
        jnp.int32)
    if transform_table:
      entries = jax.tree.leaves(transform_table)[0].shape[0]
      table_index = jnp.clip(table_index, 0, entries - 1)
  debinarize_keys = keys_lib.fold_in_rows(row_keys, 1)
  returned = transforms.apply(s, transform_table, table_index, noised, debinarize_keys)
  returned = jnp.where(valid[:, None], returned, 0.0)
  info = {"coverage": jnp.where(valid, coverage_after, 0.0), "sigma": sigma, "all_finite": all_finite,
          "buckets": buckets}
  if s.noise_keying == "per_input":
    info["noise_level"] = noise_level
  return new_state, returned, info


def _all_finite(reps: jax.Array, scores: jax.Array, valid: jax.Array) -> jax.Array:
  """bool scalar: every valid row of reps [N, D] is finite, read off its hashing scores [N, P*K].

  A non-finite value in a row makes every score of that row non-finite (inf * w is +-inf or NaN, NaN
  propagates, and no sum of finite terms cancels them), so finite scores prove finite rows without a
  second pass over reps (that pass cost a third of the hashing matmul). Only when some score is not
  finite (a non-finite row, or finite values so large the dot overflows) is reps itself checked.
  """
  def exact(_):
    return jnp.all(jnp.isfinite(reps) | ~valid[:, None])

  scores_finite = jnp.all(jnp.isfinite(scores) | ~valid[:, None])
  return jax.lax.cond(scores_finite, lambda _: jnp.bool_(True), exact, None)


@functools.partial(jax.jit, donate_argnames=("state",))
def defense_step(params: DefenseParams, state: DefenseState, user_index_per_row: jax.Array,
                 reps: jax.Array, transform_table: Optional[dict] = None,
                 transform_index_per_row: Optional[jax.Array] = None,
                 image_descriptors: Optional[jax.Array] = None, noise_weights: Optional[dict] = None,
                 noise_weight_index_per_row: Optional[jax.Array] = None):
  """Jitted `defense_step_impl` (see there) with `state` donated -> (state, returned, info)."""
  return defense_step_impl(params, state, user_index_per_row, reps, transform_table,
                           transform_index_per_row, image_descriptors, noise_weights,
                           noise_weight_index_per_row)
