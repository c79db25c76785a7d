"""layers.conv: lax's convolution with a custom gradient on CPU (the ResNets' conv): the kernel
gradient of 1x1 kernels as a matmul, and larger kernels' input kept as one buffer for lax's own."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from b4b_jax import models
from b4b_jax.models import layers

_NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(conv_fn, x, w, stride, padding, **kw):
  def loss(x, w):  # a non-linear loss, so the output gradient is not a constant
    return jnp.sum(jnp.sin(conv_fn(x, w, (stride, stride), padding, dimension_numbers=_NHWC, **kw)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("kernel,stride,pad,size", [(3, 1, 1, 9), (3, 2, 1, 9), (1, 1, 0, 8),
                                                    (1, 2, 0, 8), (7, 2, 3, 15), (3, 2, 0, 10)])
def test_forward_and_both_gradients_equal_lax(kernel, stride, pad, size):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(3, size, size, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)).astype(np.float32))
  padding = ((pad, pad), (pad, pad))
  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_NHWC)
  ours = layers.conv(x, w, (stride, stride), padding, dimension_numbers=_NHWC)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))  # the forward is lax's own
  for got, want in zip(_grads(layers.conv, x, w, stride, padding),
                       _grads(jax.lax.conv_general_dilated, x, w, stride, padding)):
    if kernel == 1:  # the kernel gradient is our matmul: the same sums in another order
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5,
                                 atol=2e-5 * float(jnp.max(jnp.abs(want))))
    else:  # lax's own gradients of the kept input: bit for bit
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_larger_kernels_input_stays_one_stored_buffer_through_compilation():
  # The point of layers._kept: XLA must not recompute the input's producers inside the kernel
  # gradient's transpose. It is a conditional in the compiled program; were XLA ever to fold or fuse
  # it away, the ResNet-18 stealing step would lose ~9 % again without any other sign.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)).astype(np.float32))

  def loss(x, w, conv):  # a BatchNorm-like elementwise chain in front, as in a ResNet block
    h = jax.nn.relu(x * 1.5 + 0.25)
    return jnp.sum(jnp.sin(conv(h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)))

  ours = jax.jit(jax.grad(lambda x, w: loss(x, w, layers.conv), argnums=(0, 1)))
  compiled = ours.lower(x, w).compile()
  assert "conditional(" in compiled.as_text()
  got = compiled(x, w)
  want = jax.jit(jax.grad(lambda x, w: loss(x, w, jax.lax.conv_general_dilated), argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_the_kernel_gradient_matches_a_numpy_loop_and_bfloat16_tracks_float32():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  g = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)  # 3x3 kernel, stride 2, padding 1 -> 3x3 out
  expected = np.zeros((3, 3, 3, 2), np.float64)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for i in range(3):
    for j in range(3):
      for oh in range(3):
        for ow in range(3):
          expected[i, j] += xp[:, 2 * oh + i, 2 * ow + j, :].T @ g[:, oh, ow, :]
  got = layers.kernel_gradient(jnp.asarray(x), jnp.asarray(g), (3, 3, 3, 2), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  w = rng.normal(size=(1, 1, 3, 2)).astype(np.float32)  # 1x1: the kernel gradient layers.conv owns
  f32 = _grads(layers.conv, jnp.asarray(x), jnp.asarray(w), 2, ((0, 0), (0, 0)))
  bf16 = _grads(layers.conv, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), 2,
                ((0, 0), (0, 0)))
  for lo, hi in zip(bf16, f32):
    assert lo.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(lo, np.float32), np.asarray(hi), rtol=0.05,
                               atol=0.05 * float(jnp.max(jnp.abs(hi))))


@pytest.mark.parametrize("kw", [dict(padding="SAME"), dict(rhs_dilation=(2, 2)),
                                dict(feature_group_count=2)])
def test_other_convolutions_are_lax_unchanged(kw):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(3, 3, 4 // kw.get("feature_group_count", 1), 6)).astype(np.float32))
  kw = dict(kw)
  padding = kw.pop("padding", ((1, 1), (1, 1)))
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC, **kw)
  ours = layers.conv(x, w, (1, 1), padding, dimension_numbers=_NHWC, **kw)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(layers.conv(
      x, w, (1, 1), padding, dimension_numbers=_NHWC, **kw))))(w))
  assert "custom_vjp" not in jaxpr


def test_resnet_convolutions_take_the_custom_gradient():
  # nnx.Conv passes extra keywords (out_sharding=None); a wiring slip would silently fall back to lax.
  model = models.create_resnet("resnet50", rngs=nnx.Rngs(0))
  graphdef, params, stats = models.split_model(model)
  kernels = [k for k in jax.tree.leaves(params) if k.ndim == 4]
  ones = sum(k.shape[:2] == (1, 1) for k in kernels)
  assert ones == 36 and len(kernels) == 53  # 2 per bottleneck x 16 + 4 shortcuts; + 16 3x3 + the stem

  def grad_jaxpr(size):
    x = jnp.ones((2, size, size, 3))
    return str(jax.make_jaxpr(jax.grad(
        lambda p: jnp.sum(nnx.merge(graphdef, p, stats)(x, train=False))))(params))

  jaxpr = grad_jaxpr(96)  # layer4's maps are 3x3: no map is smaller than its kernel
  assert jaxpr.count("custom_vjp_call") == len(kernels)
  assert jaxpr.count("dot_general") == ones  # each 1x1 kernel gradient is one matmul (nothing else is)
  blocks = 16  # each bottleneck's output stored (layers.stored_once)
  assert jaxpr.count("cond[") == len(kernels) - ones + blocks  # each larger kernel's input kept too
  # At 32 px layer3's maps are 2x2 and layer4's 1x1: their 3x3 convolutions (6 + 3, and each stage's
  # first one reads the larger map but writes the smaller) are matmuls of their patches instead.
  jaxpr = grad_jaxpr(32)
  assert jaxpr.count("custom_vjp_call") == len(kernels) - 9
  assert jaxpr.count("cond[") == len(kernels) - ones - 9 + blocks


@pytest.mark.parametrize("size,kernel,stride,pad", [(2, 3, 1, 1), (1, 3, 1, 1), (4, 3, 2, 1), (3, 3, 2, 1),
                                                    (2, 3, 2, 1), (3, 5, 1, 2), (6, 7, 2, 3)])
def test_maps_smaller_than_the_kernel_are_a_matmul_with_lax_values(size, kernel, stride, pad):
  # XLA's CPU convolution of a map smaller than its kernel (ResNet layer4 at 16 px: 2x2) took 10-130x
  # the time of the same sums as a matmul; the value and both gradients must stay lax's.
  rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(3, size, size + 1, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)).astype(np.float32))
  padding = ((pad, pad), (pad, pad))
  assert layers._map_smaller_than_kernel(x.shape, w.shape, (stride, stride), padding)
  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_NHWC)
  ours = layers.conv(x, w, (stride, stride), padding, dimension_numbers=_NHWC)
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5 * scale)
  for got, want in zip(_grads(layers.conv, x, w, stride, padding),
                       _grads(jax.lax.conv_general_dilated, x, w, stride, padding)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))
  def loss(x, w):
    return jnp.sum(jnp.sin(layers.conv(x, w, (stride, stride), padding, dimension_numbers=_NHWC)))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  assert " convolution(" not in compiled  # neither the forward nor either gradient is a convolution


def test_the_matmul_path_is_for_small_maps_only_and_keeps_bfloat16():
  # ResNet-18 at 32 px (layer4 4x4) and ResNet-50 at 224 px (7x7) keep the convolution everywhere.
  for x_shape, w_shape, stride in [((64, 4, 4, 512), (3, 3, 512, 512), 1), ((64, 8, 8, 256), (3, 3, 256, 512), 2),
                                   ((16, 7, 7, 512), (3, 3, 512, 512), 1), ((16, 3, 3, 8), (3, 3, 8, 8), 1),
                                   ((16, 1, 1, 8), (1, 1, 8, 8), 1)]:
    assert not layers._map_smaller_than_kernel(x_shape, w_shape, (stride, stride), ((1, 1), (1, 1)))
  # A long thin map would need a large tap selection (2 x 400 -> 2 x 400 under 3x3: 5.8 M entries).
  assert not layers._map_smaller_than_kernel((2, 2, 400, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1)))
  # An empty output is lax's to reject, as before.
  assert not layers._map_smaller_than_kernel((1, 1, 1, 2), (3, 3, 2, 2), (1, 1), ((0, 0), (0, 0)))
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 2, 2, 8)).astype(np.float32)
  w = rng.normal(size=(3, 3, 8, 4)).astype(np.float32)
  f32 = layers.conv(jnp.asarray(x), jnp.asarray(w), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
  bf16 = layers.conv(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), (1, 1), ((1, 1), (1, 1)),
                     dimension_numbers=_NHWC)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), rtol=0.05,
                             atol=0.05 * float(jnp.max(jnp.abs(f32))))


def test_a_bottlenecks_output_is_stored_once_and_changes_no_value(monkeypatch):
  # XLA's CPU fusion recomputed a stage's whole residual stream inside each consumer of a bottleneck's
  # output (one fusion read seven 16x14x14x1024 tensors to write one); layers.stored_once stores it.
  model = models.create_resnet("resnet50_w0.125", rngs=nnx.Rngs(0))
  graphdef, params, stats = models.split_model(model)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 96, 96, 3)).astype(np.float32))

  def grad_fn(train):
    return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(models.apply_model(graphdef, p, stats, x,
                                                                         train=train)[0]))))

  larger_kernels, blocks = 17, 16  # at 96 px the 16 3x3 convolutions and the 7x7 stem keep their input
  for train in (False, True):  # batch statistics or running ones: stored alike
    jaxpr = str(jax.make_jaxpr(grad_fn(train))(params))
    assert jaxpr.count("cond[") == larger_kernels + blocks
  forward = jax.jit(lambda p: models.apply_model(graphdef, p, stats, x, train=False)[0])
  assert forward.lower(params).compile().as_text().count(" conditional(") == blocks
  compiled = grad_fn(True).lower(params).compile()
  assert compiled.as_text().count(" conditional(") == larger_kernels + blocks  # survives compilation
  got = compiled(params)
  monkeypatch.setattr(layers, "stored_once", lambda v, anchor: v)
  want = grad_fn(True)(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    # The same values; the fusions around a stored tensor may sum in another order (seen: 9e-5 of a
    # leaf's largest gradient at batch 2, bit for bit in a stealing step at batch 4).
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3,
                               atol=1e-3 * float(jnp.max(jnp.abs(w))))


def test_stored_once_is_the_identity_with_an_identity_gradient():
  x = jnp.arange(6.0).reshape(2, 3) - 2.0
  anchor = jnp.ones((4,))
  np.testing.assert_array_equal(np.asarray(layers.stored_once(x, anchor)), np.asarray(x))
  g_x, g_anchor = jax.grad(lambda v, a: jnp.sum(jnp.sin(layers.stored_once(v, a)) * 3.0),
                           argnums=(0, 1))(x, anchor)
  np.testing.assert_array_equal(np.asarray(g_x), np.asarray(3.0 * jnp.cos(x)))
  np.testing.assert_array_equal(np.asarray(g_anchor), np.zeros(4))
