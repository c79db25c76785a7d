"""B4B cost function: coverage (percent) -> std of the Gaussian noise added to a representation.

  sigma = lam * (exp(ln(alpha / lam) * coverage / beta) - 1),   clipped at 0     (paper Eq. 1)

so sigma(0) = 0 and sigma(beta) = alpha - lam. Coverage and beta are both in percent (only their ratio
matters). `expm1` keeps the tiny values near zero coverage accurate in float32.

The curve keeps growing exponentially past beta; sigma is capped at MAX_SIGMA_OVER_ALPHA x alpha (the
paper's DINO value at 100 % coverage, 1e9 = 1e6 x alpha), so a user far past beta gets pure noise but
finite numbers (an uncapped exponent overflows float32 to inf, and inf breaks every consumer).
"""
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

# Paper settings (Table 1 / Table 7). They are defaults of `defense_config`, never hard-wired elsewhere.
PRESETS: Dict[str, Dict[str, float]] = {
    "simsiam": {"lam": 1e-6, "alpha": 1.0, "beta": 80.0},
    "dino": {"lam": 1e-6, "alpha": 1000.0, "beta": 60.0},
}


MAX_SIGMA_OVER_ALPHA = 1e6


def noise_std(coverage, lam: float, alpha: float, beta: float):
  """Noise std for `coverage` (percent; Python/numpy scalar or array, or a JAX array, also traced).

  Returns the same kind of value it was given: numpy (float64) for numpy/Python input, a JAX array
  (in the input's float dtype, float32 for integer input) for JAX input.
  """
  if lam <= 0 or alpha <= lam or beta <= 0:
    raise ValueError(f"noise_std needs lam > 0, alpha > lam and beta > 0 (got lam={lam}, "
                     f"alpha={alpha}, beta={beta})")
  rate = float(np.log(alpha / lam)) / float(beta)
  cap = MAX_SIGMA_OVER_ALPHA * alpha
  max_exponent = float(np.log1p(cap / lam))  # exponent at which sigma reaches the cap
  if isinstance(coverage, jax.Array):
    c = coverage if jnp.issubdtype(coverage.dtype, jnp.floating) else coverage.astype(jnp.float32)
    sigma = lam * jnp.expm1(jnp.minimum(rate * c, max_exponent))
    return jnp.clip(sigma, 0.0, cap).astype(c.dtype)
  c = np.asarray(coverage, dtype=np.float64)
  sigma = np.clip(lam * np.expm1(np.minimum(rate * c, max_exponent)), 0.0, cap)
  return sigma if sigma.ndim else float(sigma)
