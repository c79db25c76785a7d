"""Stealing losses against independent PyTorch / numpy implementations of the original formulations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from b4b_jax.attacks import losses


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


def test_get_loss_names_defaults_and_errors(pair):
  stolen, victim = map(jnp.asarray, pair)
  np.testing.assert_allclose(losses.get_loss("infonce")(stolen, victim),
                             losses.info_nce(stolen, victim, temperature=0.25))
  np.testing.assert_allclose(losses.get_loss("softnn", temperature=2.0)(stolen, victim),
                             losses.soft_nearest_neighbor(stolen, victim, temperature=2.0))
  with pytest.raises(ValueError, match="unknown stealing loss"):
    losses.get_loss("cosine")
  with pytest.raises(ValueError, match="temperature"):
    losses.get_loss("infonce", temperature=0.0)
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    losses.mse(stolen, victim[:3])
