"""Hardened B4B (config noise_keying="per_input"): answers that do not average away, and the
provider-side stats that flag repeats and sybil overlap.

The paper's noise is drawn fresh for every query (step.py), so a thief that sends one image N times and
averages cuts its error by sqrt(N) while the repeats add no coverage. Here the draw is a function of

  (account, fine input code, sigma level)

so the same account gets the *same* answer for the same or a near-identical input for as long as its
sigma level holds, and distinct inputs or accounts get independent draws:

  fine codes   T = fine_codes independent sign codes of b = fine_code_bits hyperplanes each (secret,
               from the "fine" key stream; through hash_center when set) of the clean representation.
  sigma level  level = ceil(log_r sigma), r = sigma_level_ratio; the sigma applied is r^level >= the
               cost's sigma (never less noise than the paper), so within a level every answer to an
               input is bit-identical; coverage only grows, so an account passes each level once.
  noise        z = (1/sqrt(T)) sum_t N(0, I_D)[key(account, level, t, code_t)], then x + r^level z.
               Each z_i is exactly N(0, 1). A near-duplicate that flips one code keeps (T-1)/T of the
               noise variance in common, so averaging such answers gains at most sqrt(T/(T-1)) per flip
               pattern, not sqrt(N).

What an account learns across levels (the bound, derived in docs/defense.md): one independent draw per
(input, level), with std s_l = s0 r^l; the best unbiased combination of all of them has variance
1 / sum_l s_l^-2 >= s0^2 (1 - r^-2), i.e. an error at most 1/sqrt(1 - r^-2) (1.155x for r=2) below
the best single answer s0. Reusing one standard-normal vector
at two sigmas would reveal x exactly (a1 - a2 = (s1 - s2) z); keying the level into the draw prevents it.

Stats (no extra device work per query beyond one bitset update per row):
  repeats(user) = answers whose hashed fine codes (all T) the account had already been answered for
  (exact repeats and near-duplicates that got the identical noise: they add no coverage); overlap(user) = share of the account's
  occupied coverage buckets that some other account also occupies (what a sybil mapper needs).
"""
import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import lsh
from b4b_jax.defense import noise as noise_lib

_HIGHEST = jax.lax.Precision.HIGHEST
_NO_NOISE_LEVEL = -(1 << 30)  # level of sigma == 0 (no draw is used)


def make_fine_params(settings, center) -> dict:
  """{"fine_projection": (T*b, D), "fine_threshold": (T*b,)} from the "fine" key stream."""
  t, b, d = settings.fine_codes, settings.fine_code_bits, settings.rep_dim
  projection = jax.random.normal(keys_lib.stream_key(settings.seed, "fine"), (t * b, d), jnp.float32)
  out = {"fine_projection": projection, "fine_threshold": lsh.hash_threshold(projection, center)}
  if settings.image_weight > 0:
    g2, f = settings.image_grid ** 2, settings.image_features
    k_omega, k_phase = jax.random.split(keys_lib.stream_key(settings.seed, "image"))
    out["image_omega"] = jax.random.normal(k_omega, (g2, f), jnp.float32) / jnp.float32(
        settings.image_lengthscale)
    out["image_phase"] = jax.random.uniform(k_phase, (f,), jnp.float32, 0.0, 2 * np.pi)
  return out


