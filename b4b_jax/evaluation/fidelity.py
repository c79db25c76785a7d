"""How faithfully a stolen copy reproduces the victim, on images no attacker sent.

  direct(copy, victim) -> {"cosine", "rel_mse"}: the copy's outputs against the victim's as they are
      (a copy trained to regress the answers should land on them);
  linear_residuals(copy_fit, victim_fit, copy_scored, victim_scored) -> [M] per scored row, the
      squared error of the victim's representation predicted by a ridge map from the copy's (fit on
      the fit rows, applied to the scored rows);
  linear_r2(...) -> the R^2 of that map: the share of the victim's variance the copy's features carry,
      whatever basis they are in; split_linear_r2(copy, victim) fits on the first half of the rows and
      scores the second;
  r2_from_terms(sq_resid, targets, idx) -> R^2 from per-row squared residuals over a subset of rows
      (the demo's claims resample rows for their bootstrap intervals).

Why two kinds: `direct` scores a copy that reproduces the answers themselves, and a copy that learned
only the victim's mean representation already reaches rel_mse 1 and a high cosine (the representations
share a large mean). The linear R^2 is not fooled by the mean (it is centred) and credits a copy whose
features carry the victim's information in another basis (a copy trained on a sybil's transformed
answers); an untrained network's random features already reach a positive R^2, which is why the demo
and the attack suite print an untrained copy beside every trained one.

All inputs are finite [N, D] arrays (the copy's D may differ from the victim's). `direct` computes in
float64; the linear fit keeps the given dtype (float32 copy features take least_squares' float32 Gram
path, as the demo always has, so its published figures do not move).
"""
from typing import Dict

import numpy as np

from b4b_jax.evaluation import least_squares
from b4b_jax.evaluation import similarity

RIDGE = 1e-3  # ridge strength per fit row, on standardised copy features: numerical safety, not a fit knob


def direct(copy_reps, victim_reps) -> Dict[str, float]:
  """cosine: mean cosine similarity of the copy's and the victim's representation of each image;
  rel_mse: sum ||copy - victim||^2 / sum ||victim - mean(victim)||^2 (0 = exact; 1 = no better than
  answering the victim's mean for every image)."""
  a, b = np.asarray(copy_reps, np.float64), np.asarray(victim_reps, np.float64)
  if a.shape != b.shape or a.ndim != 2 or len(a) < 2:
    raise ValueError(f"fidelity needs two equal [N>=2, D] arrays, got {a.shape} and {b.shape}")
  cos = similarity.cosine_similarity(a, b)
  spread = np.sum((b - b.mean(0)) ** 2)
  return {"cosine": float(cos.mean()), "rel_mse": float(np.sum((a - b) ** 2) / max(spread, 1e-300))}


def linear_residuals(copy_fit, victim_fit, copy_scored, victim_scored,
                     ridge: float = RIDGE) -> np.ndarray:
  """Per scored row, |victim - (standardised copy) W - b|^2 with (W, b) the ridge fit on the fit rows
  (penalty ridge x number of fit rows; the intercept is not penalised)."""
  copy_fit, copy_scored = _two_d(copy_fit, "copy_fit"), _two_d(copy_scored, "copy_scored")
  victim_fit, victim_scored = _two_d(victim_fit, "victim_fit"), _two_d(victim_scored, "victim_scored")
  if len(copy_fit) != len(victim_fit) or len(copy_scored) != len(victim_scored):
    raise ValueError(f"copy and victim rows must pair up: fit {len(copy_fit)} vs {len(victim_fit)}, "
                     f"scored {len(copy_scored)} vs {len(victim_scored)}")
  if copy_fit.shape[1] != copy_scored.shape[1] or victim_fit.shape[1] != victim_scored.shape[1]:
    raise ValueError("fit and scored rows must have the same dimensions")
  if len(copy_fit) < 2:
    raise ValueError(f"a linear fit needs at least 2 fit rows, got {len(copy_fit)}")
  mean, std = copy_fit.mean(0), copy_fit.std(0) + 1e-8
  (_, w, b), = least_squares.fit((copy_fit - mean) / std, victim_fit, [ridge * len(copy_fit)],
                                 relative=False)
  predicted = ((copy_scored - mean) / std) @ w + b
  return np.sum((victim_scored - predicted) ** 2, axis=1)


def linear_r2(copy_fit, victim_fit, copy_scored, victim_scored, ridge: float = RIDGE) -> float:
  """R^2 on the scored rows of the victim's representations predicted linearly from the copy's."""
  return r2_from_terms(linear_residuals(copy_fit, victim_fit, copy_scored, victim_scored, ridge),
                       _two_d(victim_scored, "victim_scored"))


def split_linear_r2(copy_reps, victim_reps, ridge: float = RIDGE) -> float:
  """linear_r2 fit on the first half of the rows and scored on the second (held out from the fit)."""
  copy_reps, victim_reps = _two_d(copy_reps, "copy_reps"), _two_d(victim_reps, "victim_reps")
  half = len(copy_reps) // 2
  return linear_r2(copy_reps[:half], victim_reps[:half], copy_reps[half:], victim_reps[half:], ridge)


def r2_from_terms(sq_resid: np.ndarray, targets: np.ndarray, idx=None) -> float:
  """R^2 = 1 - sum of squared residuals / total sum of squares, over the rows `idx` (default all).

  sq_resid: [N] per-row squared residual |y_i - yhat_i|^2; targets: [N, D] the y_i (the total sum of
  squares is taken around the mean of the selected rows, as a fresh held-out set would be).
  """
  idx = np.arange(len(sq_resid)) if idx is None else idx
  y = targets[idx]
  total = float(np.sum((y - y.mean(0)) ** 2))
  if total <= 0:
    raise ValueError("the targets have no variance: R^2 is undefined (a collapsed victim?)")
  return 1.0 - float(np.sum(sq_resid[idx])) / total


def _two_d(a, name: str) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim != 2 or not np.all(np.isfinite(a)):
    raise ValueError(f"{name} must be a finite [N, D] array, got shape {a.shape}")
  return a
