"""Linear probes: accuracy on separable/shuffled data, validation (never test) picks the model, ridge
matches scikit-learn, bad input is refused."""
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from b4b_jax.evaluation import least_squares
from b4b_jax.evaluation import linear_probe as lp

# One shape for every gradient-probe call below, so the jitted epoch compiles once for the module.
N_TRAIN, N_TEST, DIM, CLASSES = 600, 300, 16, 10


def _blobs(seed, n, centers, noise):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, len(centers), n)
  return (centers[y] + noise * rng.normal(size=(n, centers.shape[1]))).astype(np.float32), y


@pytest.fixture(scope="module")
def separable():
  centers = 4.0 * np.random.default_rng(0).normal(size=(CLASSES, DIM))
  x, y = _blobs(1, N_TRAIN, centers, 1.0)
  xt, yt = _blobs(2, N_TEST, centers, 1.0)
  return x, y, xt, yt


def test_gradient_probe_separable_reaches_high_accuracy_at_any_scale(separable):
  x, y, xt, yt = separable
  # Representations 1000x apart in scale (SimSiam vs DINO) give the same probe after standardising.
  for scale in (1e-3, 1e3):
    res = lp.train_linear_probe(x * scale, y, xt * scale, yt, epochs=4, seeds=(0, 1))
    assert res.test_top1_mean > 97.0, res.summary()
    assert len(res.seeds) == 2 and all(1 <= s.selected <= 4 for s in res.seeds)
    assert res.test_top1_std == pytest.approx(np.std([s.test_top1 for s in res.seeds]))
    # The returned classifiers are the models that were scored (normalisation included).
    for clf, s in zip(res.classifiers, res.seeds):
      assert clf.top1(xt * scale, yt) == pytest.approx(s.test_top1)
    assert "classifiers" not in res.to_dict()
  sgd = lp.train_linear_probe(x, y, xt, yt, method="sgd", learning_rate=0.1, epochs=4, seeds=(0, 1))
  assert sgd.test_top1_mean > 97.0, sgd.summary()


def test_probes_are_at_chance_on_shuffled_labels():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(N_TRAIN, DIM)).astype(np.float32)
  xt = rng.normal(size=(N_TEST, DIM)).astype(np.float32)
  y, yt = rng.integers(0, CLASSES, N_TRAIN), rng.integers(0, CLASSES, N_TEST)
  res = lp.train_linear_probe(x, y, xt, yt, epochs=4, seeds=(0, 1), num_classes=CLASSES)
  ridge = lp.ridge_probe(x, y, xt, yt, num_classes=CLASSES)
  # Chance is 10%; 300 test points give a binomial std of ~1.7 points.
  for r in (res, ridge):
    assert 3.0 < r.test_top1_mean < 17.0, r.summary()


def test_validation_not_test_selects_the_epoch():
  # Train (and so validation) labels follow one rule; the test labels follow the opposite rule. With a
  # small learning rate the probe learns slowly: validation accuracy rises epoch by epoch while test
  # accuracy falls, so the two would pick different epochs.
  rng = np.random.default_rng(5)
  w = rng.normal(size=DIM)
  x = rng.normal(size=(N_TRAIN, DIM)).astype(np.float32)
  xt = rng.normal(size=(N_TEST, DIM)).astype(np.float32)
  y = (x @ w + 0.5 * rng.normal(size=N_TRAIN) > 0).astype(np.int32)
  yt = (xt @ w < 0).astype(np.int32)
  res = lp.train_linear_probe(x, y, xt, yt, epochs=8, learning_rate=2e-4, seeds=(0,),
                              record_test_curve=True, normalization="none")
  s = res.seeds[0]
  val, test = np.asarray(s.val_curve), np.asarray(s.test_curve)
  assert s.selected == int(np.argmax(val)) + 1          # first epoch with the best validation top-1
  assert int(np.argmax(test)) + 1 != s.selected         # test would have chosen another epoch
  assert s.test_top1 == pytest.approx(test[s.selected - 1])
  assert s.test_top1 < test.max() - 5.0
  assert s.val_top1 == pytest.approx(val.max())