def image_descriptor(images: jax.Array, grid: int) -> jax.Array:
  """float32 [N, grid*grid]: a flip-invariant, brightness- and contrast-invariant thumbnail of NHWC
  images (uint8 or float, any per-channel affine normalisation): the channel mean, averaged with its
  left-right mirror, area-averaged to grid x grid (each cell the mean of the pixel area it covers,
  fractional pixels weighted), mean removed, unit norm (a flat image gives zeros). Small shifts,
  re-encodings and crops move it little; distinct photos move it far."""
  x = images.astype(jnp.float32)
  gray = jnp.mean(x, axis=-1)
  gray = 0.5 * (gray + gray[:, :, ::-1])
  rows, cols = _area_weights(gray.shape[1], grid), _area_weights(gray.shape[2], grid)
  # Like the encoder's forward pass, these float reductions may round differently (~1e-7 relative) in
  # batches of other shapes: a mixed batch equals per-user calls up to that rounding, not bit for bit.
  thumb = jnp.einsum("iy,nyx,jx->nij", rows, gray, cols, precision=_HIGHEST)
  thumb = thumb.reshape(thumb.shape[0], grid * grid)
  thumb = thumb - jnp.mean(thumb, axis=1, keepdims=True)
  norm = jnp.sqrt(jnp.sum(thumb * thumb, axis=1, keepdims=True))
  return jnp.where(norm > 1e-6, thumb / jnp.maximum(norm, 1e-6), 0.0)


def _area_weights(size: int, grid: int) -> np.ndarray:
  """float32 [grid, size]: row i averages pixels over [i size/grid, (i+1) size/grid) by overlap."""
  edges = np.arange(grid + 1) * size / grid
  lo, hi = np.arange(size)[None, :], np.arange(1, size + 1)[None, :]
  overlap = np.clip(np.minimum(hi, edges[1:, None]) - np.maximum(lo, edges[:-1, None]), 0, None)
  return (overlap * grid / size).astype(np.float32)


# Past this |x| the reduction below loses float32 exactness (k pi/2 with k beyond 2^16).
_MAX_REDUCED_ARGUMENT = 1e5


def cosine(x: jax.Array) -> jax.Array:
  """float32 cos(x), within 1e-7 of float64's (9.2e-8 measured over [-200, 200], XLA's own 3.3e-8).

  XLA's CPU cosine takes ~3 ns a value (0.87 ms for image_noise's [1024, 256]: 0.33x the hashing
  matmul per call at one account per batch); this one vectorises, 50 us: x reduced by k pi/2 in three
  float32 parts (Cody-Waite: exact while |k| < 2^16), then Cephes' minimax polynomials of sin and cos
  on [-pi/4, pi/4], chosen and signed by k mod 4. A call with some |x| past 1e5 (an image_lengthscale
  far below any useful one), or not finite, takes jnp.cos for all of it. The result is materialised
  (a conditional): fused, it would be computed again inside each consumer."""
  x = x.astype(jnp.float32)

  def reduced(x):
    k = jnp.round(x * np.float32(2 / np.pi))
    r = (x - k * np.float32(1.5703125) - k * np.float32(4.837512969970703125e-4)
         - k * np.float32(7.54978995489188216e-8))
    z = r * r
    sin = r + r * z * (np.float32(-1.6666654611e-1) + z * (np.float32(8.3321608736e-3)
                                                          + z * np.float32(-1.9515295891e-4)))
    cos = (1 - np.float32(0.5) * z + z * z * (np.float32(4.166664568298827e-2) + z * (
        np.float32(-1.388731625493765e-3) + z * np.float32(2.443315711809948e-5))))
    quadrant = k.astype(jnp.int32) & 3
    value = jnp.where((quadrant & 1) == 0, cos, sin)
    return jnp.where((quadrant == 1) | (quadrant == 2), -value, value)

  return jax.lax.cond(jnp.max(jnp.abs(x), initial=0.0) < _MAX_REDUCED_ARGUMENT, reduced, jnp.cos, x)


