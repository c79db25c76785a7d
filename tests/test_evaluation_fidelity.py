"""b4b_jax/evaluation/fidelity.py: the copy-vs-victim scores, against independent references.

The linear R^2 is checked against scikit-learn's Ridge fitted the same way (standardised copy features,
penalty ridge x fit rows, unpenalised intercept), and on constructed copies whose answer is known: a copy
that holds the victim in another basis (R^2 ~ 1 while the direct scores call it a failure), and a copy
that learned only the victim's mean (direct rel_mse ~ 1 and a high cosine, but R^2 ~ 0).
"""
import numpy as np
import pytest
from sklearn import linear_model

from b4b_jax.evaluation import fidelity


def _victim(n=400, d=16, seed=0):
  rng = np.random.default_rng(seed)
  # A shared mean far from 0, as encoder representations have: it is what makes cosine flattering.
  return 3.0 + rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3


def test_r2_from_terms_matches_direct_r2_and_rejects_constant_targets():
  rng = np.random.default_rng(1)
  y = rng.normal(size=(50, 3))
  pred = y + 0.5 * rng.normal(size=y.shape)
  direct = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean(0)) ** 2)
  assert np.isclose(fidelity.r2_from_terms(np.sum((y - pred) ** 2, 1), y), direct)
  idx = np.arange(10, 40)
  sub = 1 - np.sum((y[idx] - pred[idx]) ** 2) / np.sum((y[idx] - y[idx].mean(0)) ** 2)
  assert np.isclose(fidelity.r2_from_terms(np.sum((y - pred) ** 2, 1), y, idx), sub)
  with pytest.raises(ValueError, match="no variance"):
    fidelity.r2_from_terms(np.zeros(4), np.ones((4, 2)))


def test_linear_r2_matches_sklearn_ridge():
  rng = np.random.default_rng(2)
  victim = _victim()
  copy = np.tanh(victim @ rng.normal(size=(16, 24)) * 0.2) + 0.3 * rng.normal(size=(400, 24))
  fit, scored = slice(0, 250), slice(250, 400)
  mean, std = copy[fit].mean(0), copy[fit].std(0) + 1e-8
  ridge = linear_model.Ridge(alpha=fidelity.RIDGE * 250).fit((copy[fit] - mean) / std, victim[fit])
  predicted = ridge.predict((copy[scored] - mean) / std)
  y = victim[scored]
  want = 1 - np.sum((y - predicted) ** 2) / np.sum((y - y.mean(0)) ** 2)
  got = fidelity.linear_r2(copy[fit], victim[fit], copy[scored], victim[scored])
  assert 0.2 < want < 0.99
  np.testing.assert_allclose(got, want, rtol=1e-9)
  np.testing.assert_allclose(
      fidelity.linear_residuals(copy[fit], victim[fit], copy[scored], victim[scored]),
      np.sum((y - predicted) ** 2, axis=1), rtol=1e-8)
  # split_linear_r2: the first half fits, the second half is scored.
  np.testing.assert_allclose(fidelity.split_linear_r2(copy, victim),
                             fidelity.linear_r2(copy[:200], victim[:200], copy[200:], victim[200:]))


def test_linear_r2_credits_another_basis_and_not_the_mean():
  rng = np.random.default_rng(3)
  victim = _victim()
  # Another basis: a rotated, rescaled, shifted victim. Direct scores fail it; the linear map does not.
  rotated = (victim - 3.0) @ np.linalg.qr(rng.normal(size=(16, 16)))[0] * 5.0 - 7.0
  assert fidelity.split_linear_r2(rotated, victim) > 0.999
  assert fidelity.direct(rotated, victim)["rel_mse"] > 10
  # The mean only (plus noise unrelated to the image): a high cosine and rel_mse ~ 1, but R^2 <= ~0.
  mean_only = victim.mean(0) + 0.01 * rng.normal(size=victim.shape)
  direct = fidelity.direct(mean_only, victim)
  assert direct["cosine"] > 0.9 and 0.95 < direct["rel_mse"] < 1.05
  assert fidelity.split_linear_r2(mean_only, victim) < 0.05  # held out: features of noise overfit, <= 0


def test_direct_against_a_loop():
  victim = _victim(n=30, d=5)
  copy = victim + np.random.default_rng(4).normal(size=victim.shape)
  cos = np.mean([c @ v / np.linalg.norm(c) / np.linalg.norm(v) for c, v in zip(copy, victim)])
  spread = sum(np.sum((v - victim.mean(0)) ** 2) for v in victim)
  got = fidelity.direct(copy, victim)
  np.testing.assert_allclose(got["cosine"], cos, rtol=1e-12)
  np.testing.assert_allclose(got["rel_mse"], np.sum((copy - victim) ** 2) / spread, rtol=1e-12)


@pytest.mark.parametrize("copy_fit, victim_fit, copy_scored, victim_scored, match", [
    (np.ones((5, 3)), np.ones((4, 2)), np.ones((3, 3)), np.ones((3, 2)), "pair up"),
    (np.ones((5, 3)), np.ones((5, 2)), np.ones((3, 4)), np.ones((3, 2)), "same dimensions"),
    (np.ones((1, 3)), np.ones((1, 2)), np.ones((3, 3)), np.ones((3, 2)), "at least 2"),
    (np.ones(5), np.ones((5, 2)), np.ones((3, 3)), np.ones((3, 2)), r"\[N, D\]"),
    (np.full((5, 3), np.nan), np.ones((5, 2)), np.ones((3, 3)), np.ones((3, 2)), "finite"),
])
def test_bad_input_is_named(copy_fit, victim_fit, copy_scored, victim_scored, match):
  with pytest.raises(ValueError, match=match):
    fidelity.linear_residuals(copy_fit, victim_fit, copy_scored, victim_scored)
  with pytest.raises(ValueError, match="equal"):
    fidelity.direct(np.ones((3, 2)), np.ones((3, 4)))
