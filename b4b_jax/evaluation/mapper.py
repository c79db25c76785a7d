"""Mappers from one account's representation space to another's (the sybil's remapping step).

The remapping experiment calls `fit_mapper(kind, source, target, ...) -> callable`.

  * "linear" (the paper's choice): the affine least-squares map source -> target, solved in closed
    form (float64 normal equations with a tiny ridge relative to the data scale). This is the best any
    linear mapper trained on the same pairs can do, so the remapping cost it reports is not inflated by
    an under-trained optimiser.
  * "linear_adam" / "mlp": the sybil attack's own mapper (b4b_jax.attacks.mapper): a linear map or the
    original end-to-end 3-layer ReLU network, Adam + MSE on minibatches, the epoch chosen on a held-out
    20% of the pairs.
"""
from typing import Callable

import numpy as np

from b4b_jax.attacks import mapper as attacks_mapper

KINDS = ("linear", "linear_adam", "mlp")


def _check_pairs(source, target):
  source = np.asarray(source, np.float64)
  target = np.asarray(target, np.float64)
  if source.ndim != 2 or target.ndim != 2 or source.shape[0] != target.shape[0]:
    raise ValueError(f"mapper pairs must be [n, d_src] and [n, d_dst] with the same n, got "
                     f"{source.shape} and {target.shape}")
  if source.shape[0] < 1:
    raise ValueError("mapper needs at least one pair")
  if not (np.all(np.isfinite(source)) and np.all(np.isfinite(target))):
    raise ValueError("mapper pairs contain NaN or Inf")
  return source, target


def fit_linear_mapper(source, target, *, ridge: float = 1e-9) -> Callable[[np.ndarray], np.ndarray]:
  """Affine least squares target ~ source @ W + b; ridge is relative to the mean Gram eigenvalue."""
  source, target = _check_pairs(source, target)
  # Centring fits the bias exactly and keeps the normal equations well conditioned.
  s_mean, t_mean = source.mean(0), target.mean(0)
  s = source - s_mean
  gram = s.T @ s
  scale = max(float(np.trace(gram)) / gram.shape[0], 1e-300)
  gram[np.diag_indices_from(gram)] += ridge * scale
  w = np.linalg.solve(gram, s.T @ (target - t_mean))
  b = t_mean - s_mean @ w

  def apply(x):
    return (np.asarray(x, np.float64) @ w + b).astype(np.float32)

  return apply


def fit_trained_mapper(kind: str, source, target, *, epochs: int = 50, batch_size: int = 64,
                       learning_rate: float = 1e-4, val_fraction: float = 0.2,
                       seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """The attacks part's Adam-trained mapper ("linear" as the paper, or the 3-layer ReLU "mlp"), the
  epoch chosen on held-out pairs; the batch shrinks for overlaps smaller than one batch."""
  source, target = _check_pairs(source, target)
  num_train = source.shape[0] - int(round(source.shape[0] * val_fraction))
  mapper = attacks_mapper.fit_mapper(source, target, kind=kind, epochs=epochs,
                                     learning_rate=learning_rate,
                                     batch_size=max(1, min(batch_size, num_train)),
                                     val_fraction=val_fraction, seed=seed)
  return mapper.apply


def fit_mapper(kind: str, source, target, *, seed: int = 0, **options) -> Callable:
  """Fits a mapper of `kind` on paired rows (source[i] and target[i] answer the same query)."""
  if kind == "linear":
    return fit_linear_mapper(source, target, **{k: v for k, v in options.items() if k == "ridge"})
  if kind in ("mlp", "linear_adam"):
    allowed = {"epochs", "batch_size", "learning_rate", "val_fraction"}
    return fit_trained_mapper("mlp" if kind == "mlp" else "linear", source, target, seed=seed,
                              **{k: v for k, v in options.items() if k in allowed})
  raise ValueError(f"unknown mapper kind {kind!r}; choose one of {KINDS}")
