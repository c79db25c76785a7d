"""Remapping between sybil accounts through the real DefendedEncoder: affine transforms are undone by a
linear map given enough overlap, binary ones are not; B4B noise makes remapping lossy; the mapper fits
least squares exactly."""
import ml_collections
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.attacks import mapper as mapper_lib
from b4b_jax.evaluation import remap

DIM, CLASSES = 16, 4
N_TRAIN, N_TEST, BATCH = 512, 256, 128   # multiples of the batch: one compiled query shape


# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def data():
  # Non-negative representations of scale ~1 (like SimSiam's post-ReLU features x1000), 4 classes.
  rng = np.random.default_rng(0)
  centers = rng.uniform(0.0, 1.0, (CLASSES, DIM))

  def draw(n):
    y = rng.integers(0, CLASSES, n)
    return np.clip(centers[y] + 0.15 * rng.normal(size=(n, DIM)), 0, None).astype(np.float32), y
  return draw(N_TRAIN) + draw(N_TEST)


PROBE = ml_collections.ConfigDict({"method": "ridge", "seeds": (0,), "val_fraction": 0.1})


def _cell(data, transform, noise, overlaps, **overrides):
  base = defense.defense_config("simsiam", num_projections=2, pad_dim=4, **overrides)
  cfg = remap.account_config(base, transform, noise)
  return remap.remap_cell(*data, defense_config=cfg, overlaps=overlaps, classifier_cfg=PROBE,
                          query_batch_size=BATCH)


def test_affine_remap_is_exact_with_enough_overlap_and_binary_is_not(data):
  overlaps = (0, 8, 2 * DIM, 400)
  affine = _cell(data, "diag_affine", "none", overlaps)
  binary = _cell(data, "binary", "none", overlaps)
  a = {p["n"]: p for p in affine["points"]}
  b = {p["n"]: p for p in binary["points"]}
  assert affine["reference_top1"] > 90.0
  # Unmapped, the two accounts' spaces disagree; with >= D+1 pairs a linear map undoes the affine.
  assert a[0]["cos_dist"] > 0.2
  assert a[2 * DIM]["cos_dist"] < 1e-4 and a[400]["cos_dist"] < 1e-4
  assert a[400]["top1"] == pytest.approx(affine["reference_top1"], abs=0.5)
  assert a[8]["cos_dist"] > a[2 * DIM]["cos_dist"]      # too few pairs: under-determined
  # Binary transforms are not linear: a linear mapper stays clearly off however much overlap.
  assert binary["out_dim"] == 2 * DIM
  assert b[400]["cos_dist"] > 100 * a[400]["cos_dist"] and b[400]["cos_dist"] > 1e-3
  # Both accounts paid for every query (train overlap + test).
  for acc in affine["accounts"].values():
    assert acc["num_queries"] == N_TRAIN + N_TEST and acc["sigma"] == 0.0


def test_b4b_noise_makes_the_remap_lossy(data):
  # A steep cost (sigma reaches alpha at 1% coverage) so each account's own noise is large.
  noisy = _cell(data, "diag_affine", "b4b", (400,), lam=1e-2, alpha=0.5, beta=1.0)
  acc = noisy["accounts"]["A"]
  assert acc["sigma"] > 0.1 and acc["coverage"] > 0
  assert noisy["points"][0]["cos_dist"] > 1e-2
  assert noisy["noise"] == "b4b"


def test_linear_mapper_equals_least_squares_and_mlp_learns():
  rng = np.random.default_rng(1)
  src = rng.normal(size=(200, 6))
  w, b = rng.normal(size=(6, 3)), rng.normal(size=3)
  dst = src @ w + b + 0.1 * rng.normal(size=(200, 3))
  fitted = mapper_lib.fit_mapper(src, dst, kind="lstsq", ridge=1e-12)
  design = np.concatenate([src, np.ones((200, 1))], 1)
  ref = np.linalg.lstsq(design, dst, rcond=None)[0]
  test = rng.normal(size=(20, 6))
  np.testing.assert_allclose(fitted.apply(test), np.concatenate([test, np.ones((20, 1))], 1) @ ref,
                             rtol=1e-4, atol=1e-4)
  # The attack's own Adam-trained mappers (hidden width = input dim, as the original: use 32 dims).
  src, test = rng.normal(size=(400, 32)), rng.normal(size=(40, 32))
  w, b = rng.normal(size=(32, 8)) / 4, rng.normal(size=8)
  dst = src @ w + b + 0.05 * rng.normal(size=(400, 8))
  baseline = np.mean((test @ w + b - dst.mean(0)) ** 2)
  for kind in ("mlp", "linear"):
    trained = mapper_lib.fit_mapper(src, dst, kind=kind, epochs=60, batch_size=16, learning_rate=3e-3,
                                    seed=0)
    assert np.mean((trained.apply(test) - (test @ w + b)) ** 2) < 0.2 * baseline, kind


def test_bad_remap_arguments_raise(data):
  base = defense.defense_config("simsiam", num_projections=2)
  with pytest.raises(ValueError, match="unknown noise mode"):
    remap.account_config(base, "diag_affine", "loud")
  with pytest.raises(ValueError, match="overlaps"):
    remap.remap_cell(*data, defense_config=remap.account_config(base, "diag_affine", "none"),
                     overlaps=(N_TRAIN + 1,), classifier_cfg=PROBE)
  with pytest.raises(ValueError, match="unknown mapper kind"):
    mapper_lib.fit_mapper(np.ones((4, 2)), np.ones((4, 2)), kind="quadratic")
  with pytest.raises(ValueError, match="NaN"):
    mapper_lib.fit_mapper(np.full((4, 2), np.nan), np.ones((4, 2)), kind="lstsq")
  with pytest.raises(ValueError, match="equal shapes"):
    remap.cosine_distance(np.ones((3, 2)), np.ones((3, 4)))
