"""The defense's Gaussian noise: a keyed counter hash and a tabulated inverse CDF.

  standard_normal(row_keys, dim) -> float32 [N, dim], i.i.d. N(0, 1)

Row n's noise is a pure function of row_keys[n] (and dim), so the step keeps its contract: a mixed batch
returns exactly what per-user calls return, and every query gets fresh noise (the step folds the user id,
the user's batch counter and the row's rank into the row key; everything derives from the master seed).

Why not `jax.random.normal` per row: threefry spends 20 rounds of 32-bit arithmetic per two words, in a
separate pass before XLA's erf_inv; on a CPU that cost 3.6-5x the hashing matmul it accompanies. Here:
  * bits: per row, three uint32 seed words drawn from the row's JAX key (one threefry call per row, not
    per value; jax.random.bits' words, computed by keys.bits_data as straight-line ops, see keys.py); value j's word is h = mix(mix(mix(j * phi + k0) ^ k1) + k2), mix being the 32-bit
    finaliser lowbias32 (xorshift-multiply; a bijection with near-ideal avalanche). For a fixed row every
    stage is a bijection of j, so a row's words never repeat; seeds of different rows are independent
    threefry outputs.
  * normal: bit 0 of h is the sign, the other 31 bits give t = (h >> 1 + 1/2) / 2^31 in (0, 1), the
    two-sided tail mass, and |z| = -Phi^-1(t / 2), read from a table: t's float32 exponent (32 octaves,
    t >= 2^-32) and the top 7 bits of its mantissa pick one of 4096 bins, and inside a bin |z| is the
    straight line through the exact quantiles at the bin's two edges (float64 scipy ndtri, stored as
    intercept and slope). So every bin gets exactly its probability, the distribution is continuous
    (no value set an attacker could enumerate), the tail is kept to |z| = 6.34 (jax.random.normal's
    23-bit uniform stops at 5.3), and the transform's largest error against the exact quantile is
    3.3e-6 (the chord of a convex function over 1/128 of an octave). The previous inverse CDF (Giles'
    erfinv polynomials: log, sqrt, two 9-term polynomials per value) cost as much as the hashing matmul.
  * speed on a CPU: XLA would fuse the hash into the table lookup's loop, where LLVM leaves the hash
    scalar (measured 1.8x slower than the old generator); on CPU the words are materialised first (a
    conditional that is always taken: XLA cannot fuse across it), so the hash vectorises. The lookup's
    loop stays scalar whatever surrounds the gather (LLVM has no fast vector gather for this CPU and
    scalarises the whole loop), so the hash's loop also computes t and moves the sign bit into one
    word (_packed): 13-15% less time for the draw, same values.
  The distribution is checked, not assumed: tests/test_defense_noise.py runs moments, a Kolmogorov-Smirnov
  test against N(0, 1), tail frequencies, and correlations across columns, rows, users and queries, with
  thresholds that a broken generator fails, and compares the transform with scipy's ndtri.
"""
import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.defense import keys as keys_lib

_PHI = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: a Weyl step that spreads consecutive counters
_BIN_BITS = 7  # mantissa bits per octave of t: 128 bins per octave
_OCTAVES = 32  # t = (m + 1/2) 2^-31 >= 2^-32: float32 exponents 95 .. 126
_FIRST_INDEX = (127 - _OCTAVES) << _BIN_BITS  # (biased exponent, mantissa top bits) of t = 2^-32


def _quantile_table():
  """float32 [2, 4096] (intercept, slope) of |z| = -Phi^-1(t / 2) on each bin of t, exact at its edges."""
  import scipy.special  # pylint: disable=g-import-not-at-top  (only at import of this module)
  index = np.arange(_OCTAVES << _BIN_BITS)
  octave, bin_ = index >> _BIN_BITS, index & ((1 << _BIN_BITS) - 1)
  lo = np.ldexp(1.0 + bin_ / 2.0**_BIN_BITS, octave - _OCTAVES)
  hi = np.ldexp(1.0 + (bin_ + 1) / 2.0**_BIN_BITS, octave - _OCTAVES)
  z_lo, z_hi = -scipy.special.ndtri(lo / 2), -scipy.special.ndtri(hi / 2)
  slope = (z_hi - z_lo) / (hi - lo)
  return np.stack([z_lo - slope * lo, slope]).astype(np.float32)


_INTERCEPT, _SLOPE = _quantile_table()


