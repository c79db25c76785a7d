"""The defense's Gaussian noise: a keyed counter hash and an inverse-CDF transform, one fused XLA loop.

  standard_normal(row_keys, dim) -> float32 [N, dim], i.i.d. N(0, 1)

Row n's noise is a pure function of row_keys[n] (and dim), so the step keeps its contract: a mixed batch
returns exactly what per-user calls return, and every query gets fresh noise (the step folds the user id,
the user's batch counter and the row's rank into the row key; everything derives from the master seed).

Why not `jax.random.normal` per row: threefry spends 20 rounds of 32-bit arithmetic per two words, in a
separate pass before XLA's erf_inv; on a CPU that cost 2-2.6x the hashing matmul it accompanies, more
than the rest of the defense together. Here, in one elementwise loop that XLA fuses with `reps + sigma *
noise`:
  * bits: per row, three uint32 seed words drawn from the row's JAX key (one threefry call per row, not
    per value); value j's word is h = mix(mix(mix(j * phi + k0) ^ k1) + k2), mix being the 32-bit
    finaliser lowbias32 (xorshift-multiply; a bijection with near-ideal avalanche). For a fixed row every
    stage is a bijection of j, so a row's words never repeat; seeds of different rows are independent
    threefry outputs.
  * normal: bit 0 of h is the sign, the other 31 bits give t = (h >> 1 + 1/2) / 2^31 in (0, 1), and
    |z| = sqrt(2) erfinv(1 - t) by Giles' single-precision erfinv ("Approximating the erfinv function",
    GPU Computing Gems, 2011: the polynomials XLA's own erf_inv uses), with w = -log(t (2 - t)) computed
    from t directly, so the tail keeps full relative precision: |z| reaches 6.3 (jax.random.normal's
    23-bit uniform stops at 5.3). The approximation's relative error is ~1e-7; the distribution is
    checked, not assumed: tests/test_defense_noise.py runs moments, a Kolmogorov-Smirnov test against
    N(0, 1), tail frequencies, and correlations across columns, rows, users and queries, with thresholds
    that a broken generator fails.
"""
import jax
import jax.numpy as jnp
import numpy as np

_PHI = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: a Weyl step that spreads consecutive counters
# Giles (2011) single-precision erfinv: p(w) for w < 5 in (w - 2.5), else in (sqrt(w) - 3); highest first.
_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
            -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
         0.00943887047, 1.00167406, 2.83297682)


def _mix(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons, hash-prospector): a 32-bit bijection with low avalanche bias."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def row_seeds(row_keys: jax.Array) -> jax.Array:
  """uint32 [N, 3] hash seeds of typed JAX keys [N] (any PRNG implementation)."""
  return jax.vmap(lambda k: jax.random.bits(k, (3,), jnp.uint32))(row_keys)


def hash_words(seeds: jax.Array, num_words: int) -> jax.Array:
  """uint32 [N, num_words]: the keyed hash of counters 0..num_words-1 under each row's seeds [N, 3]."""
  k0, k1, k2 = (seeds[:, i:i + 1] for i in range(3))
  j = jnp.arange(num_words, dtype=jnp.uint32)[None, :]
  return _mix(_mix(_mix(j * _PHI + k0) ^ k1) + k2)


def _horner(coefficients, x):
  p = jnp.full_like(x, coefficients[0])
  for c in coefficients[1:]:
    p = p * x + np.float32(c)
  return p


def normal_from_words(h: jax.Array) -> jax.Array:
  """uint32 words -> float32 N(0, 1) values of the same shape (inverse CDF, sign from bit 0)."""
  t = ((h >> 1).astype(jnp.float32) + 0.5) * np.float32(2.0**-31)   # 1 - |erf argument|, in (0, 1)
  w = -jnp.log(t * (2.0 - t))                                        # -log(1 - x^2), x = 1 - t
  central = w < 5.0
  s = jnp.where(central, w - 2.5, jnp.sqrt(w) - 3.0)
  p = jnp.where(central, _horner(_CENTRAL, s), _horner(_TAIL, s))
  z = np.float32(np.sqrt(2.0)) * p * (1.0 - t)
  return jnp.where((h & 1) == 1, -z, z)


def standard_normal(row_keys: jax.Array, dim: int) -> jax.Array:
  """float32 [N, dim] i.i.d. N(0, 1); row n is a function of row_keys[n] (typed keys [N]) only."""
  return normal_from_words(hash_words(row_seeds(row_keys), dim))
