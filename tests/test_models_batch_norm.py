"""layers.batch_norm_train: the closed-form backward equals autodiff through the two-pass statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax.models import layers


def _reference(x, scale, bias, eps):  # the plain formulation, differentiated by JAX
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=axes)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes)
  y = (x32 - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
  return y.astype(x.dtype), mean, var


def _loss(fn, x, scale, bias, w_mean, w_var):
  # Non-linear in y, and the statistics' own outputs get a cotangent too (w_mean, w_var != 0).
  y, mean, var = fn(x, scale, bias, 1e-5)
  return (jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(y.shape[-1]))
          + jnp.sum(w_mean * mean) + jnp.sum(w_var * var))


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (6, 7)])  # BatchNorm2d and BatchNorm1d layouts
@pytest.mark.parametrize("stats_cotangent", [0.0, 0.7])
def test_values_and_gradients_match_autodiff(shape, stats_cotangent):
  rng = np.random.default_rng(len(shape))
  x = jnp.asarray(rng.normal(2.0, 3.0, size=shape).astype(np.float32))  # off-centre, off-scale
  c = shape[-1]
  scale = jnp.asarray(rng.normal(size=c).astype(np.float32))
  bias = jnp.asarray(rng.normal(size=c).astype(np.float32))
  w = jnp.full((c,), stats_cotangent, jnp.float32)
  for got, want in zip(layers.batch_norm_train(x, scale, bias, 1e-5), _reference(x, scale, bias, 1e-5)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda *a: _loss(layers.batch_norm_train, *a, w, w), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(lambda *a: _loss(_reference, *a, w, w), argnums=(0, 1, 2))(x, scale, bias)
  for g, r in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_bfloat16_input_tracks_float32_and_keeps_its_dtype():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 4, 4, 5)).astype(np.float32)
  scale, bias = jnp.ones(5), jnp.zeros(5)
  zero = jnp.zeros(5)
  f32 = jax.grad(lambda x: _loss(layers.batch_norm_train, x, scale, bias, zero, zero))(jnp.asarray(x))
  bf16 = jax.grad(lambda x: _loss(layers.batch_norm_train, x, scale, bias, zero, zero))(
      jnp.asarray(x, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), rtol=0.05,
                             atol=0.05 * float(jnp.max(jnp.abs(f32))))


def test_the_module_uses_it_and_updates_running_statistics_like_torch():
  bn = layers.BatchNorm(3)
  x = jnp.asarray(np.random.default_rng(4).normal(1.0, 2.0, size=(10, 3)).astype(np.float32))
  y = bn(x, train=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(_reference(x, jnp.ones(3), jnp.zeros(3), 1e-5)[0]),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * np.asarray(x).mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * np.asarray(x).var(0, ddof=1), rtol=1e-5)