def image_noise(params, uids: jax.Array, level: jax.Array, descriptors: jax.Array, dim: int,
                noise_weights=None, noise_weight_index=None):
  """float32 [N, dim]: per row z = W^T u, u = phi(descriptor) / |phi| (random Fourier features of an
  RBF kernel, unit norm), W [F, dim] i.i.d. N(0, 1) keyed by (account, sigma level) only. Given u, z is
  exactly N(0, I); two inputs' draws have correlation u.u' ~ exp(-|d - d'|^2 / (2 lengthscale^2)):
  near-duplicates share almost all of it, distinct images almost none. Rows at the no-noise level
  (sigma 0: padding, rejected rows) get zeros. noise_weights, noise_weight_index: W's drawn before
  (keyed_weight_sum's cache, cache_index), or None."""
  s = params.settings
  feats = cosine(jax.lax.dot_general(descriptors.astype(jnp.float32), params.image_omega,
                                     (((1,), (0,)), ((), ())), precision=_HIGHEST) + params.image_phase)
  feats = feats / jnp.sqrt(jnp.sum(feats * feats, axis=1, keepdims=True))
  return keyed_weight_sum(keys_lib.stream_key(s.seed, "image_noise"), uids, level, feats, dim,
                          noise_weights, noise_weight_index)


# Rows per matmul when applying one W to a group's rows, largest first: while `size` rows of the group
# remain, [size, F] x [F, dim] matmuls, then the next size; the last (8) may reach back into rows done.
# Per row, [64, F] x [F, dim] took 1.4x as long as [512, F] x [F, dim] (3.44 vs 2.48 ms for 1024 rows on
# the 2-core CPU: one account's 1024 rows in 64-row matmuls were 1.3x the hashing matmul), and a group
# of one row in an 8-row matmul wastes 7 rows' multiply-adds (~30 us at F = 256, dim = 2048). Only sizes
# below the call's N: a loop of N-row matmuls (XLA updates the whole [N, dim] output there by a select,
# not in place) made the step 8x slower at 64 accounts of 16 rows (7.2x -> 58x the floor), where it
# ran no trip.
_ROWS_PER_DOT = (512, 256, 64, 8)


def draw_weights(stream, uid0: jax.Array, uid1: jax.Array, level: jax.Array, f: int,
                 dim: int) -> jax.Array:
  """float32 [F, dim]: the W of one (account, level) (scalars uid0, uid1 uint32 and level int32),
  standard_normal of the key fold_in(fold_in(fold_in(stream, uid0), uid1), level)."""
  key = keys_lib.fold_in_rows(stream, uid0[None], uid1[None], level[None])
  return noise_lib.standard_normal(key, f * dim).reshape(f, dim)


