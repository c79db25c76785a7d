"""Sybil attacks: several accounts, their answers remapped into the main account's space.

Every account except the main one answers through its own per-user transform (defense/transforms.py), so
a thief that splits its queries across accounts must learn, from an overlap of images every account
sends, a map from each account's answers to the main account's. Only answers are used (api.query).

  fit_alignment(kind, source, target)  "linear" (affine least squares), "mlp" (attacks.mapper's trained
      3-layer MLP), "procrustes" (orthogonal rotation + translation + one scale: right for the
      affine/shuffle transforms when they are orthogonal, and needs few pairs), "bitflip" (for the binary
      transform: each target bit = one source bit or its complement, chosen by correlation).
  queries_needed(...)  the transform-hardening measure: held-out error of each mapper vs overlap size.
  SybilMapper         main account + sybils: everyone sends the overlap, each sends its share of the
                      rest; every sybil's answers are mapped into the main account's space.
  AccountRotation     many sybils, each sending at most `per_account` images (below the knee of the
                      cost), remapped into one space: SybilMapper with the accounts sized by the budget.
"""
from typing import Dict, Sequence

import numpy as np

from b4b_jax.attacks import mapper as mapper_lib
from b4b_jax.attacks.strategies import base

ALIGNMENTS = ("linear", "mlp", "procrustes", "bitflip")


class Alignment:
  """A fitted map from one account's answers to another's: apply(source [N, Ds]) -> [N, Dt]."""

  def __init__(self, kind: str, fn):
    self.kind, self._fn = kind, fn

  def apply(self, source) -> np.ndarray:
    return np.asarray(self._fn(np.asarray(source, np.float64)), np.float32)


