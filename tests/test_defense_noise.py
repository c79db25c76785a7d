"""The defense's noise generator (b4b_jax/defense/noise.py): distribution and independence.

Each check is a function of samples with a threshold; `test_checks_reject_broken_generators` feeds the
same checks samples of deliberately wrong generators (uniform, slightly too wide, heavy-tailed, rows
sharing a seed, neighbouring columns correlated) and asserts they fail, so the thresholds have teeth.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from b4b_jax.defense import config as config_lib
from b4b_jax.defense import noise as noise_lib
from b4b_jax.defense import state as state_lib
from b4b_jax.defense import step as step_lib

ROWS, DIM = 512, 1024  # 524288 values: moments to ~1e-3, KS statistic to ~2e-3


def _draw(seed=0, rows=ROWS, dim=DIM):
  keys = jax.random.split(jax.random.key(seed), rows)
  return np.asarray(jax.jit(noise_lib.standard_normal, static_argnums=1)(keys, dim), np.float64)


# ------------------------------------------------------------------------------ the checks


def check_moments(z):
  """Mean 0, variance 1, skewness 0, kurtosis 3, each within ~5 standard errors."""
  z = z.ravel()
  n = z.size
  problems = []
  if abs(z.mean()) > 5 / np.sqrt(n):
    problems.append(f"mean {z.mean():.5f}")
  if abs(z.var() - 1) > 5 * np.sqrt(2 / n):
    problems.append(f"variance {z.var():.5f}")
  if abs(scipy.stats.skew(z)) > 5 * np.sqrt(6 / n):
    problems.append(f"skewness {scipy.stats.skew(z):.5f}")
  if abs(scipy.stats.kurtosis(z, fisher=False) - 3) > 5 * np.sqrt(24 / n):
    problems.append(f"kurtosis {scipy.stats.kurtosis(z, fisher=False):.5f}")
  return problems


def check_distribution(z):
  """Kolmogorov-Smirnov against N(0, 1) (p > 1e-3) and the two tails' frequencies beyond 2, 3, 4."""
  z = z.ravel()
  problems = []
  p = scipy.stats.kstest(z, "norm").pvalue
  if p < 1e-3:
    problems.append(f"KS p-value {p:.2e}")
  for c in (2.0, 3.0, 4.0):
    expected = 2 * scipy.stats.norm.sf(c) * z.size
    seen = int(np.sum(np.abs(z) > c))
    if abs(seen - expected) > 5 * np.sqrt(expected) + 2:
      problems.append(f"|z| > {c}: {seen} values, expected {expected:.0f}")
  return problems


def _max_abs_corr(a, b):
  """Largest |Pearson correlation| between paired columns of a and b ([samples, pairs])."""
  a = (a - a.mean(0)) / a.std(0)
  b = (b - b.mean(0)) / b.std(0)
  return float(np.max(np.abs(np.mean(a * b, axis=0))))


def check_independent(a, b, what):
  """Paired samples a, b [S, M] (M independent pairs of S samples) show no correlation: each pair's
  |r| below 5.5 / sqrt(S) (Bonferroni over M), and the pooled r below 5 / sqrt(S M)."""
  s, m = a.shape
  problems = []
  worst = _max_abs_corr(a, b)
  if worst > 5.5 / np.sqrt(s):
    problems.append(f"{what}: max |corr| {worst:.4f} over {m} pairs of {s} samples")
  pooled = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
  if abs(pooled) > 5 / np.sqrt(a.size):
    problems.append(f"{what}: pooled corr {pooled:.5f}")
  return problems


