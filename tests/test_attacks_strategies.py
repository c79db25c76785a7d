"""Attack strategies (b4b_jax/attacks/strategies) on tiny data: they see only what `api.query` returns,
repeat-and-average beats per-query noise by ~sqrt(N) and does nothing against per-input keyed noise,
the perturbations are the near-duplicates they claim, and the canary reads the noise level."""
import types

import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax.attacks import strategies
from b4b_jax.defense import DefendedEncoder, defense_config

pytestmark = pytest.mark.usefixtures("fast_compiles")
H, D = 6, 16
_W = np.random.default_rng(0).normal(size=(H * H * 3, D)).astype(np.float32) / np.sqrt(H * H * 3)


def encoder(images):  # traceable: fused with the defense like a real encoder
  return jnp.reshape(images, (images.shape[0], -1)) @ _W


def _api(noise_keying="per_query", sigma=0.5):
  cfg = defense_config("simsiam", num_projections=2, num_hyperplanes=4, static_sigma=sigma,
                       noise_keying=noise_keying)
  return DefendedEncoder(encoder, cfg, D)


def _images(n, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, H, H, 3)).astype(np.float32)


class RecordingAPI:
  """Exposes nothing but `query`, and returns a result object (the contract of issue 10 point 4)."""

  def __init__(self):
    self.calls = []

  def query(self, account, images):
    self.calls.append((account, len(images)))
    return types.SimpleNamespace(reps=np.asarray(encoder(jnp.asarray(images))), coverage=None)


def test_strategies_use_only_query_and_accept_result_objects_or_arrays():
  api = RecordingAPI()
  s = strategies.QueryOnce(api, ["a"], batch_size=3)
  x = _images(7)
  np.testing.assert_allclose(s.steal(x), np.asarray(encoder(jnp.asarray(x))), atol=1e-6)
  assert api.calls == [("a", 3), ("a", 3), ("a", 1)] and s.queries_sent == {"a": 7}
  assert strategies.reps_of(np.ones((2, 3))).shape == (2, 3)
  r = strategies.RepeatAverage(api, ["b"], copies=4, perturbation="jitter", batch_size=64)
  assert r.steal(x).shape == (7, D) and r.queries_sent == {"b": 28}
  with pytest.raises(ValueError, match="account"):
    s.send(x, account="not-mine")
  with pytest.raises(ValueError, match="copies"):
    strategies.RepeatAverage(api, ["b"], copies=0)


@pytest.mark.parametrize("kind", strategies.PERTURBATIONS)
def test_perturbations_are_near_duplicates(kind):
  x = _images(5, seed=1)
  y = strategies.perturb_images(kind, x, np.random.default_rng(0))
  assert y.shape == x.shape and y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1
  np.testing.assert_array_equal(y, strategies.perturb_images(kind, x, np.random.default_rng(0)))
  diff = np.abs(y - x)
  if kind == "exact":
    assert diff.max() == 0
  elif kind == "jitter":
    assert 0 < diff.max() <= 1 / 255 + 1e-6
  elif kind == "shift":  # every image equals a 1-pixel shift of itself, edge replicated
    for a, b in zip(x, y):
      assert any(np.array_equal(b[1:-1, 1:-1], a[1 + dy:H - 1 + dy, 1 + dx:H - 1 + dx])
                 for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)))
  else:
    assert 0 < diff.mean() < 0.5


def test_repeat_average_beats_per_query_noise_by_sqrt_n_but_not_per_input_noise():
  x = _images(32, seed=2)
  clean = np.asarray(encoder(jnp.asarray(x)))
  for keying, lo, hi in (("per_query", 3.2, 5.0), ("per_input", 1.0, 1.0)):
    s = strategies.RepeatAverage(_api(keying), ["thief"], copies=16, perturbation="exact")
    curve = s.steal_curve(x, [1, 16])
    err = {n: np.sqrt(np.mean((t - clean) ** 2)) for n, t in curve.items()}
    # sqrt(16) = 4 for fresh noise; 1 up to float rounding of the mean of 16 identical answers.
    assert lo - 1e-5 <= err[1] / err[16] <= hi + 1e-5, (keying, err)
  jittered = strategies.RepeatAverage(_api("per_input"), ["thief"], copies=16, perturbation="jitter")
  curve = jittered.steal_curve(x, [1, 16])
  ratio = np.sqrt(np.mean((curve[1] - clean) ** 2)) / np.sqrt(np.mean((curve[16] - clean) ** 2))
  assert ratio < 1.2


def test_canary_reads_fresh_noise_but_not_keyed_noise():
  x = _images(60, seed=3)
  canary = _images(1, seed=4)[0]
  paper = strategies.CanaryProbe(_api("per_query", 0.5), ["c"], canary=canary, batch_size=16,
                                 switch_sigma=0.25, copies=4)
  for i in range(0, 60, 15):
    paper.query_batch(x[i:i + 15])
  assert all(0.3 < e < 0.75 for e in paper.naive_estimates), paper.naive_estimates
  assert paper.switched and paper.steal(x[:3]).shape == (3, D)
  assert paper.queries_sent["c"] == 4 * 16 + 3 * 4
  keyed = strategies.CanaryProbe(_api("per_input", 0.5), ["c"], canary=canary, batch_size=16,
                                 switch_sigma=0.25)
  for i in range(0, 60, 15):
    keyed.query_batch(x[i:i + 15])
  assert keyed.naive_estimates == [0.0, 0.0, 0.0] and not keyed.switched
