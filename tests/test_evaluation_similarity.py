"""evaluation/similarity.cosine_similarity: the one row-wise cosine, against a plain loop reference, and
the callers that used to carry their own copy."""
import numpy as np
import pytest

from b4b_jax.attacks import mapper as mapper_lib
from b4b_jax.evaluation import fidelity
from b4b_jax.evaluation import remap
from b4b_jax.evaluation import similarity


def _reference(a, b):
  out = []
  for x, y in zip(a.tolist(), b.tolist()):  # python floats: an independent float64 path
    nx, ny = sum(v * v for v in x) ** 0.5, sum(v * v for v in y) ** 0.5
    out.append(0.0 if nx == 0 or ny == 0 else sum(p * q for p, q in zip(x, y)) / (nx * ny))
  return np.asarray(out)


def _rows():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  a[1] = 0.0                      # a zero row on one side ...
  b[3] = 0.0                      # ... and on the other
  b[4] = -2.5 * a[4]              # exactly opposite
  b[5] = 1e-3 * a[5]              # same direction, tiny norm
  return a, b


def test_matches_reference_with_zero_rows():
  a, b = _rows()
  got = similarity.cosine_similarity(a, b)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, _reference(a, b), rtol=1e-12, atol=1e-15)
  assert got[1] == 0.0 and got[3] == 0.0
  np.testing.assert_allclose(got[[4, 5]], [-1.0, 1.0], rtol=1e-12)
  both_zero = similarity.cosine_similarity(np.zeros((2, 3)), np.zeros((2, 3)))
  np.testing.assert_array_equal(both_zero, [0.0, 0.0])


def test_keeps_float32_and_callers_agree():
  a, b = _rows()
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  got32 = similarity.cosine_similarity(a32, b32)
  assert got32.dtype == np.float32
  np.testing.assert_allclose(got32, _reference(a, b), rtol=1e-5, atol=1e-6)
  # The callers that had their own copy now report the helper's numbers.
  np.testing.assert_allclose(remap.cosine_distance(a, b), 1.0 - _reference(a, b), rtol=1e-12,
                             atol=1e-15)
  assert mapper_lib._cosine(a32, b32) == float(np.mean(got32))  # pylint: disable=protected-access
  np.testing.assert_allclose(fidelity.direct(a, b)["cosine"], np.mean(_reference(a, b)),
                             rtol=1e-12)


def test_bad_shapes():
  with pytest.raises(ValueError, match="equal-shaped"):
    similarity.cosine_similarity(np.ones((3, 2)), np.ones((3, 4)))
  with pytest.raises(ValueError, match="equal-shaped"):
    similarity.cosine_similarity(np.ones(3), np.ones(3))