def check_rows_and_columns(z):
  """Neighbouring columns, far columns and neighbouring rows are uncorrelated."""
  return (check_independent(z[:, :-1:2], z[:, 1::2], "columns j, j+1")
          + check_independent(z[:, :z.shape[1] // 2], z[:, z.shape[1] // 2:], "columns j, j+D/2")
          + check_independent(z[:-1:2].T, z[1::2].T, "rows n, n+1"))


# ------------------------------------------------------------------------------ the generator


def test_noise_is_standard_normal():
  z = _draw()
  assert check_moments(z) == []
  assert check_distribution(z) == []
  assert z.dtype == np.float64 and np.all(np.isfinite(z))


def test_noise_rows_and_columns_are_independent():
  assert check_rows_and_columns(_draw(seed=1)) == []


def _words_of_magnitude_bits(m):
  """uint32 words whose 31 magnitude bits are m (t = (m + 1/2) / 2^31) and whose sign bit is 0."""
  return (np.asarray(m, np.uint64) << 1).astype(np.uint32)


def test_inverse_cdf_matches_scipy_ndtri_including_the_far_tail():
  words = np.concatenate([np.arange(0, 2**12, dtype=np.uint64) * 2**20 + 7,   # spread over the range
                          np.arange(0, 64, dtype=np.uint64),                   # the smallest t: far tail
                          2**32 - 1 - np.arange(0, 64, dtype=np.uint64)])      # the other end
  words = words.astype(np.uint32)
  z = np.asarray(noise_lib.normal_from_words(jnp.asarray(words)), np.float64)
  t = ((words >> 1).astype(np.float64) + 0.5) / 2**31
  expected = np.where(words & 1, -1, 1) * -scipy.special.ndtri(t / 2)
  # The polynomials: under 1.5e-6 from the exact quantile anywhere (1.42e-6 the largest seen), the far
  # tail included (where the 31-bit magnitude ends at 6.34 sigma); the sign right wherever |z| is not ~0.
  np.testing.assert_allclose(z, expected, rtol=0, atol=1.5e-6)
  away = np.abs(expected) > 1e-5
  assert np.all(np.sign(z[away]) == np.where(words & 1, -1, 1)[away])
  assert np.abs(z).max() > 6.3


def test_inverse_cdf_is_accurate_and_monotone_over_every_octave():
  """A dense sweep of t (every 1021st magnitude word, about 2.1 million, plus both ends) is within 1.5e-6
  of float64 ndtri everywhere, and |z| never increases with t by more than float32 rounding (the
  polynomials' wiggle), so the transform is monotone wherever neighbouring quantiles differ by more."""
  m = np.concatenate([np.arange(0, 2**31, 1021, dtype=np.uint64), np.arange(0, 4096, dtype=np.uint64),
                      2**31 - 4096 + np.arange(0, 4096, dtype=np.uint64)])
  m = np.unique(m)
  z = np.asarray(noise_lib.normal_from_words(jnp.asarray(_words_of_magnitude_bits(m))), np.float64)
  t = (m.astype(np.float64) + 0.5) / 2**31
  exact = -scipy.special.ndtri(t / 2)
  assert np.abs(z - exact).max() < 1.5e-6
  assert np.all(z >= 0)  # the magnitude polynomial stays non-negative down to t = 1 (|z| = 0)
  assert np.diff(z).max() < 1e-6  # |z| decreasing in t up to rounding
  # Strictly decreasing where neighbours are ~3e-5 apart in t (exact |z| differs by > 1e-5 there; words
  # closer than float32's spacing of t share a t, and so a value, like any float32 transform of t).
  coarse = np.searchsorted(m, np.arange(0, 2**31, 1021 * 64, dtype=np.uint64))
  assert np.all(np.diff(z[coarse]) < 0)


def test_inverse_cdf_polynomials_are_the_fits_they_claim():
  """The import-time fits against their float64 functions, evaluated the module's way in float32:
  log2 on [1, 2) to 4e-7 (float32 coefficients), and |z| of s on [0, sqrt(32)] to 1.3e-6 (an
  independent check of the fitting, on points that are not the fit's nodes)."""
  u = jnp.linspace(-1.0, 1.0, 100001, dtype=jnp.float32)
  u64 = np.asarray(u, np.float64)
  log2 = np.asarray(noise_lib._polynomial(noise_lib._LOG2_COEFFS, u), np.float64)
  assert np.abs(log2 - np.log2((u64 + 3) / 2)).max() < 4e-7
  s = (u64 + 1) * np.sqrt(32.0) / 2
  magnitude = np.asarray(noise_lib._polynomial(noise_lib._MAGNITUDE_COEFFS, u), np.float64)
  assert np.abs(magnitude - -scipy.special.ndtri(np.exp2(-s * s) / 2)).max() < 1.3e-6


def test_row_depends_only_on_its_key_and_rows_never_repeat_words():
  keys = jax.random.split(jax.random.key(3), 8)
  full = np.asarray(noise_lib.standard_normal(keys, 256))
  alone = np.asarray(noise_lib.standard_normal(keys[5:6], 256))
  np.testing.assert_array_equal(full[5:6], alone)     # the row does not see its neighbours
  words = np.asarray(noise_lib.hash_words(noise_lib.row_seeds(keys), 4096))
  assert all(len(np.unique(w)) == 4096 for w in words)  # a bijection of the counter per row


def test_noise_across_users_and_queries_through_the_defense_step():
  """The noise the step adds: one user's consecutive queries, and users in one batch, uncorrelated."""
  d, n, users = 256, 64, 8
  cfg = config_lib.defense_config("simsiam", static_sigma=1.0, num_projections=2, num_hyperplanes=4)
  params = state_lib.make_params(cfg, d)
  state = state_lib.init_state(params, users)
  uids = np.stack([np.array([7, i], np.uint32) for i in range(users)])
  state = state.replace(uids=jnp.asarray(uids))
  reps = jnp.zeros((n * users, d), jnp.float32)   # returned = noise exactly
  slots = jnp.asarray(np.repeat(np.arange(users), n).astype(np.int32))
  queries = []
  for _ in range(4):
    state, out, _ = step_lib.defense_step(params, state, slots, reps)
    queries.append(np.asarray(out, np.float64).reshape(users, n, d))
  q = np.stack(queries)                           # [query, user, row, dim]
  assert check_moments(q) == [] and check_distribution(q) == []
  # Same user, same row rank, consecutive queries; same query, different users.
  assert check_independent(q[:-1].reshape(-1, d).T, q[1:].reshape(-1, d).T, "queries") == []
  assert check_independent(q[:, :-1].reshape(-1, d).T, q[:, 1:].reshape(-1, d).T, "users") == []


# ------------------------------------------------------------------------------ the checks have teeth


def test_checks_reject_broken_generators():
  rng = np.random.default_rng(0)
  shape = (ROWS, DIM)
  uniform = (rng.uniform(size=shape) - 0.5) * np.sqrt(12)       # mean 0, variance 1, not normal
  assert check_distribution(uniform) and check_moments(uniform)
  assert check_moments(rng.normal(size=shape) * 1.01)           # 1% too wide
  t_dist = rng.standard_t(30, size=shape) / np.sqrt(30 / 28)     # variance 1, heavier tails
  assert check_moments(t_dist) or check_distribution(t_dist)
  shared = np.repeat(rng.normal(size=(ROWS // 2, DIM)), 2, axis=0)  # pairs of rows with one seed
  assert check_rows_and_columns(shared)
  z = rng.normal(size=shape)
  z[:, 1::2] = 0.99 * z[:, 1::2] + 0.01 * z[:, ::2] / 0.99        # neighbours correlated at 0.01
  assert check_rows_and_columns(z)
  assert check_rows_and_columns(rng.normal(size=shape)) == []   # and a good generator passes


def _shifted_pairs(hash_fn):
  """Rows a, b whose first seed words differ by the Weyl step (other words random): for a hash keyed
  by k0 alone, b is a shifted by one column. Returns (a[:, 1:], b[:, :-1]) as [S, M] samples."""
  seeds = np.array(noise_lib.row_seeds(jax.random.split(jax.random.key(5), 2 * ROWS)))
  seeds[1::2, 0] = seeds[0::2, 0] + noise_lib._PHI  # pylint: disable=protected-access
  z = np.asarray(noise_lib.normal_from_words(hash_fn(jnp.asarray(seeds), DIM)), np.float64)
  return z[0::2, 1:].T, z[1::2, :-1].T


def test_checks_reject_a_hash_with_too_little_mixing():
  """The real pipeline with its hash weakened: no mixing at all (a Weyl sequence per row), or the three
  rounds keyed by k0 only; the checks catch both, and pass the real hash on the same seeds."""
  keys = jax.random.split(jax.random.key(0), ROWS)
  j = jnp.arange(DIM, dtype=jnp.uint32)[None, :]
  weyl = j * noise_lib._PHI + noise_lib.row_seeds(keys)[:, :1]  # pylint: disable=protected-access
  z = np.asarray(noise_lib.normal_from_words(weyl), np.float64)
  assert check_distribution(z) + check_rows_and_columns(z) + check_moments(z)

  def k0_only(seeds, num_words):
    mix = noise_lib._mix  # pylint: disable=protected-access
    w = jnp.arange(num_words, dtype=jnp.uint32)[None, :]
    return mix(mix(mix(w * noise_lib._PHI + seeds[:, :1])))  # pylint: disable=protected-access

  assert check_independent(*_shifted_pairs(k0_only), "shifted rows")
  assert check_independent(*_shifted_pairs(noise_lib.hash_words), "shifted rows") == []


def test_straight_line_threefry_key_arithmetic_equals_jax_random():
  # keys.fold_in_rows / noise.row_seeds replace vmapped jax.random.fold_in / jax.random.bits (rolled
  # threefry loops on CPU) in the step: they must give the same keys and seed words, bit for bit, or
  # every drawn value changes. Data spans the whole uint32 range and negative int32 (the hardened
  # mode's no-noise level); keys of another implementation take jax.random's own path.
  from b4b_jax.defense import keys as keys_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  stream = keys_lib.stream_key(3, "noise")
  uids = jnp.asarray(rng.integers(0, 2**32, (40, 2), dtype=np.uint64).astype(np.uint32))
  counter = jnp.asarray(rng.integers(-2**31, 2**31, 40), jnp.int32)
  rank = jnp.arange(40, dtype=jnp.int32)
  expected = jax.vmap(lambda u, c, r: jax.random.fold_in(jax.random.fold_in(
      keys_lib.user_key(stream, u), c), r))(uids, counter, rank)
  got = jax.jit(lambda: keys_lib.fold_in_rows(stream, uids[:, 0], uids[:, 1], counter, rank))()
  np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(expected))
  codes = jnp.asarray(rng.integers(0, 4096, (40, 3)), jnp.int32)
  nested = keys_lib.fold_in_rows(got[:, None], jnp.arange(3)[None, :], codes)
  expected_nested = jax.vmap(lambda k, cs: jax.vmap(lambda t, c: jax.random.fold_in(
      jax.random.fold_in(k, t), c))(jnp.arange(3), cs))(expected, codes)
  np.testing.assert_array_equal(jax.random.key_data(nested), jax.random.key_data(expected_nested))
  np.testing.assert_array_equal(
      noise_lib.row_seeds(got), jax.vmap(lambda k: jax.random.bits(k, (3,), jnp.uint32))(expected))
  other = jax.random.key(3, impl="rbg")
  np.testing.assert_array_equal(
      jax.random.key_data(keys_lib.fold_in_rows(other, counter)),
      jax.random.key_data(jax.vmap(lambda c: jax.random.fold_in(other, c))(counter)))
