"""Repeat-and-average: N (near-)copies of every image, averaged (the public attack on B4B-style APIs).

Against per-query noise the average's error falls as 1/sqrt(N) while repeats add no coverage; against
per-input keyed noise (defense noise_keying="per_input") the copies share their noise draw.
"""
from typing import Sequence

import numpy as np

from b4b_jax.attacks.strategies import base
from b4b_jax.attacks.strategies import perturb as perturb_lib


class RepeatAverage(base.Strategy):
  """Args (besides Strategy's): copies N, perturbation (perturb.PERTURBATIONS), seed."""
  name = "repeat_average"

  def __init__(self, api, accounts, *, copies: int = 16, perturbation: str = "exact", seed: int = 0,
               **kwargs):
    super().__init__(api, accounts, **kwargs)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
      raise ValueError(f"copies must be a positive integer, got {copies!r}")
    if perturbation not in perturb_lib.PERTURBATIONS:
      raise ValueError(f"unknown perturbation {perturbation!r}; expected one of "
                       f"{perturb_lib.PERTURBATIONS}")
    self.copies = copies
    self.perturbation = perturbation
    self.rng = np.random.default_rng(seed)

  def answers(self, images01) -> np.ndarray:
    """[copies, M, out_dim]: the API's answers to `copies` (perturbed) copies of each image; copy 0
    is the image itself, as a thief would send it first."""
    images01 = base._check_images(images01)  # pylint: disable=protected-access
    copies = [images01] + [perturb_lib.perturb_images(self.perturbation, images01, self.rng)
                           for _ in range(self.copies - 1)]
    reps = self.send(np.concatenate(copies))
    return reps.reshape(self.copies, len(images01), -1)

  def steal_curve(self, images01, ns: Sequence[int]) -> dict:
    """{n: mean of the first n answers} for each n <= copies (one set of queries for all n)."""
    if any(n < 1 or n > self.copies for n in ns):
      raise ValueError(f"every n must be in [1, copies={self.copies}], got {list(ns)}")
    answers = self.answers(images01)
    return {int(n): answers[:n].mean(axis=0) for n in ns}

  def steal(self, images01):
    return self.answers(images01).mean(axis=0)
