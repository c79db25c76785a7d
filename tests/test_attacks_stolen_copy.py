"""attacks/stolen_copy.py's pure parts: the thief's target standardisation and the batch schedule."""
import numpy as np
import pytest

from b4b_jax.attacks import stolen_copy


def test_target_scaler_standardises_and_round_trips():
  rng = np.random.default_rng(0)
  targets = (5.0 + rng.normal(size=(300, 6)) * np.array([0.01, 0.1, 1, 2, 3, 0.05])).astype(np.float32)
  targets[:, 4] = 7.5  # a dimension with no spread: nothing to learn but its mean
  mean, scale = stolen_copy.target_scaler(targets)
  assert mean.dtype == scale.dtype == np.float32 and mean.shape == scale.shape == (6,)
  np.testing.assert_allclose(mean, targets.astype(np.float64).mean(0), rtol=1e-6)
  spread = [0, 1, 2, 3, 5]
  np.testing.assert_allclose(scale[spread], targets.astype(np.float64).std(0)[spread], rtol=1e-5)
  assert scale[4] == 1.0
  scaler = stolen_copy.target_scaler(targets)
  z = scaler.apply(targets)
  np.testing.assert_allclose(z, (targets - mean) / scale, rtol=1e-6)
  np.testing.assert_allclose(z[:, spread].mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(z[:, spread].std(0), 1, rtol=1e-4)
  np.testing.assert_allclose(scaler.undo(z), targets, rtol=1e-6)  # what measure() reads back


@pytest.mark.parametrize("bad", [np.ones(4), np.ones((1, 3)), np.array([[1.0, np.nan], [2.0, 3.0]])])
def test_target_scaler_rejects_bad_targets(bad):
  with pytest.raises(ValueError, match="targets to standardise"):
    stolen_copy.target_scaler(bad)


def test_batch_indices_cycle_permutations():
  idx = stolen_copy.batch_indices(10, 4, 5, seed=3)
  assert idx.shape == (5, 4)
  flat = idx.ravel()
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  np.testing.assert_array_equal(idx, stolen_copy.batch_indices(10, 4, 5, seed=3))
  with pytest.raises(ValueError, match=">= 1"):
    stolen_copy.batch_indices(0, 4, 5, seed=0)