def _mix(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons, hash-prospector): a 32-bit bijection with low avalanche bias."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def row_seeds(row_keys: jax.Array) -> jax.Array:
  """uint32 [N, 3] hash seeds of typed JAX keys [N] (any PRNG implementation): jax.random.bits(k, (3,))
  per key, by keys.bits_data's straight-line threefry where it reproduces jax.random exactly."""
  if keys_lib.fast_keys_apply(row_keys):
    return keys_lib.bits_data(jax.random.key_data(row_keys), 3)
  return jax.vmap(lambda k: jax.random.bits(k, (3,), jnp.uint32))(row_keys)


def hash_words(seeds: jax.Array, num_words: int) -> jax.Array:
  """uint32 [N, num_words]: the keyed hash of counters 0..num_words-1 under each row's seeds [N, 3]."""
  k0, k1, k2 = (seeds[:, i:i + 1] for i in range(3))
  j = jnp.arange(num_words, dtype=jnp.uint32)[None, :]
  return _mix(_mix(_mix(j * _PHI + k0) ^ k1) + k2)


def normal_from_words(h: jax.Array) -> jax.Array:
  """uint32 words -> float32 N(0, 1) values of the same shape (tabulated inverse CDF, sign from bit 0)."""
  return _normal_from_packed(_packed(h))


def _packed(h: jax.Array) -> jax.Array:
  """uint32: the float32 bits of t = (h >> 1 + 1/2) / 2^31, the two-sided tail mass in (0, 1), with h's
  bit 0 (the value's sign) in bit 31 (t > 0, so its own sign bit is free). Vectorised arithmetic done in
  the hash's loop; the lookup's loop, which LLVM leaves scalar (the gather), then needs fewer ops."""
  t = ((h >> 1).astype(jnp.float32) + 0.5) * np.float32(2.0**-31)
  return jax.lax.bitcast_convert_type(t, jnp.uint32) | (h << 31)


def _normal_from_packed(w: jax.Array) -> jax.Array:
  """The N(0, 1) values of _packed words: |z| from the table at t's bin, then w's sign bit."""
  t_bits = w & np.uint32(0x7FFFFFFF)
  t = jax.lax.bitcast_convert_type(t_bits, jnp.float32)
  index = (t_bits >> (23 - _BIN_BITS)).astype(jnp.int32) - _FIRST_INDEX
  magnitude = (jnp.asarray(_INTERCEPT).at[index].get(mode="promise_in_bounds")
               + jnp.asarray(_SLOPE).at[index].get(mode="promise_in_bounds") * t)
  # The sign: bit 31 of w onto the float's sign bit (|z| > 0 always).
  return jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(magnitude, jnp.uint32) ^ (w & np.uint32(0x80000000)), jnp.float32)


def _materialized_words(seeds: jax.Array, num_words: int) -> jax.Array:
  """_packed(hash_words), computed in its own loop on CPU (see the module docstring): the branch of a
  conditional whose predicate XLA cannot fold, but is always true (k0 | 1 is odd, never 0)."""
  if jax.default_backend() != "cpu":
    return _packed(hash_words(seeds, num_words))
  always = (seeds[0, 0] | np.uint32(1)) != np.uint32(0) if seeds.shape[0] else jnp.bool_(True)
  return jax.lax.cond(always, lambda s: _packed(hash_words(s, num_words)),
                      lambda s: jnp.zeros((s.shape[0], num_words), jnp.uint32), seeds)


def standard_normal(row_keys: jax.Array, dim: int) -> jax.Array:
  """float32 [N, dim] i.i.d. N(0, 1); row n is a function of row_keys[n] (typed keys [N]) only."""
  return _normal_from_packed(_materialized_words(row_seeds(row_keys), dim))


def normalized_sum(row_keys: jax.Array, dim: int) -> jax.Array:
  """float32 [N, dim]: sum_t standard_normal(row_keys[:, t], dim) / sqrt(T) for typed keys [N, T] (so
  exactly N(0, 1) again); row n a function of row_keys[n] only (hardened.py's per-input noise, T =
  fine_codes). The draws are added one at a time in a loop, so one [N, dim] buffer of words is live at a
  time: materialising all T draws (or their words) at once made XLA's temporary buffer 32 MiB at T=4,
  N=1024, D=2048, past glibc's largest mmap threshold, and every call page-faulted it in afresh (8,400
  minor faults per call, counted with getrusage; 0 for one [N, dim] buffer)."""
  n, t = row_keys.shape
  seeds = row_seeds(row_keys.reshape(n * t)).reshape(n, t, 3)

  def add_draw(i, total):
    return total + _normal_from_packed(_materialized_words(seeds[:, i], dim))

  total = jax.lax.fori_loop(1, t, add_draw, _normal_from_packed(_materialized_words(seeds[:, 0], dim)))
  return total * np.float32(1.0 / np.sqrt(t))