def fit_alignment(kind: str, source, target, *, seed: int = 0, mlp_epochs: int = 100) -> Alignment:
  source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
  if kind not in ALIGNMENTS:
    raise ValueError(f"unknown alignment {kind!r}; expected one of {ALIGNMENTS}")
  if source.ndim != 2 or target.ndim != 2 or len(source) != len(target) or len(source) < 2:
    raise ValueError(f"alignment needs >= 2 paired [N, D] rows, got {source.shape} and {target.shape}")
  if kind == "linear":
    m = mapper_lib.fit_mapper(source, target, kind="lstsq")
    return Alignment(kind, m.apply)
  if kind == "mlp":
    m = mapper_lib.fit_mapper(source.astype(np.float32), target.astype(np.float32), kind="mlp",
                              epochs=mlp_epochs, learning_rate=1e-3,
                              batch_size=max(1, min(64, int(0.8 * len(source)) // 8)), seed=seed)
    return Alignment(kind, m.apply)
  if kind == "procrustes":
    if source.shape[1] > target.shape[1]:
      raise ValueError("procrustes needs source dim <= target dim (an orthogonal embedding)")
    ms, mt = source.mean(0), target.mean(0)
    s, t = source - ms, target - mt
    u, sv, vt = np.linalg.svd(s.T @ t, full_matrices=False)
    rot = u @ vt                                    # [Ds, Dt], orthonormal rows
    scale = sv.sum() / max(np.sum(s * s), 1e-300)   # least-squares scale given the rotation
    return Alignment(kind, lambda x: (x - ms) @ rot * scale + mt)
  # bitflip: target bit j = source bit pick[j], complemented when their correlation is negative.
  sc = (source - source.mean(0)) / (source.std(0) + 1e-12)
  tc = (target - target.mean(0)) / (target.std(0) + 1e-12)
  corr = sc.T @ tc / len(source)                    # [Ds, Dt]
  pick = np.argmax(np.abs(corr), axis=0)
  flip = corr[pick, np.arange(target.shape[1])] < 0
  return Alignment(kind, lambda x: np.where(flip, 1.0 - x[:, pick], x[:, pick]))


def queries_needed(source, target, *, kinds: Sequence[str] = ALIGNMENTS,
                   overlaps: Sequence[int] = (100, 300, 1000, 3000, 10000), holdout: int = 200,
                   tolerance: float = 0.1, seed: int = 0) -> Dict[str, dict]:
  """Per mapper kind: held-out MSE (mapped source vs target) for each overlap size that the pairs
  allow, and `needed` = the smallest overlap whose MSE is within (1 + tolerance) of the best one
  measured (None if no overlap fit). Pairs: source[i], target[i] answer the same image."""
  source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
  if len(source) != len(target) or len(source) <= holdout:
    raise ValueError(f"need more than holdout={holdout} pairs, got {len(source)}")
  perm = np.random.default_rng(seed).permutation(len(source))
  test, pool = perm[:holdout], perm[holdout:]
  out = {}
  for kind in kinds:
    mse = {}
    for n in overlaps:
      if n > len(pool):
        continue
      try:
        fitted = fit_alignment(kind, source[pool[:n]], target[pool[:n]], seed=seed)
      except ValueError:
        continue
      mse[int(n)] = float(np.mean((fitted.apply(source[test]) - target[test]) ** 2))
    best = min(mse.values()) if mse else None
    needed = next((n for n, v in mse.items() if v <= best * (1 + tolerance)), None) if mse else None
    out[kind] = {"mse": mse, "needed": needed}
  return out


class SybilMapper(base.Strategy):
  """Args (besides Strategy's): overlap (images every account sends), alignment (ALIGNMENTS)."""
  name = "sybil_mapper"

  def __init__(self, api, accounts, *, overlap: int = 100, alignment: str = "linear", seed: int = 0,
               **kwargs):
    super().__init__(api, accounts, **kwargs)
    if len(self.accounts) < 2:
      raise ValueError("a sybil attack needs at least two accounts")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 2:
      raise ValueError(f"overlap must be an integer >= 2, got {overlap!r}")
    if alignment not in ALIGNMENTS:
      raise ValueError(f"unknown alignment {alignment!r}; expected one of {ALIGNMENTS}")
    self.overlap, self.alignment, self.seed = overlap, alignment, seed
    self.alignments: Dict[str, Alignment] = {}

  def shares(self, num_images: int):
    """Index arrays: the overlap, then each account's share of the rest (contiguous, equal)."""
    rest = np.arange(self.overlap, num_images)
    return np.arange(self.overlap), np.array_split(rest, len(self.accounts))

  def steal(self, images01):
    images01 = base._check_images(images01)  # pylint: disable=protected-access
    if len(images01) < self.overlap:
      raise ValueError(f"{len(images01)} images are fewer than the overlap {self.overlap}")
    common, parts = self.shares(len(images01))
    main = self.accounts[0]
    anchor = self.send(images01[common], main)
    out = np.zeros((len(images01), anchor.shape[1]), np.float32)
    out[common] = anchor
    for account, part in zip(self.accounts, parts):
      if account == main:
        if len(part):
          out[part] = self.send(images01[part], main)
        continue
      own = self.send(np.concatenate([images01[common], images01[part]]), account)
      fitted = fit_alignment(self.alignment, own[:len(common)], anchor, seed=self.seed)
      self.alignments[account] = fitted
      if len(part):
        out[part] = fitted.apply(own[len(common):])
    return out


class AccountRotation(SybilMapper):
  """As many accounts as the images need so that each sends at most `per_account` images (overlap
  included), all remapped into the first account's space. Sybil names: `<first account>~<i>`, made when
  steal() sees how many images there are. Args (besides SybilMapper's): per_account."""
  name = "account_rotation"

  def __init__(self, api, accounts, *, per_account: int = 500, overlap: int = 100, **kwargs):
    accounts = [accounts] if isinstance(accounts, str) else list(accounts)
    if isinstance(per_account, bool) or not isinstance(per_account, int) or per_account <= overlap:
      raise ValueError(f"per_account ({per_account!r}) must be an integer above the overlap ({overlap})")
    main = accounts[0] if accounts else ""
    super().__init__(api, [main, f"{main}~1"], overlap=overlap, **kwargs)
    self.per_account = per_account

  def steal(self, images01):
    count = max(2, -(-(len(images01) - self.overlap) // (self.per_account - self.overlap)))
    main = self.accounts[0]
    self.accounts = [main] + [f"{main}~{i}" for i in range(1, count)]
    for a in self.accounts:
      self.queries_sent.setdefault(a, 0)
    return super().steal(images01)
