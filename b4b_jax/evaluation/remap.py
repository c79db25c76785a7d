"""Remapping between sybil accounts: what per-user transforms cost an attacker (paper §4.3, Fig. 5).

Protocol (the paper's sybil_defense experiment, run through the real API):
  1. Two accounts, A and B, of one `DefendedEncoder` whose per-user transform is of one type (affine,
     pad+shuffle, affine+pad+shuffle, binary), so A and B get independent transforms of that type; the
     noise is either off (static sigma 0: transforms only) or the B4B cost.
  2. Both accounts send the same train representations (the overlap), batch by batch, then the same
     test representations. Every row is a charged query, so with B4B each account's noise grows with
     its own coverage.
  3. A reference linear classifier is trained on A's train responses (model chosen on validation).
  4. For each n in `overlaps`, a mapper B -> A (attacks.mapper.fit_mapper; default the closed-form
     "lstsq") is fitted on the first n overlapping train queries.
  5. On the test queries: mean cosine distance between mapped B and A responses, and the reference
     classifier's top-1 on mapped B responses (vs. its top-1 on A's own: the accuracy drop).

n = 0 means "no mapping": B's responses are used as they are (only defined when both spaces have the
same dimension).

rep_scale: the API serves representations x rep_scale, so the transforms, the noise, the mapper and the
classifier act on scaled features (the original's sybil experiments used SimSiam features x1000,
reference §3.4, §4.3).
"""
from typing import Callable, Optional, Sequence

import numpy as np

from b4b_jax.attacks import mapper as mapper_lib
from b4b_jax.evaluation import api_client
from b4b_jax.evaluation import legit as legit_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import similarity

TRANSFORM_TITLES = {"identity": "identity", "diag_affine": "affine", "dense_affine": "dense affine",
                    "pad_shuffle": "pad+shuffle", "affine_pad_shuffle": "affine+pad+shuffle",
                    "binary": "binary"}
NOISE_MODES = ("none", "b4b")


def cosine_distance(a, b) -> np.ndarray:
  """Row-wise 1 - cos(a_i, b_i) (0 = same direction, 2 = opposite)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"cosine distance needs equal shapes, got {a.shape} and {b.shape}")
  return 1.0 - similarity.cosine_similarity(a, b)


def account_config(base_config, transform: str, noise: str):
  """The defense config for one (transform, noise) cell: B4B cost or no noise, that transform."""
  if noise not in NOISE_MODES:
    raise ValueError(f"unknown noise mode {noise!r}; choose one of {NOISE_MODES}")
  cfg = base_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.enabled = True
    cfg.transform = transform
    cfg.static_sigma = 0.0 if noise == "none" else None
  return cfg


def noise_label(config) -> str:
  if config.static_sigma is None:
    return "b4b"
  return "none" if config.static_sigma == 0.0 else f"static sigma={config.static_sigma:g}"



def remap_cell(train_x, train_y, test_x, test_y, *, defense_config, overlaps: Sequence[int],
               classifier_cfg, mapper_kind: str = "lstsq", mapper_options=None,
               query_batch_size: int = 256, seed: int = 0, rep_scale: float = 1.0,
               on_step: Optional[Callable[[str], None]] = None) -> dict:
  """Runs the protocol for one defense config (one transform type, one noise mode)."""
  scale = np.float32(legit_lib.check_rep_scale(rep_scale))
  train_x = np.asarray(train_x, np.float32) * scale
  test_x = np.asarray(test_x, np.float32) * scale
  overlaps = sorted(int(n) for n in overlaps)
  if not overlaps or overlaps[0] < 0 or overlaps[-1] > len(train_x):
    raise ValueError(f"overlaps must be non-empty and within [0, {len(train_x)}] (the train "
                     f"queries), got {overlaps}")
  api = api_client.representation_api(defense_config, train_x.shape[1], capacity=2,
                                      batch_size=query_batch_size)
  # Both accounts send the same rows batch by batch: train (the overlap), then test.
  train_resp, train_traces = api_client.send_interleaved(api, ["A", "B"], train_x,
                                                         batch_size=query_batch_size)
  test_resp, test_traces = api_client.send_interleaved(api, ["A", "B"], test_x,
                                                       batch_size=query_batch_size)
  a_train, b_train = train_resp["A"], train_resp["B"]
  a_test, b_test = test_resp["A"], test_resp["B"]
  if on_step:
    on_step("queried")

  probe = linear_probe.run_probe(a_train, train_y, a_test, test_y, classifier_cfg)
  reference = probe.classifiers[0]
  reference_top1 = reference.top1(a_test, test_y)

  points = []
  for n in overlaps:
    if n == 0:
      if b_test.shape[1] != a_test.shape[1]:
        continue  # no unmapped baseline between spaces of different dimension
      mapped = b_test
    else:
      mapped = _fit_mapper(b_train[:n], a_train[:n], mapper_kind, mapper_options, seed).apply(b_test)
    top1 = reference.top1(mapped, test_y)
    points.append({"n": n, "cos_dist": float(np.mean(cosine_distance(mapped, a_test))),
                   "top1": top1, "top1_drop": reference_top1 - top1})
    if on_step:
      on_step(f"n={n}")

  def final(traces, user):
    return {"coverage": traces[user].coverage[-1], "sigma": traces[user].sigma[-1],
            "num_queries": traces[user].num_queries[-1]}

  return {
      "transform": defense_config.transform,
      "noise": noise_label(defense_config),
      "rep_scale": float(scale),
      "out_dim": int(a_train.shape[1]),
      "reference_top1": reference_top1,
      "reference_probe": probe.summary(),
      "accounts": {u: final(test_traces, u) for u in ("A", "B")},
      "coverage_after_train": {u: train_traces[u].coverage[-1] for u in ("A", "B")},
      "points": points,
  }


def _fit_mapper(source, target, kind: str, options, seed: int):
  """attacks.mapper.fit_mapper; a trained mapper's batch shrinks for overlaps smaller than one batch."""
  options = dict(options or {})
  if kind in mapper_lib.TRAINED_KINDS:
    num_train = len(source) - int(round(len(source) * options.get("val_fraction", 0.2)))
    options["batch_size"] = max(1, min(int(options.get("batch_size", 64)), num_train))
  return mapper_lib.fit_mapper(source, target, kind=kind, seed=seed, **options)


def remap_experiment(train_x, train_y, test_x, test_y, *, base_defense_config,
                     transforms: Sequence[str], noise_modes: Sequence[str], overlaps: Sequence[int],
                     classifier_cfg, mapper_kind: str = "lstsq", mapper_options=None,
                     query_batch_size: int = 256, seed: int = 0, rep_scale: float = 1.0,
                     on_cell: Optional[Callable[[int, int, dict], None]] = None) -> dict:
  """All (transform, noise) cells; returns {"cells": [...]} for results.json and the plots."""
  cells = []
  total = len(transforms) * len(noise_modes)
  for noise in noise_modes:
    for transform in transforms:
      cfg = account_config(base_defense_config, transform, noise)
      cell = remap_cell(train_x, train_y, test_x, test_y, defense_config=cfg, overlaps=overlaps,
                        classifier_cfg=classifier_cfg, mapper_kind=mapper_kind,
                        mapper_options=mapper_options, query_batch_size=query_batch_size, seed=seed,
                        rep_scale=rep_scale)
      cells.append(cell)
      if on_cell is not None:
        on_cell(len(cells), total, cell)
  return {"cells": cells, "mapper": mapper_kind, "overlaps": [int(n) for n in overlaps],
          "rep_scale": float(rep_scale)}
