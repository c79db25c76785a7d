"""A learned denoiser and noise-robust losses for the stolen copy.

Denoiser: the thief knows the published cost function (B4B's noise is additive N(0, sigma^2) with sigma
from the cost), owns a public proxy encoder, and estimates its own sigma from the cost at the coverage it
believes it has (or a canary). It makes (noisy, clean) pairs itself, clean = proxy(x) on its own public
images, noisy = clean + sigma z, and fits the linear minimum-mean-squared-error map noisy -> clean (ridge
regression with an intercept: for Gaussian data this is the Wiener filter mu + C (C + sigma^2 I)^-1 (y -
mu), the best any denoiser does then). Applied to the API's answers before stealing. Caveat it reports:
the proxy's distribution is not the victim's, so the shrinkage is only as good as that match.

Losses (jax, [B, D] stolen vs target -> scalar): mse, cosine (1 - mean cosine), huber (delta relative
to the targets' RMS), infonce (the paper's); all from attacks.losses, where the steal job's
`train.loss` selects them too.
"""
import jax.numpy as jnp
import numpy as np

from b4b_jax.attacks import losses as losses_lib
from b4b_jax.attacks.strategies import base

ROBUST_LOSSES = ("mse", "cosine", "huber", "infonce")


class LinearDenoiser:
  """Fitted with `fit(clean_proxy, sigma)`; `apply(noisy)` -> denoised (numpy float32)."""

  def __init__(self, ridge: float = 1e-6, copies: int = 4, seed: int = 0):
    self.ridge, self.copies, self.seed = ridge, copies, seed
    self.w = self.b = None

  def fit(self, clean, sigma: float) -> "LinearDenoiser":
    clean = np.asarray(clean, np.float64)
    if clean.ndim != 2 or len(clean) < 2 or not np.isfinite(sigma) or sigma < 0:
      raise ValueError(f"denoiser needs [N>=2, D] clean proxy answers and sigma >= 0, got "
                       f"{clean.shape}, {sigma}")
    rng = np.random.default_rng(self.seed)
    y = np.concatenate([clean] * self.copies)
    x = y + sigma * rng.standard_normal(y.shape)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    gram += self.ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    self.w = np.linalg.solve(gram, xc.T @ yc)
    self.b = ym - xm @ self.w
    return self

  def apply(self, noisy) -> np.ndarray:
    if self.w is None:
      raise ValueError("denoiser is not fitted")
    return (np.asarray(noisy, np.float64) @ self.w + self.b).astype(np.float32)


class DenoisedQueryOnce(base.Strategy):
  """QueryOnce whose answers pass through a LinearDenoiser fitted on (proxy answers, sigma)."""
  name = "denoised"

  def __init__(self, api, accounts, *, proxy_clean, sigma: float, seed: int = 0, **kwargs):
    super().__init__(api, accounts, **kwargs)
    self.denoiser = LinearDenoiser(seed=seed).fit(proxy_clean, sigma)

  def steal(self, images01):
    return self.denoiser.apply(self.send(images01))


def robust_loss(name: str, stolen, target, *, delta: float = 1.0, temperature: float = 0.25):
  if name not in ROBUST_LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {ROBUST_LOSSES}")
  stolen, target = jnp.asarray(stolen, jnp.float32), jnp.asarray(target, jnp.float32)
  if stolen.ndim != 2 or stolen.shape != target.shape:
    raise ValueError(f"stolen {stolen.shape} and target {target.shape} must both be [B, D] and equal")
  if name == "infonce":
    return losses_lib.info_nce(stolen, target, temperature=temperature)
  if name == "huber":
    return losses_lib.huber(stolen, target, delta=delta)
  return losses_lib.get_loss(name)(stolen, target)
