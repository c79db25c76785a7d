"""The SimSiam victim's loss (b4b_jax/demo/victim.py) against a PyTorch reference written from the
SimSiam paper's Algorithm 1: D(p, z) = -cos(p, z.detach()), L = D(p1, z2) / 2 + D(p2, z1) / 2.

Value and gradients are compared through a small two-layer network (z = encoder(x), p = predictor(z)),
so the stop-gradient on z (no gradient flows into the encoder through the target branch) and the
symmetrisation are both visible in the encoder's and the predictor's gradients.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from b4b_jax.demo import victim as simsiam


def _torch_loss(w_enc, w_pred, x1, x2):
  def d(p, z):  # the paper's D with stop-gradient
    return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1).mean()
  z1, z2 = torch.tanh(x1 @ w_enc), torch.tanh(x2 @ w_enc)
  p1, p2 = z1 @ w_pred, z2 @ w_pred
  return d(p1, z2) / 2 + d(p2, z1) / 2


def _ours(w_enc, w_pred, x1, x2):
  z1, z2 = jnp.tanh(x1 @ w_enc), jnp.tanh(x2 @ w_enc)
  return simsiam.simsiam_loss(z1, z1 @ w_pred, z2, z2 @ w_pred)


@pytest.mark.parametrize("seed", [0, 1])
def test_simsiam_loss_and_gradients_match_torch(seed):
  rng = np.random.default_rng(seed)
  w_enc = rng.normal(size=(6, 5)).astype(np.float32)
  w_pred = rng.normal(size=(5, 5)).astype(np.float32)
  x1 = rng.normal(size=(7, 6)).astype(np.float32)
  x2 = (x1 + 0.5 * rng.normal(size=(7, 6))).astype(np.float32)  # a second "view"
  tw_enc = torch.tensor(w_enc, dtype=torch.float64, requires_grad=True)
  tw_pred = torch.tensor(w_pred, dtype=torch.float64, requires_grad=True)
  ref = _torch_loss(tw_enc, tw_pred, torch.tensor(x1, dtype=torch.float64),
                    torch.tensor(x2, dtype=torch.float64))
  ref.backward()
  loss, (g_enc, g_pred) = jax.value_and_grad(_ours, argnums=(0, 1))(w_enc, w_pred, x1, x2)
  assert float(loss) == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
  np.testing.assert_allclose(g_enc, tw_enc.grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_pred, tw_pred.grad.numpy(), rtol=1e-4, atol=1e-6)
  assert np.abs(g_enc).max() > 1e-3  # the encoder does get a gradient (through the predictor branch)


def test_loss_bounds_and_collapse_value():
  z = np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32)
  # Predictions equal to the other view's projection: the minimum, -1.
  assert float(simsiam.simsiam_loss(z, z, z, z)) == pytest.approx(-1.0, abs=1e-6)
  # Opposite: +1. Scale-free in both arguments.
  assert float(simsiam.simsiam_loss(z, -3 * z, 2 * z, -z)) == pytest.approx(1.0, abs=1e-6)
