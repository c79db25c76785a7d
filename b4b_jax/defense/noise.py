"""The defense's Gaussian noise: a keyed counter hash and a polynomial inverse CDF.

  standard_normal(row_keys, dim) -> float32 [N, dim], i.i.d. N(0, 1)

Row n's noise is a pure function of row_keys[n] (and dim), so the step keeps its contract: a mixed batch
returns exactly what per-user calls return, and every query gets fresh noise (the step folds the user id,
the user's batch counter and the row's rank into the row key; everything derives from the master seed).

Why not `jax.random.normal` per row: threefry spends 20 rounds of 32-bit arithmetic per two words, in a
separate pass before XLA's erf_inv; on a CPU that cost 3.6-5x the hashing matmul it accompanies. Here:
  * bits: per row, three uint32 seed words drawn from the row's JAX key (one threefry call per row, not
    per value; jax.random.bits' words, computed by keys.bits_data as straight-line ops, see keys.py);
    value j's word is h = mix(mix(mix(j * phi + k0) ^ k1) + k2), mix being the 32-bit finaliser
    lowbias32 (xorshift-multiply; a bijection with near-ideal avalanche). For a fixed row every
    stage is a bijection of j, so a row's words never repeat; seeds of different rows are independent
    threefry outputs.
  * normal: bit 0 of h is the sign, the other 31 bits give t = (h >> 1 + 1/2) / 2^31 in (0, 1], the
    two-sided tail mass, and |z| = -Phi^-1(t / 2), computed without a table or a library log:
    -log2 t is t's float32 exponent plus a degree-7 polynomial of its mantissa, s = sqrt(-log2 t) lies
    in [0, sqrt(32)], and |z| is a degree-18 polynomial of s (|z| is smooth in s at both ends: ~s^2 as
    t -> 1, ~1.18 s in the tail). Both are Chebyshev fits made at import from numpy's log2 and scipy's
    float64 ndtri, evaluated by Estrin's scheme. The transform is within 1.5e-6 of the exact quantile
    (1.42e-6 the largest over every 101st of the 2^31 magnitudes; tests/test_defense_noise.py sweeps
    it); the distribution is continuous (no value set an attacker could enumerate) and the tail is
    kept to |z| = 6.34 (jax.random.normal's 23-bit uniform stops at 5.3).
    History: Giles' erfinv polynomials (XLA's log, sqrt, two 9-term polynomials per value) cost as much
    as the hashing matmul; a 4096-bin table of chords (3.3e-6 from the quantile) replaced them, but its
    lookup is a gather, which LLVM leaves scalar on this CPU, so the whole loop ran scalar. This version
    vectorises (8-wide, no gather). Old vs new interleaved in one process (2-core AMD EPYC, quiet, 60
    calls each): a [1024, 2048] draw 2.66 -> 2.32 ms least, 4.40 -> 3.12 ms median; the hardened
    mode's sum of 4 draws 10.5 -> 9.2 ms least, 17.3 -> 12.3 ms median; values moved by <= 3.9e-6.
    (Session 6 tried a degree-12 Horner version of this: 2.4e-6 from the quantile, and Horner's chain
    of dependent FMAs ran at its latency: 1.15-1.3x slower than Estrin here.)
    Session 17 tried Box-Muller (one log, sqrt and polynomial cosine per pair of values) in a scratch
    copy: slower, because a pair's radius must reach two output columns, and XLA's loop emitter either
    recomputes it per column or needs it broadcast ([N, 2, D/2]: 2.1x this generator's time at
    [1024, 2048]) or concatenated (the words alone 2.2 ms against 0.6). Nor is the degree worth
    cutting: 18 -> 12 (too inaccurate) saves 0.16 of the transform's 1.08 ms; the rest is the words'
    traffic and the log.
  * speed on a CPU: XLA would fuse the hash into the transform's loop, which then ran slower than with
    the words materialised first (a conditional that is always taken: XLA cannot fuse across it); the
    hash's loop also computes t and moves the sign bit into one word (_packed), so the transform's loop
    reads one word per value. Both loops are long dependent chains per 8 values; they run four
    8-lane iterations per trip only where LLVM gets -force-vector-interleave=4 (the served API's
    process, xla_flags.SERVING_FLAGS; the transform 1.38 -> 1.11 ms, the hash 0.72 -> 0.60 ms at
    [1024, 2048]); the served process's iterations have 16 lanes on a CPU with AVX-512 (the same
    flags: the noise alone 0.52-0.61x -> 0.29-0.33x the hashing matmul there).
  The distribution is checked, not assumed: tests/test_defense_noise.py runs moments, a Kolmogorov-Smirnov
  test against N(0, 1), tail frequencies, and correlations across columns, rows, users and queries, with
  thresholds that a broken generator fails, and compares the transform with scipy's ndtri.
"""
import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.defense import keys as keys_lib

