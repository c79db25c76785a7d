"""Stealing losses against independent PyTorch / numpy implementations of the original formulations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flax import nnx

from b4b_jax import models
from b4b_jax.attacks import losses
from b4b_jax.attacks import train_state as ts
from b4b_jax.utils import distributed


def _torch_info_nce(stolen, victim, tau):
  """The original construction: positives and negatives gathered explicitly, logits = [pos, negs]."""
  b = stolen.shape[0]
  labels = torch.cat([torch.arange(b), torch.arange(b)])
  labels = (labels[None, :] == labels[:, None]).float()
  z = F.normalize(torch.cat([stolen, victim]), dim=1)
  sim = z @ z.T
  mask = torch.eye(2 * b, dtype=torch.bool)
  labels = labels[~mask].view(2 * b, -1)
  sim = sim[~mask].view(2 * b, -1)
  pos = sim[labels.bool()].view(2 * b, -1)
  neg = sim[~labels.bool()].view(2 * b, -1)
  logits = torch.cat([pos, neg], dim=1) / tau
  return F.cross_entropy(logits, torch.zeros(2 * b, dtype=torch.long))


def _numpy_soft_nn(stolen, victim, temperature):
  """Frosst et al. with explicit same-class / all-class neighbourhood sums, in float64."""
  x = np.concatenate([stolen, victim]).astype(np.float64)
  b = stolen.shape[0]
  labels = np.concatenate([np.arange(b), np.arange(b)])
  d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / temperature
  e = np.exp(-d) * (1 - np.eye(2 * b))
  same = (labels[:, None] == labels[None, :]) & ~np.eye(2 * b, dtype=bool)
  return -np.mean(np.log((e * same).sum(1) / e.sum(1)))


@pytest.fixture(name="pair")
def _pair():
  rng = np.random.default_rng(0)
  stolen = rng.normal(size=(6, 5)).astype(np.float32)
  victim = (stolen + 0.5 * rng.normal(size=(6, 5))).astype(np.float32)
  return stolen, victim


@pytest.mark.parametrize("tau", [0.25, 0.1])
def test_info_nce_matches_torch_value_and_gradient(pair, tau):
  stolen, victim = pair
  ts = torch.tensor(stolen, dtype=torch.float64, requires_grad=True)
  ref = _torch_info_nce(ts, torch.tensor(victim, dtype=torch.float64), tau)
  ref.backward()
  value, grad = jax.value_and_grad(lambda s: losses.info_nce(s, jnp.asarray(victim), temperature=tau))(
      jnp.asarray(stolen))
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ts.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_info_nce_is_scale_invariant_and_lower_for_matching_pairs(pair):
  stolen, victim = pair
  base = losses.info_nce(jnp.asarray(stolen), jnp.asarray(victim))
  scaled = losses.info_nce(jnp.asarray(3 * stolen), jnp.asarray(victim))
  np.testing.assert_allclose(scaled, base, rtol=1e-5)
  perfect = losses.info_nce(jnp.asarray(victim), jnp.asarray(victim))
  shuffled = losses.info_nce(jnp.asarray(stolen[::-1].copy()), jnp.asarray(victim))
  assert float(perfect) < float(base) < float(shuffled)


def test_soft_nn_matches_numpy(pair):
  stolen, victim = pair
  for t in (1.0, 10.0):
    got = losses.soft_nearest_neighbor(jnp.asarray(stolen), jnp.asarray(victim), temperature=t)
    np.testing.assert_allclose(float(got), _numpy_soft_nn(stolen, victim, t), rtol=1e-5)


def test_mse_matches_torch(pair):
  stolen, victim = pair
  ref = F.mse_loss(torch.tensor(stolen), torch.tensor(victim)).item()
  np.testing.assert_allclose(float(losses.mse(jnp.asarray(stolen), jnp.asarray(victim))), ref, rtol=1e-6)


def test_cosine_and_huber_match_torch(pair):
  stolen, victim = pair
  s, v = torch.tensor(stolen), torch.tensor(victim)
  ref_cos = 1.0 - F.cosine_similarity(s, v, dim=1).mean().item()
  np.testing.assert_allclose(float(losses.get_loss("cosine")(jnp.asarray(stolen), jnp.asarray(victim))),
                             ref_cos, rtol=1e-5)
  delta = 0.5 * float(torch.sqrt(torch.mean(v * v)))  # delta is relative to the targets' RMS
  ref_huber = F.huber_loss(s, v, delta=delta).item()
  np.testing.assert_allclose(float(losses.huber(jnp.asarray(stolen), jnp.asarray(victim), delta=0.5)),
                             ref_huber, rtol=1e-5)


def test_get_loss_names_defaults_and_errors(pair):
  stolen, victim = map(jnp.asarray, pair)
  np.testing.assert_allclose(losses.get_loss("infonce")(stolen, victim),
                             losses.info_nce(stolen, victim, temperature=0.25))
  np.testing.assert_allclose(losses.get_loss("softnn", temperature=2.0)(stolen, victim),
                             losses.soft_nearest_neighbor(stolen, victim, temperature=2.0))
  with pytest.raises(ValueError, match="unknown stealing loss"):
    losses.get_loss("l7")
  with pytest.raises(ValueError, match="temperature"):
    losses.get_loss("infonce", temperature=0.0)
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    losses.mse(stolen, victim[:3])


class _TinyNet(nnx.Module):
  """A linear map of the flattened image: the train step's loss wiring without a ResNet's compile."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(4 * 4 * 3, 8, rngs=rngs)

  def __call__(self, x, train=False):
    del train
    return self.dense(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("name", ("infonce", "mse", "cosine", "huber"))  # issue 12's robust set
def test_each_stealing_loss_trains_a_tiny_copy(name):
  """train.loss selects every loss in the steal job's train step, and each one trains: a tiny copy of
  a linear teacher, 40 SGD steps on noisy targets, ends with a clearly lower loss."""
  graphdef, params, stats = models.split_model(_TinyNet(nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 4, 4, 3), dtype=np.uint8)
  teacher = rng.normal(size=(48, 8)).astype(np.float32)
  x = (images.astype(np.float32) / 255 - 0.5) / 0.25
  targets = x.reshape(32, -1) @ teacher / 7 + 0.1 * rng.normal(size=(32, 8)).astype(np.float32)
  cfg = ts.StepConfig(loss=name, learning_rate=0.05 if name in ("mse", "huber") else 0.5,
                      total_steps=40, input_size=4, mean=(0.5,) * 3, std=(0.25,) * 3)
  mesh = distributed.data_mesh(1)
  state = distributed.replicate(jax.tree.map(np.asarray, ts.init_state(params, stats, cfg)), mesh)
  step = ts.make_train_step(graphdef, cfg, mesh)
  seen = []
  for _ in range(40):
    state, metrics = step(state, images, targets, jax.random.key(0))
    seen.append(float(metrics["loss"]))
  assert np.all(np.isfinite(seen)) and np.mean(seen[-5:]) < 0.7 * seen[0], (name, seen[0], seen[-5:])


def test_default_stealing_loss_is_the_papers_infonce_unchanged():
  """The paper configs keep loss infonce at tau 0.25, and the train step's loss is exactly
  info_nce(model output, targets) computed outside the step."""
  from configs import steal_simsiam  # pylint: disable=g-import-not-at-top
  c = steal_simsiam.get_config()
  assert (c.train.loss, c.train.temperature) == ("infonce", 0.25)
  assert ts.StepConfig().loss == "infonce"
  graphdef, params, stats = models.split_model(_TinyNet(nnx.Rngs(1)))
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8)
  targets = rng.normal(size=(16, 8)).astype(np.float32)
  cfg = ts.StepConfig(loss=c.train.loss, temperature=c.train.temperature, input_size=4,
                      mean=(0.5,) * 3, std=(0.25,) * 3)
  mesh = distributed.data_mesh(1)
  state = distributed.replicate(jax.tree.map(np.asarray, ts.init_state(params, stats, cfg)), mesh)
  _, metrics = ts.make_train_step(graphdef, cfg, mesh)(state, images, targets, jax.random.key(0))
  out, _ = models.apply_model(graphdef, params, stats, (images.astype(np.float32) / 255 - 0.5) / 0.25,
                              train=True)
  want = losses.info_nce(out, jnp.asarray(targets), temperature=0.25)
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-6)
