"""Closed-form (ridge) least squares: the one solver behind the ridge probe, the closed-form ("lstsq")
mapper between accounts and the demo's fidelity score.

`fit(x, t, alphas)` yields, for each alpha, (alpha, w, b) minimising

    |t - x w - b|^2 + alpha * s * |w|^2

with the intercept b unpenalised; s is the mean eigenvalue of the centred Gram matrix (relative=True:
one grid of strengths fits every representation scale) or 1 (relative=False). One eigendecomposition
serves every alpha. `Moments` are the sufficient statistics, so callers can subtract a subset's moments
(the ridge probe's validation rows) instead of recomputing all of them.
"""
import dataclasses
from typing import Iterator, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Moments:
  """Float64 sums over a set of rows: n, sum x, sum t, sum x x^T, sum x t^T."""
  n: int
  sx: np.ndarray
  st: np.ndarray
  sxx: np.ndarray
  sxt: np.ndarray

  def __sub__(self, other):
    return Moments(self.n - other.n, self.sx - other.sx, self.st - other.st, self.sxx - other.sxx,
                   self.sxt - other.sxt)


def moments(x: np.ndarray, t: np.ndarray) -> Moments:
  """Moments of rows x [N, D] (centre them first) and targets t [N, C].

  float32 x: x x^T (the one costly product, N D^2) runs through JAX at full float32 precision, on the
  accelerator when there is one. float64 x: numpy float64 throughout (small, exact fits).
  """
  t = np.asarray(t, np.float64)
  if x.dtype == np.float64:
    sxx = x.T @ x
  else:
    x = np.asarray(x, np.float32)
    sxx = np.asarray(jnp.matmul(jnp.asarray(x.T), jnp.asarray(x), precision=jax.lax.Precision.HIGHEST),
                     np.float64)
  x64 = x.astype(np.float64)
  return Moments(len(x), x64.sum(0), t.sum(0), sxx, x64.T @ t)


def solve(m: Moments, alphas: Sequence[float], *,
          relative: bool = True) -> Iterator[Tuple[float, np.ndarray, np.ndarray]]:
  """(alpha, w [D, C], b [C]) for every alpha, from one eigendecomposition of the centred Gram."""
  mean_x, mean_t = m.sx / m.n, m.st / m.n
  gram = m.sxx - m.n * np.outer(mean_x, mean_x)
  cross = m.sxt - m.n * np.outer(mean_x, mean_t)
  evals, evecs = np.linalg.eigh(gram)
  evals = np.maximum(evals, 0.0)
  proj = evecs.T @ cross
  scale = max(float(evals.mean()), 1e-300) if relative else 1.0
  for alpha in alphas:
    w = evecs @ (proj / (evals + alpha * scale)[:, None])
    yield alpha, w, mean_t - mean_x @ w


def fit(x: np.ndarray, t: np.ndarray, alphas: Sequence[float], *,
        relative: bool = True) -> Iterator[Tuple[float, np.ndarray, np.ndarray]]:
  """Ridge fits of t ~ x w + b on raw rows (centred here, in x's precision) for every alpha."""
  x = np.asarray(x)
  if x.dtype != np.float64:
    x = x.astype(np.float32)
  offset = x.mean(0, dtype=np.float64)
  for alpha, w, b in solve(moments((x - offset).astype(x.dtype), t), alphas, relative=relative):
    yield alpha, w, b - offset @ w