_PHI = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: a Weyl step that spreads consecutive counters
_MAX_S = np.sqrt(32.0)  # s = sqrt(-log2 t) <= sqrt(32): t = (m + 1/2) 2^-31 >= 2^-32


def _chebyshev_fit(fn, lo: float, hi: float, degree: int) -> np.ndarray:
  """float32 monomial coefficients (lowest first) in u = (2x - lo - hi) / (hi - lo) of the degree-`degree`
  Chebyshev interpolant of fn on [lo, hi] (least squares at 20,000 Chebyshev nodes, float64)."""
  from numpy.polynomial import chebyshev  # pylint: disable=g-import-not-at-top
  x = np.cos(np.pi * (np.arange(20000) + 0.5) / 20000) * (hi - lo) / 2 + (hi + lo) / 2
  series = chebyshev.chebfit((2 * x - lo - hi) / (hi - lo), fn(x), degree)
  return chebyshev.cheb2poly(series).astype(np.float32)


def _magnitude_of_s(s):
  """|z| = -Phi^-1(t / 2) for t = 2^-(s^2), float64."""
  import scipy.special  # pylint: disable=g-import-not-at-top  (only at import of this module)
  return -scipy.special.ndtri(np.exp2(-s * s) / 2)


# log2(m) for the mantissa m in [1, 2) (u = 2m - 3), and |z| as a function of s in [0, sqrt(32)].
# Degrees 7 and 18: the fewest that keep the whole transform within 1.5e-6 of the exact quantile
# (float32 rounding of |z| <= 6.34 alone is up to 2.4e-7; degree 16 for |z| gives 4.7e-6).
_LOG2_COEFFS = _chebyshev_fit(np.log2, 1.0, 2.0, 7)
_MAGNITUDE_COEFFS = _chebyshev_fit(_magnitude_of_s, 0.0, _MAX_S, 18)


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
  """uint32 words -> float32 N(0, 1) values of the same shape (polynomial inverse CDF, sign from bit 0)."""
  return _normal_from_packed(_packed(h))


def _packed(h: jax.Array) -> jax.Array:
  """uint32: the float32 bits of t = (h >> 1 + 1/2) / 2^31, the two-sided tail mass in (0, 1], with h's
  bit 0 (the value's sign) in bit 31 (t > 0, so its own sign bit is free). Vectorised arithmetic done in
  the hash's loop, so the transform's loop needs fewer ops."""
  t = ((h >> 1).astype(jnp.float32) + 0.5) * np.float32(2.0**-31)
  return jax.lax.bitcast_convert_type(t, jnp.uint32) | (h << 31)


def _polynomial(coeffs: np.ndarray, u: jax.Array) -> jax.Array:
  """sum_k coeffs[k] u^k by Estrin's scheme: pairs c_k + c_k+1 u, then pairs of those joined by u^2,
  u^4, ... The terms are independent, so the vector FMA units overlap them; Horner's single chain of
  dependent FMAs ran at its latency (19 in a row for |z|) and took 1.15-1.3x as long."""
  terms = [coeffs[k] + coeffs[k + 1] * u if k + 1 < len(coeffs) else jnp.full_like(u, coeffs[k])
           for k in range(0, len(coeffs), 2)]
  power = u * u
  while len(terms) > 1:
    terms = [terms[k] + terms[k + 1] * power if k + 1 < len(terms) else terms[k]
             for k in range(0, len(terms), 2)]
    power = power * power
  return terms[0]


def _normal_from_packed(w: jax.Array) -> jax.Array:
  """The N(0, 1) values of _packed words: |z| = P(sqrt(-log2 t)), then w's sign bit."""
  t_bits = w & np.uint32(0x7FFFFFFF)
  exponent = (t_bits >> 23).astype(jnp.int32) - 127  # t = 2^exponent * mantissa, t in (0, 1]
  mantissa = jax.lax.bitcast_convert_type((t_bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000),
                                          jnp.float32)
  # -log2 t >= 0; the clamp absorbs the log polynomial's error (<= 4e-7) near t = 1, where |z| = 0.
  minus_log2_t = jnp.maximum(-exponent.astype(jnp.float32) - _polynomial(_LOG2_COEFFS, 2 * mantissa - 3),
                             0.0)
  s = jnp.sqrt(minus_log2_t)
  magnitude = _polynomial(_MAGNITUDE_COEFFS, s * np.float32(2 / _MAX_S) - 1)
  # The sign: bit 31 of w onto the float's sign bit.
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