def keyed_weight_sum(stream, uids: jax.Array, level: jax.Array, feats: jax.Array, dim: int,
                     cache=None, cache_index=None) -> jax.Array:
  """float32 [N, dim]: row n is feats[n] @ W(n), W(n) = standard_normal(key_n, F * dim) as [F, dim],
  key_n = fold_in(fold_in(fold_in(stream, uids[n, 0]), uids[n, 1]), level[n]); zeros where level[n] is
  the no-noise level. feats float32 [N, F], uids uint32 [N, 2], level int32 [N].

  W depends on (account, level) only, and within a call all of an account's rows share a level, so W is
  drawn once per distinct (account, level) of the call, not once per row: the rows are sorted by it and
  a loop over the groups draws each group's W (F * dim values: 0.5 M at F = 256, dim = 2048) and applies
  it to the group's rows in matmuls of _ROWS_PER_DOT rows. Drawn per row, a batch of 512 rows from 64
  accounts needed 268 M normal values and a 1 GiB [N, F, dim] buffer (574 ms a call on the 2-core CPU);
  grouped, the worst case (every row another account) draws as many values, without the buffer. The
  values are the per-row formula's up to float32 summation order (tests/test_defense_hardened.py).

  cache: W's already drawn, {"weights": float32 [E, F, dim], "uids": uint32 [E, 2], "levels": int32
  [E]} (noise_cache.py keeps it), and cache_index int32 [N] the entry to look in per row (-1: none). A
  group whose entry's uids and level are its own takes that entry's W instead of drawing it: the same
  values, for a read of F * dim floats instead of drawing them. Any other entry is ignored.
  """
  n, f = feats.shape
  if n == 0:
    return jnp.zeros((0, dim), jnp.float32)
  sizes = [size for size in _ROWS_PER_DOT[:-1] if size < n] + [min(_ROWS_PER_DOT[-1], n)]
  position = jnp.arange(n, dtype=jnp.int32)
  entries = position if cache is None else cache_index.astype(jnp.int32)
  uid0, uid1, lvl, order, entry = jax.lax.sort(
      (uids[:, 0], uids[:, 1], level.astype(jnp.int32), position, entries), num_keys=3)
  first = jnp.concatenate([jnp.ones((1,), bool),
                           (uid0[1:] != uid0[:-1]) | (uid1[1:] != uid1[:-1]) | (lvl[1:] != lvl[:-1])])
  # Group g is sorted rows [starts[g], starts[g + 1]).
  starts = jnp.nonzero(first, size=n + 1, fill_value=n)[0].astype(jnp.int32)
  sorted_feats = feats.astype(jnp.float32)[order]

  def apply_group(g, out):
    start, end = starts[g], starts[g + 1]

    def apply(out, weights):
      def apply_chunks(out, lo_row, hi_row, size):  # rows [lo_row, hi_row), `size` rows per matmul
        def apply_rows(i, out):
          lo = jnp.minimum(lo_row + i * size, n - size)  # the last may reach back into rows done
          z = jnp.dot(jax.lax.dynamic_slice_in_dim(sorted_feats, lo, size), weights,
                      precision=_HIGHEST)
          at = lo + jnp.arange(size, dtype=jnp.int32)
          keep = jax.lax.dynamic_slice_in_dim(out, lo, size)
          return jax.lax.dynamic_update_slice_in_dim(
              out, jnp.where(((at >= lo_row) & (at < hi_row))[:, None], z, keep), lo, 0)

        return jax.lax.fori_loop(0, (hi_row - lo_row + size - 1) // size, apply_rows, out)

      # Which matmuls a row gets depends on its group's size and N alone: a mixed batch equals
      # per-user calls up to the matmuls' float32 rounding.
      lo = start
      for size in sizes[:-1]:
        hi = lo + (end - lo) // size * size
        out = apply_chunks(out, lo, hi, size)
        lo = hi
      return apply_chunks(out, lo, end, sizes[-1])

    def weights():  # the group's W: drawn, or read from a cache entry holding this (account, level)
      def drawn():
        return draw_weights(stream, uid0[start], uid1[start], lvl[start], f, dim)

      if cache is None:
        return drawn()
      at = jnp.clip(entry[start], 0, cache["levels"].shape[0] - 1)
      cached = ((entry[start] >= 0) & (cache["uids"][at, 0] == uid0[start])
                & (cache["uids"][at, 1] == uid1[start]) & (cache["levels"][at] == lvl[start]))
      # A conditional that returns W, not the output: one returning the [N, dim] output inside the
      # no-noise one made XLA copy that output twice per group (64 accounts: slower than drawing).
      return jax.lax.cond(cached, lambda: cache["weights"][at], drawn)

    return jax.lax.cond(lvl[start] != _NO_NOISE_LEVEL, lambda out: apply(out, weights()),
                        lambda out: out, out)

  out = jax.lax.fori_loop(0, jnp.sum(first.astype(jnp.int32)), apply_group,
                          jnp.zeros((n, dim), jnp.float32))
  return jnp.zeros_like(out).at[order].set(out, unique_indices=True)


def fine_codes(params, reps: jax.Array) -> jax.Array:
  """int32 [N, T] fine codes of clean representations [N, D] (bit k of code t = hyperplane t*b+k)."""
  s = params.settings
  scores = jax.lax.dot_general(reps.astype(jnp.float32), params.fine_projection,
                               (((1,), (1,)), ((), ())), precision=_HIGHEST) - params.fine_threshold
  bits = (scores > 0).reshape(reps.shape[0], s.fine_codes, s.fine_code_bits).astype(jnp.int32)
  return jnp.sum(bits << jnp.arange(s.fine_code_bits, dtype=jnp.int32), axis=-1)


def sigma_level(sigma: jax.Array, ratio: float):
  """(int32 level, float32 applied sigma r^level >= sigma); sigma <= 0 -> (sentinel, 0)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  log_r = jnp.float32(np.log(ratio))
  positive = sigma > 0
  level = jnp.ceil(jnp.log(jnp.where(positive, sigma, 1.0)) / log_r)
  applied = jnp.where(positive, jnp.exp(level * log_r), 0.0)
  # exp(ceil(log)) can round just below sigma in float32: never apply less noise than the cost asks.
  applied = jnp.where(applied < sigma, applied * jnp.float32(ratio), applied)
  level = jnp.where(applied < sigma, level + 1, level)
  return jnp.where(positive, level.astype(jnp.int32), _NO_NOISE_LEVEL), applied.astype(jnp.float32)


def input_keyed_noise(params, uids: jax.Array, sigma: jax.Array, reps: jax.Array,
                      descriptors=None, noise_weights=None, noise_weight_index=None):
  """Noise for per_input keying.

  Args: uids uint32 [N, 2] per row; sigma float32 [N] from the cost; reps float32 [N, D] clean;
  descriptors: float32 [N, G*G] image_descriptor of the queried images (image queries with
  image_weight > 0), or None: the fine codes alone; noise_weights, noise_weight_index: the image
  noise's W's drawn before (keyed_weight_sum's cache, cache_index), or None.
  Returns: (applied sigma [N], sigma level [N] (sigma_level), standard-normal noise [N, D], per-row
  keys [N] for other per-answer draws such as debinarize, keyed like the noise so they do not average
  away either).
  """
  s = params.settings
  codes = fine_codes(params, reps)
  level, applied = sigma_level(sigma, s.sigma_level_ratio)
  stream = keys_lib.stream_key(s.seed, "input_noise")
  d = reps.shape[1]

  # Per row and code t: fold_in(fold_in(fold_in(user_key(stream, uid), level), t), code_t) (typed keys
  # [N, T]; keys.fold_in_rows computes the vmapped jax.random.fold_in chain without threefry loops).
  base = keys_lib.fold_in_rows(stream, uids[:, 0], uids[:, 1], level)
  code_keys = keys_lib.fold_in_rows(base[:, None], jnp.arange(s.fine_codes, dtype=jnp.int32)[None, :],
                                    codes)
  # The project's generator (noise.py, as the paper's keying uses), one row of D values per (row, code)
  # key, summed over the codes and scaled by 1/sqrt(T): each draw is a pure function of its key, so the
  # (account, level, code) keying holds.
  if descriptors is not None and s.image_weight == 1:  # all of the variance image-keyed
    noise = image_noise(params, uids, level, descriptors, d, noise_weights, noise_weight_index)
  elif descriptors is not None and s.image_weight > 0:  # independent parts: still exactly N(0, I)
    noise = (jnp.float32(np.sqrt(1.0 - s.image_weight)) * noise_lib.normalized_sum(code_keys, d)
             + jnp.float32(np.sqrt(s.image_weight)) * image_noise(
                 params, uids, level, descriptors, d, noise_weights, noise_weight_index))
  else:
    noise = noise_lib.normalized_sum(code_keys, d)
  row_keys = keys_lib.fold_in_rows(code_keys[:, 0], 1)
  return applied, level, noise, row_keys


def seen_columns(settings) -> int:
  """How many int32 columns the hardened mode appends to a call's charge codes (info["buckets"],
  QueryResult.buckets) after the P LSH buckets: what a journal must keep so that replay writes the
  seen-code state exactly as the live call did. 0 for the paper's keying."""
  return 1 if settings.noise_keying == "per_input" else 0


def seen_codes(params, reps: jax.Array) -> jax.Array:
  """int32 [N, seen_columns] the per-row code `mark_seen` records: all T fine codes hashed into
  fine_code_bits bits, so two inputs count as the same only when every fine code agrees (the noise is
  then identical) or by a 2^-b hash chance. (The first code alone is an LSH bucket: on narrow data
  distinct inputs share it often, and charging repeats would charge those users for nothing.)"""
  s = params.settings
  codes = fine_codes(params, reps).astype(jnp.uint32)
  h = jnp.zeros(codes.shape[:1], jnp.uint32)
  for t in range(s.fine_codes):  # a keyless mix: the codes themselves are secret (secret hyperplanes)
    h = lsh.mix32(h ^ (codes[:, t] + jnp.uint32((0x9E3779B9 * (t + 1)) & 0xFFFFFFFF)))
  return (h >> jnp.uint32(32 - s.fine_code_bits)).astype(jnp.int32)[:, None]


def mark_seen(settings, state, users_w: jax.Array, codes: jax.Array, rows_by_user_order=None):
  """State with every written row's seen code(s) [N, seen_columns] marked as seen by its user (rows
  with users_w outside [0, U) are not written); repeats are num_queries - fine_counts. The live step
  and journal replay both call this (through step.charge), so they write bit-identical state.
  rows_by_user_order: lsh.rows_by_user(users_w, U), when the caller has it."""
  occupancy, counts = lsh.add_buckets(state.fine_occupancy, state.fine_counts, users_w, codes,
                                      settings.fine_code_bits, rows_by_user_order=rows_by_user_order)
  return state.replace(fine_occupancy=occupancy, fine_counts=counts)


def charged_coverage(settings, coverage, num_queries, fine_counts):
  """Coverage (percent) the cost sees with repeat_charge: min(100, coverage + 100 repeat_charge
  repeats / 2^K), repeats = num_queries - distinct seen codes (hashed fine codes). Works on jax and numpy arrays."""
  if not settings.repeat_charge:
    return coverage
  xp = jnp if isinstance(coverage, jax.Array) else np
  repeats = num_queries - fine_counts
  extra = 100.0 * settings.repeat_charge * repeats / float(1 << settings.num_hyperplanes)
  return xp.minimum(100.0, coverage + extra)


def bucket_overlap(occupancy) -> np.ndarray:
  """float64 [U]: per account, the share of its occupied coverage buckets (all projections) that at
  least one other account also occupies (0 for an account with none). Host-side, O(U^2 P W) bits."""
  occ = np.asarray(occupancy)
  own = lsh.popcount(occ).sum(axis=1).astype(np.float64)
  out = np.zeros(occ.shape[0])
  for u in range(occ.shape[0]):
    others = np.bitwise_or.reduce(np.delete(occ, u, axis=0), axis=0) if occ.shape[0] > 1 else (
        np.zeros_like(occ[u]))
    shared = np.bitwise_count(occ[u] & others).sum()
    out[u] = shared / own[u] if own[u] else 0.0
  return out


def provider_stats(api) -> dict:
  """Provider-side flags per account of a DefendedEncoder: repeats (answers whose fine code the account
  had already been answered for), their share, and bucket overlap with the other accounts."""
  state, users = api.state, api.users
  n = len(users)
  queries = np.asarray(state.num_queries)[:n].astype(np.int64)
  overlap = bucket_overlap(np.asarray(state.occupancy)[:n]) if n else np.zeros(0)
  if state.fine_counts is not None:
    distinct = np.asarray(state.fine_counts)[:n, 0].astype(np.int64)
    repeats = queries - distinct
  else:  # paper keying: repeats are not tracked
    repeats = None
  out = {}
  for i, name in enumerate(users):
    row = {"num_queries": int(queries[i]), "bucket_overlap": float(overlap[i])}
    if repeats is not None:
      row["repeats"] = int(repeats[i])
      row["repeat_share"] = float(repeats[i] / queries[i]) if queries[i] else 0.0
    out[name] = row
  return out
