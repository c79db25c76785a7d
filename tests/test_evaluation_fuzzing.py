"""The noise-sensitivity sweep's pieces (reference §7.6): static noise drawn once per sample and
element, seeded; L2 normalisation after the scale; sigma 0 is the clean probe; bad sigmas refused."""
import ml_collections
import numpy as np
import pytest

from b4b_jax.evaluation import fuzzing
from b4b_jax.evaluation import linear_probe

PROBE = ml_collections.ConfigDict({"method": "ridge", "seeds": (0,), "val_fraction": 0.1,
                                   "normalization": "none"})


def _data(n, seed):
  centers = np.random.default_rng(0).normal(size=(4, 12))
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, n)
  return (centers[y] + 0.5 * rng.normal(size=(n, 12))).astype(np.float32), y


def test_static_noise_is_per_sample_seeded_and_of_the_right_std():
  x = np.zeros((2000, 8), np.float32)
  a = fuzzing.static_noise(x, 2.0, seed=0, stream=1)
  assert a.std() == pytest.approx(2.0, rel=0.03) and abs(a.mean()) < 0.05
  assert not np.allclose(a[0], a[1])                       # every sample its own draw
  np.testing.assert_array_equal(a, fuzzing.static_noise(x, 2.0, seed=0, stream=1))  # reproducible
  assert not np.allclose(a, fuzzing.static_noise(x, 2.0, seed=0, stream=2))  # train != test draws
  np.testing.assert_array_equal(fuzzing.static_noise(x + 1, 0.0, seed=0, stream=1), x + 1)


def test_prepare_scales_then_normalises():
  x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(fuzzing.prepare(x, rep_scale=1000.0), 1000.0 * x)
  np.testing.assert_allclose(fuzzing.prepare(x, rep_scale=1000.0, normalize=True),
                             [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


def test_sweep_sigma_zero_is_the_clean_probe_and_noise_hurts():
  (tx, ty), (vx, vy) = _data(400, 1), _data(200, 2)
  sweep = fuzzing.noise_sweep(tx, ty, vx, vy, probe_cfg=PROBE, sigmas=(0.0, 0.5, 20.0))
  clean = linear_probe.run_probe(tx, ty, vx, vy, PROBE)
  p0, p1, p2 = sweep["points"]
  assert p0["test_top1_mean"] == clean.test_top1_mean > 90.0 and p0["cos_dist"] == 0.0
  assert p2["test_top1_mean"] < 40.0 and p2["cos_dist"] > p1["cos_dist"] > 0.0   # chance: 25 %
  assert sweep["chance_top1"] == 25.0 and fuzzing.at_sigma(sweep, 0.5) is p1
  # x1000 features shrug off sigma 2; L2-normalised ones (norm 1 over 12 dims) do not.
  big = fuzzing.noise_sweep(tx, ty, vx, vy, probe_cfg=PROBE, sigmas=(2.0,), rep_scale=1000.0)
  unit = fuzzing.noise_sweep(tx, ty, vx, vy, probe_cfg=PROBE, sigmas=(2.0,), rep_scale=1000.0,
                             normalize=True)
  assert big["points"][0]["test_top1_mean"] > 90.0 > 50.0 > unit["points"][0]["test_top1_mean"]
  for bad in ((), (-1.0,), (float("inf"),)):
    with pytest.raises(ValueError, match="sigmas"):
      fuzzing.noise_sweep(tx, ty, vx, vy, probe_cfg=PROBE, sigmas=bad)
