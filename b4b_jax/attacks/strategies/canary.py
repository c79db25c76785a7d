"""Canary probing: a fixed probe image rides along in every batch, so the thief reads its noise level
online from the spread of the probe's answers, and switches to repeat-and-average once it rises.

Estimators, from consecutive canary answers a_t, a_{t-1} (D dims):
  naive   sigma_hat = sqrt(||a_t - a_{t-1}||^2 / (2 D))        (fresh noise per query, both at ~sigma)
  aware   the last *non-zero* difference d over sqrt(D (1 + r^-2)): a thief that knows the hardened
          design (answers change only when the sigma level rises by r) reads the new level from it.
"""
from typing import Optional

import numpy as np

from b4b_jax.attacks.strategies import base
from b4b_jax.attacks.strategies import repeat


class CanaryProbe(base.Strategy):
  """Args (besides Strategy's): canary (one image [H, W, C] in [0, 1]), switch_sigma (switch to
  repeats when the naive estimate exceeds it; None = never), copies and perturbation for the repeats,
  level_ratio r for the aware estimator."""
  name = "canary"

  def __init__(self, api, accounts, *, canary: np.ndarray, switch_sigma: Optional[float] = None,
               copies: int = 16, perturbation: str = "exact", level_ratio: float = 2.0, seed: int = 0,
               **kwargs):
    super().__init__(api, accounts, **kwargs)
    canary = np.asarray(canary, np.float32)
    if canary.ndim != 3:
      raise ValueError(f"canary must be one image [H, W, C], got shape {canary.shape}")
    self.canary = canary
    self.switch_sigma = switch_sigma
    self.level_ratio = float(level_ratio)
    self.repeats = repeat.RepeatAverage(api, self.accounts, copies=copies, perturbation=perturbation,
                                        seed=seed, to_input=self.to_input, batch_size=self.batch_size)
    self.repeats.queries_sent = self.queries_sent  # the same accounts: one ledger
    if self.batch_size < 2:
      raise ValueError("a canary batch needs batch_size >= 2 (the canary takes one row)")
    self.previous: Optional[np.ndarray] = None
    self.naive_estimates = []
    self.aware_estimates = []
    self._aware = 0.0

  def query_batch(self, images01) -> np.ndarray:
    """Sends one batch with the canary appended; returns the answers to `images01` only."""
    images01 = base._check_images(images01)  # pylint: disable=protected-access
    reps = self.send(np.concatenate([images01, self.canary[None]]))
    probe = reps[-1].astype(np.float64)
    if self.previous is not None:
      sq = float(np.sum((probe - self.previous) ** 2))
      d = probe.shape[0]
      self.naive_estimates.append(np.sqrt(sq / (2 * d)))
      if sq > 0:
        self._aware = np.sqrt(sq / (d * (1 + self.level_ratio ** -2)))
      self.aware_estimates.append(self._aware)
    self.previous = probe
    return reps[:-1]

  @property
  def sigma_estimate(self) -> float:
    return float(self.naive_estimates[-1]) if self.naive_estimates else 0.0

  @property
  def switched(self) -> bool:
    return self.switch_sigma is not None and self.sigma_estimate > self.switch_sigma

  def steal(self, images01):
    """Repeats once the read noise is above switch_sigma, else one query per image (with canary)."""
    if self.switched:
      return self.repeats.steal(images01)
    out = [self.query_batch(images01[s:s + self.batch_size - 1])
           for s in range(0, len(images01), self.batch_size - 1)]
    return np.concatenate(out)