def test_ridge_matches_sklearn_and_chooses_on_validation(separable):
  x, y, xt, yt = separable
  res = lp.ridge_probe(x, y, xt, yt, seeds=(0, 1), alphas=(1e-3, 1.0, 1e3))
  assert res.test_top1_mean > 97.0
  for s in res.seeds:
    assert s.selected == sorted((1e-3, 1.0, 1e3), reverse=True)[int(np.argmax(s.val_curve))]
  # Closed form vs scikit-learn's Ridge on the same standardised features and one-hot targets.
  norm = lp.Normalizer.fit("standardize", x)
  xn = norm(x).astype(np.float64)
  onehot = np.eye(CLASSES)[y]
  (alpha, w, b), = least_squares.fit(xn, onehot, [0.5])
  xc = xn - xn.mean(0)
  scale = np.linalg.eigvalsh(xc.T @ xc).mean()
  ref = Ridge(alpha=alpha * scale, fit_intercept=True).fit(xn, onehot)
  np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(b, ref.intercept_, rtol=1e-4, atol=1e-6)
  # The probe itself (moments minus the validation part, refit on all of train), not only the
  # reference path above: with one strength its classifier is sklearn's Ridge on all of train.
  single = lp.ridge_probe(x, y, xt, yt, seeds=(0,), alphas=(0.5,))
  np.testing.assert_allclose(single.classifiers[0].logits(xt), ref.predict(norm(xt).astype(np.float64)),
                             rtol=1e-4, atol=1e-4)
  assert single.test_top1_mean == pytest.approx(
      100.0 * np.mean(np.argmax(ref.predict(norm(xt).astype(np.float64)), 1) == yt))


def test_normalisation_uses_train_statistics_only(separable):
  x, _, xt, _ = separable
  norm = lp.Normalizer.fit("standardize", x)
  np.testing.assert_allclose(norm.mean, x.mean(0), rtol=1e-5, atol=1e-5)
  z = norm(xt + 100.0)  # a shifted test set stays shifted: nothing is re-fitted on it
  assert z.mean() > 10.0
  l2 = lp.Normalizer.fit("l2", x)(xt)
  np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(method="lbfgs"), "unknown gradient probe method"),
    (dict(epochs=0), "epochs"),
    (dict(normalization="whiten"), "unknown normalization"),
    (dict(num_classes=3), r"labels must lie in \[0, 3\)"),
])
def test_bad_probe_arguments_raise(separable, kwargs, match):
  x, y, xt, yt = separable
  with pytest.raises(ValueError, match=match):
    lp.train_linear_probe(x, y, xt, yt, **kwargs)


def test_bad_embeddings_raise(separable):
  x, y, xt, yt = separable
  bad = x.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match="train embeddings contain NaN"):
    lp.ridge_probe(bad, y, xt, yt)
  with pytest.raises(ValueError, match="differ in dimension"):
    lp.ridge_probe(x, y, xt[:, :5], yt)
  with pytest.raises(ValueError, match="labels must have shape"):
    lp.train_linear_probe(x, y[:-1], xt, yt)
  with pytest.raises(ValueError, match=r"shape \[N, D\]"):
    lp.train_linear_probe(x[:, :, None], y, xt, yt)


@pytest.mark.parametrize("rows,dims", [(12, 40), (39, 40), (60, 40)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relative", [True, False])
def test_least_squares_fit_matches_a_direct_ridge_solve_with_fewer_or_more_rows_than_dims(
    rows, dims, dtype, relative):
  # Fewer rows than dims take the N x N (row Gram) route, the others the D x D one; both must be the
  # direct solve of (Xc^T Xc + alpha s I) w = Xc^T Tc, b = mean t - mean x w, in float64.
  rng = np.random.default_rng(rows)
  x = (rng.normal(size=(rows, dims)) * rng.uniform(0.1, 10, dims) + 3.0).astype(dtype)
  t = rng.normal(size=(rows, 3)) + x[:, :3].astype(np.float64)
  alphas = [1e-3, 0.5, 20.0]
  x64 = x.astype(np.float64)
  xc, tc = x64 - x64.mean(0), t - t.mean(0)
  gram = xc.T @ xc
  scale = np.linalg.eigvalsh(gram).clip(0).mean() if relative else 1.0
  fits = list(least_squares.fit(x, t, alphas, relative=relative))
  assert [a for a, _, _ in fits] == alphas
  tol = 1e-9 if dtype == np.float64 else 1e-4
  for alpha, w, b in fits:
    ref_w = np.linalg.solve(gram + alpha * scale * np.eye(dims), xc.T @ tc)
    ref_b = t.mean(0) - x64.mean(0) @ ref_w
    assert w.shape == (dims, 3) and b.shape == (3,)
    np.testing.assert_allclose(w, ref_w, rtol=tol, atol=tol * np.abs(ref_w).max())
    np.testing.assert_allclose(x64 @ w + b, x64 @ ref_w + ref_b, rtol=tol,
                               atol=tol * np.abs(t).max())
