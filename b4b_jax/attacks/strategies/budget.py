"""Staying under the knee of the cost: few queries, chosen so they cover what the thief needs while
occupying few of the defense's buckets (the defense's coverage is secret; the thief fits its own LSH).

  select_subset(method, pool_features, budget, labels=None)
    "random"          budget images at random;
    "class_balanced"  the same number per class (labels from a public proxy, e.g. a public classifier);
    "coverage_aware"  k-means (k = budget) on a public proxy encoder's features for spread, then in each
                      cluster the member whose sign code under the thief's own LSH (hyperplanes through
                      the proxy features' mean) is the most common among the pool's already picked
                      members, so the picks spread over the data yet fall into few buckets.
  UnderKnee   sends only the selected subset from the main account; steal() returns their answers.
"""
import numpy as np

from b4b_jax.attacks.strategies import base

SELECTIONS = ("random", "class_balanced", "coverage_aware")


def attacker_lsh_codes(features, num_hyperplanes: int = 10, seed: int = 0) -> np.ndarray:
  """int64 [N] bucket of each row under the thief's own LSH (random hyperplanes through the mean)."""
  f = np.asarray(features, np.float64)
  planes = np.random.default_rng(seed).normal(size=(f.shape[1], num_hyperplanes))
  bits = ((f - f.mean(0)) @ planes > 0).astype(np.int64)
  return bits @ (1 << np.arange(num_hyperplanes, dtype=np.int64))


def select_subset(method: str, pool_features, budget: int, *, labels=None, seed: int = 0,
                  num_hyperplanes: int = 10) -> np.ndarray:
  """Sorted indices of `budget` pool rows."""
  f = np.asarray(pool_features, np.float64)
  if method not in SELECTIONS:
    raise ValueError(f"unknown selection {method!r}; expected one of {SELECTIONS}")
  if f.ndim != 2 or not 1 <= budget <= len(f):
    raise ValueError(f"budget must be in [1, {len(f)}] for pool features {f.shape}, got {budget}")
  rng = np.random.default_rng(seed)
  if method == "random":
    return np.sort(rng.choice(len(f), budget, replace=False))
  if method == "class_balanced":
    if labels is None or len(labels) != len(f):
      raise ValueError("class_balanced needs one label per pool row")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per = np.array_split(np.arange(budget), len(classes))
    picks = []
    for c, slots in zip(classes, per):
      members = np.flatnonzero(labels == c)
      picks.extend(rng.choice(members, min(len(slots), len(members)), replace=False))
    rest = np.setdiff1d(np.arange(len(f)), picks)
    if len(picks) < budget:  # small classes: fill at random
      picks.extend(rng.choice(rest, budget - len(picks), replace=False))
    return np.sort(np.asarray(picks, np.int64))
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  clusters = KMeans(n_clusters=budget, n_init=1, random_state=seed).fit_predict(f)
  codes = attacker_lsh_codes(f, num_hyperplanes, seed)
  counts = {}
  picks = []
  for c in rng.permutation(budget):
    members = np.flatnonzero(clusters == c)
    if not len(members):
      continue
    best = max(members, key=lambda i: (counts.get(codes[i], 0), -i))
    counts[codes[best]] = counts.get(codes[best], 0) + 1
    picks.append(best)
  rest = np.setdiff1d(np.arange(len(f)), picks)
  if len(picks) < budget:
    picks.extend(rng.choice(rest, budget - len(picks), replace=False))
  return np.sort(np.asarray(picks, np.int64))


class UnderKnee(base.Strategy):
  """Args (besides Strategy's): budget, selection (SELECTIONS), proxy_features [N, F] of the pool
  (a public encoder's), labels (class_balanced), seed."""
  name = "under_knee"

  def __init__(self, api, accounts, *, budget: int, selection: str = "coverage_aware",
               proxy_features=None, labels=None, seed: int = 0, **kwargs):
    super().__init__(api, accounts, **kwargs)
    self.budget, self.selection, self.labels, self.seed = budget, selection, labels, seed
    self.proxy_features = proxy_features
    self.selected = None

  def steal(self, images01):
    images01 = base._check_images(images01)  # pylint: disable=protected-access
    feats = self.proxy_features if self.proxy_features is not None else images01.reshape(
        len(images01), -1)
    self.selected = select_subset(self.selection, feats, self.budget, labels=self.labels,
                                  seed=self.seed)
    return self.send(images01[self.selected])
