"""Deciding the paper's claims at the demo's scale: an interval, a margin, and one of three verdicts.

A claim is decided by an interval on the statistic it is about (e.g. the drop in the legit user's top-1,
the gain in fidelity R^2 of a copy over a random network), never by one number: the demo's single run
is one draw of training noise, and another machine's rounding draws another. `decide` is the one rule:

  holds            the whole interval lies on the claim's side of the threshold, by at least `margin`;
  does not hold    the whole interval lies on the other side, by at least `margin`;
  undecided at this scale   otherwise (the interval, widened by the margin, straddles the threshold).

The margin is the part of the difference that the interval cannot see (here: how far the demo's numbers
move when only the floating-point rounding changes; see README "What varies from machine to machine"),
so a verdict that is not "undecided" is one rounding cannot flip.

The intervals are percentile intervals of paired bootstrap samples (`paired_bootstrap`): the same
resampled test images (and probe seeds) for both sides of a comparison, so what both sides share cancels.
Everything here is pure numpy, deterministic given its `seed`, and unit-tested on made-up results.
"""
from typing import Callable, Sequence, Tuple

import numpy as np

from b4b_jax.evaluation import fidelity as fidelity_lib

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
UNDECIDED = "undecided at this scale"
VERDICTS = (HOLDS, DOES_NOT_HOLD, UNDECIDED)
SIDES = ("above", "below")


def decide(lo: float, hi: float, threshold: float, side: str, margin: float = 0.0) -> str:
  """The verdict on "statistic is `side` `threshold`" given its interval [lo, hi].

  side: "above" (the claim is statistic > threshold) or "below" (statistic < threshold).
  margin >= 0: how far past the threshold the whole interval must lie for either firm verdict.
  Returns one of HOLDS, DOES_NOT_HOLD, UNDECIDED. Raises ValueError on a bad side, an inverted or
  non-finite interval, or a negative margin.
  """
  if side not in SIDES:
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")
  lo, hi, threshold, margin = float(lo), float(hi), float(threshold), float(margin)
  if not all(np.isfinite([lo, hi, threshold, margin])):
    raise ValueError(f"interval [{lo}, {hi}], threshold {threshold} and margin {margin} must be finite")
  if lo > hi:
    raise ValueError(f"interval [{lo}, {hi}] is inverted")
  if margin < 0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  above, below = lo >= threshold + margin, hi <= threshold - margin
  if side == "above":
    return HOLDS if above else DOES_NOT_HOLD if below else UNDECIDED
  return HOLDS if below else DOES_NOT_HOLD if above else UNDECIDED


def percentile_interval(samples: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
  """The central `confidence` percentile interval of bootstrap `samples`."""
  samples = np.asarray(samples, np.float64)
  if samples.ndim != 1 or len(samples) < 2 or not np.all(np.isfinite(samples)):
    raise ValueError(f"need a 1-D array of at least 2 finite samples, got shape {samples.shape}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  tail = 50.0 * (1.0 - confidence)
  lo, hi = np.percentile(samples, [tail, 100.0 - tail])
  return float(lo), float(hi)


def paired_bootstrap(statistic: Callable[[np.ndarray], float], num_items: int, *,
                     num_samples: int = 1000, seed: int = 0) -> np.ndarray:
  """`statistic(indices)` on `num_samples` resamples (with replacement) of range(num_items).

  The statistic closes over the per-item arrays of both sides of a comparison and indexes them all with
  the same `indices`, which is what makes the bootstrap paired.
  """
  if num_items < 2:
    raise ValueError(f"need at least 2 items to bootstrap, got {num_items}")
  rng = np.random.default_rng(seed)
  return np.array([statistic(rng.integers(0, num_items, num_items)) for _ in range(num_samples)])


# ------------------------------------------------------------------------------------------ statistics
def fidelity_gain_samples(sq_resid_a, sq_resid_b, targets, *, num_samples: int = 1000,
                          seed: int = 0) -> np.ndarray:
  """Paired bootstrap samples of R^2(a) - R^2(b) for two copies scored on the same held-out rows."""
  sq_resid_a, sq_resid_b = np.asarray(sq_resid_a, np.float64), np.asarray(sq_resid_b, np.float64)
  targets = np.asarray(targets, np.float64)
  if sq_resid_a.shape != sq_resid_b.shape or sq_resid_a.shape != targets.shape[:1]:
    raise ValueError(f"residuals {sq_resid_a.shape}, {sq_resid_b.shape} and targets {targets.shape} "
                     "must describe the same rows")
  return paired_bootstrap(lambda i: fidelity_lib.r2_from_terms(sq_resid_a, targets, i)
                          - fidelity_lib.r2_from_terms(sq_resid_b, targets, i),
                          len(targets), num_samples=num_samples, seed=seed)


def accuracy_drop_samples(correct_a, correct_b, *, num_samples: int = 1000,
                          seed: int = 0) -> np.ndarray:
  """Paired bootstrap samples of top-1(a) - top-1(b) in points, from [S, N] 0/1 correctness of S probe
  seeds on the same N test images: test images and probe seeds are both resampled."""
  a, b = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"correctness arrays must both be [seeds, images], got {a.shape} and {b.shape}")
  diff = a - b
  num_seeds, num_images = diff.shape
  rng = np.random.default_rng(seed)
  out = np.empty(num_samples)
  for k in range(num_samples):
    rows, cols = rng.integers(0, num_seeds, num_seeds), rng.integers(0, num_images, num_images)
    out[k] = 100.0 * diff[np.ix_(rows, cols)].mean()
  return out
