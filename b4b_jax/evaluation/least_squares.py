"""Closed-form (ridge) least squares: the one solver behind the ridge probe, the closed-form ("lstsq")
mapper between accounts and the demo's fidelity score.

`fit(x, t, alphas)` yields, for each alpha, (alpha, w, b) minimising

    |t - x w - b|^2 + alpha * s * |w|^2

with the intercept b unpenalised; s is the mean eigenvalue of the centred Gram matrix (relative=True:
one grid of strengths fits every representation scale) or 1 (relative=False). One eigendecomposition
serves every alpha. `Moments` are the sufficient statistics, so callers can subtract a subset's moments
(the ridge probe's validation rows) instead of recomputing all of them.

With fewer rows than dimensions (N < D), `fit` solves the same problem through the N x N Gram of the
centred rows instead (w = Xc^T (Xc Xc^T + alpha s I)^-1 Tc, the push-through identity; its nonzero
eigenvalues are the D x D Gram's, so s is unchanged): N^2 D + N^3 work instead of N D^2 + D^3. The
remapping experiment fits a 2048-d mapper on 10-2,000 overlapping queries per point (6 of its 10
points). On a 2-core CPU (session 27) a 2048-d fit took 1.28 s alone on 16 rows and 0.01 s this way,
0.98 -> 0.09 s on 500 rows, 1.37 -> 1.06 s on 2,000; in the README rehearsal's remap row, beside the job's
JAX threads, its 16 fits had taken 77 of the row's 90 s, and the row then took 16.5 s.
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
  for alpha, w in _spectral_fits(gram, cross, len(gram), alphas, relative):
    yield alpha, w, mean_t - mean_x @ w


def _spectral_fits(gram: np.ndarray, cross: np.ndarray, num_dims: int, alphas: Sequence[float],
                   relative: bool, rows=None) -> Iterator[Tuple[float, np.ndarray]]:
  """(alpha, w) for every alpha from one eigendecomposition of `gram`: w = (gram + alpha s I)^-1 cross,
  then rows^T w when `rows` is given (the row-Gram route of `fit`). s: the mean of gram's (clamped)
  eigenvalues over num_dims dimensions (relative) or 1."""
  evals, evecs = np.linalg.eigh(gram)
  evals = np.maximum(evals, 0.0)
  proj = evecs.T @ cross
  scale = max(float(evals.sum()) / num_dims, 1e-300) if relative else 1.0
  for alpha in alphas:
    w = evecs @ (proj / (evals + alpha * scale)[:, None])
    yield alpha, (w if rows is None else rows.T @ w)


def fit(x: np.ndarray, t: np.ndarray, alphas: Sequence[float], *,
        relative: bool = True) -> Iterator[Tuple[float, np.ndarray, np.ndarray]]:
  """Ridge fits of t ~ x w + b on raw rows (centred here, in x's precision; in float64 when N < D) for
  every alpha."""
  x = np.asarray(x)
  if len(x) < x.shape[1]:
    yield from _fit_from_row_gram(x.astype(np.float64), np.asarray(t, np.float64), alphas, relative)
    return
  if x.dtype != np.float64:
    x = x.astype(np.float32)
  offset = x.mean(0, dtype=np.float64)
  for alpha, w, b in solve(moments((x - offset).astype(x.dtype), t), alphas, relative=relative):
    yield alpha, w, b - offset @ w


def _fit_from_row_gram(x: np.ndarray, t: np.ndarray, alphas: Sequence[float],
                       relative: bool) -> Iterator[Tuple[float, np.ndarray, np.ndarray]]:
  """`fit` for N < D rows, float64: one eigendecomposition of the N x N Gram of the centred rows."""
  mean_x, mean_t = x.mean(0), t.mean(0)
  xc = x - mean_x
  # s over all D dimensions: the D x D Gram has the same nonzero eigenvalues and D - N more zeros.
  for alpha, w in _spectral_fits(xc @ xc.T, t - mean_t, x.shape[1], alphas, relative, rows=xc):
    yield alpha, w, mean_t - mean_x @ w
