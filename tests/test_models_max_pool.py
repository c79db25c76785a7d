"""layers.max_pool: torch's MaxPool2d values and gradients, with the closed-form backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from b4b_jax.models import layers


def _torch_pool_and_grad(x, g, window, stride, padding):
  xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
  y = torch.nn.functional.max_pool2d(xt, window, stride, padding)
  y.backward(torch.tensor(g).permute(0, 3, 1, 2))
  return y.detach().permute(0, 2, 3, 1).numpy(), xt.grad.permute(0, 2, 3, 1).numpy()


def _ours(x, g, window, stride, padding):
  y, vjp = jax.vjp(lambda x_: layers.max_pool(x_, window, stride, padding), jnp.asarray(x))
  return np.asarray(y), np.asarray(vjp(jnp.asarray(g))[0])


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)])
@pytest.mark.parametrize("size", [9, 10])  # odd and even: the last window is clipped or not
@pytest.mark.parametrize("ties", [False, True])
def test_matches_torch(window, stride, padding, size, ties):
  rng = np.random.default_rng(size + 10 * window + stride)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  if ties:  # few distinct values: most windows hold their max more than once (first one wins)
    x = np.round(x).astype(np.float32)
  out = (size + 2 * padding - window) // stride + 1
  g = rng.normal(size=(2, out, out, 3)).astype(np.float32)
  want_y, want_dx = _torch_pool_and_grad(x, g, window, stride, padding)
  y, dx = _ours(x, g, window, stride, padding)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
  assert np.count_nonzero(dx) == np.count_nonzero(want_dx)  # one receiver per window, the same one


def test_matches_autodiff_of_reduce_window_and_keeps_bfloat16():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 12, 12, 4)).astype(np.float32))

  def plain(x_):
    return jax.lax.reduce_window(x_, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))

  def loss(pool, x_):
    return jnp.sum(jnp.sin(pool(x_)) * jnp.arange(4.0))

  got = jax.jit(jax.grad(lambda x_: loss(lambda v: layers.max_pool(v, 3, 2, 1), x_)))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(lambda x_: loss(plain, x_))(x)),
                             rtol=1e-6, atol=1e-6)
  xb = x.astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda v: layers.max_pool(v, 3, 2, 1), xb)
  (dx,) = vjp(jnp.ones_like(y))
  assert y.dtype == dx.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(plain(xb).astype(jnp.float32)))
  # Each window's unit gradient lands on exactly one input: the total is the number of windows.
  assert float(jnp.sum(dx.astype(jnp.float32))) == y.size
