"""Sybil mapper: undoes a dense affine per-user transform under noise as well as least squares."""
import numpy as np
import pytest

from b4b_jax.attacks import mapper


def _sybil_pairs(n=600, d=12, noise=1e-4, seed=0):
  """Account 1 sees x + noise; account k sees (x + other noise) A + B (the paper's e2e transform)."""
  rng = np.random.default_rng(seed)
  x = np.abs(rng.normal(size=(n, d))).astype(np.float32) * 1e-3  # SimSiam-like scale, non-negative
  a = rng.uniform(-1, 1, (d, d))
  b = rng.uniform(-1, 1, d)
  account1 = x + noise * rng.normal(size=x.shape)
  account_k = (x + noise * rng.normal(size=x.shape)) @ a + b
  return account_k.astype(np.float32), account1.astype(np.float32)


def test_linear_mapper_reaches_least_squares_error_and_beats_unmapped():
  src, tgt = _sybil_pairs()
  m = mapper.fit_mapper(src, tgt, kind="linear", epochs=150, learning_rate=1e-2, seed=1)
  # Independent reference: closed-form affine least squares on the same 80/20 split.
  perm = np.random.default_rng(1).permutation(len(src))
  tr, va = perm[:480], perm[480:]
  design = lambda s: np.concatenate([s, np.ones((len(s), 1))], 1).astype(np.float64)
  w, *_ = np.linalg.lstsq(design(src[tr]), tgt[tr].astype(np.float64), rcond=None)
  lstsq_val = np.mean((design(src[va]) @ w - tgt[va]) ** 2)
  assert m.metrics["num_train"] == 480 and m.metrics["num_val"] == 120
  assert m.metrics["val_mse"] < 1.25 * lstsq_val
  assert m.metrics["val_mse"] < 1e-3 * m.metrics["val_mse_unmapped"]
  assert m.metrics["val_cosine"] > 0.9 > m.metrics["val_cosine_unmapped"]
  # The reported validation error is the selected model's, over the whole validation split.
  np.testing.assert_allclose(np.mean((m.apply(src[va]) - tgt[va]) ** 2), m.metrics["val_mse"], rtol=1e-4)


def test_mlp_mapper_trains_and_fit_is_seeded():
  src, tgt = _sybil_pairs(n=400, d=8)
  m1 = mapper.fit_mapper(src, tgt, kind="mlp", epochs=15, learning_rate=1e-3, seed=3)
  m2 = mapper.fit_mapper(src, tgt, kind="mlp", epochs=15, learning_rate=1e-3, seed=3)
  assert m1.metrics == m2.metrics
  assert m1.metrics["val_mse"] < m1.metrics["val_mse_first_epoch"] <= m1.metrics["val_mse_unmapped"]
  restored = mapper.Mapper.from_state("mlp", 8, 8, m1.state())
  np.testing.assert_array_equal(restored.apply(src[:5]), m1.apply(src[:5]))


def test_mapper_rejects_bad_input():
  src, tgt = _sybil_pairs(n=200, d=4)
  with pytest.raises(ValueError, match="paired"):
    mapper.fit_mapper(src, tgt[:100])
  bad = src.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    mapper.fit_mapper(bad, tgt)
  with pytest.raises(ValueError, match="unknown mapper kind"):
    mapper.fit_mapper(src, tgt, kind="conv")
  with pytest.raises(ValueError, match="too few"):
    mapper.fit_mapper(src[:50], tgt[:50])
  m = mapper.fit_mapper(src, tgt, epochs=1)
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    m.apply(src[:, :3])
