"""SimCLR augmentations (b4b_jax/attacks/augment.py) against torchvision's own code on the same draws.

Each op takes the uniforms it draws from its JAX key; torchvision's ColorJitter / GaussianBlur /
RandomResizedCrop then run their real code with those uniforms in place of torch's generator
(tests/torch_reference.py), so the factor ranges, the jitter order and the crop arithmetic are
torchvision's, not a copy of ours.
"""
import sys

sys.modules.setdefault("triton", None)  # see tests/conftest.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402

from b4b_jax.attacks import augment  # noqa: E402
from tests import torch_reference  # noqa: E402

# pylint: disable=protected-access

# Tiny images: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")
# One compilation each for the whole module (strengths and op indices are traced arguments).
_adjust = jax.jit(augment._adjust)
_jitter = jax.jit(augment._color_jitter)
_resized_crop = jax.jit(lambda k, im: augment._resized_crop(k, im, 16, (0.2, 1.0)))

# Our grayscale uses PIL's ITU-R 601 weights (0.299, 0.587, 0.114); torchvision's tensor ops use 0.2989
# for red: a difference of at most 1e-4 per grey value.
GRAY_TOL = 3e-4


def _image(seed, h=20, w=20):
  # Smooth colours plus noise: hues of every sector, saturated and grey pixels, a non-trivial mean.
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([0.5 + 0.45 * np.sin(6 * xx + c * 2.1) * np.cos(4 * yy - c) for c in range(3)], -1)
  return np.clip(base + 0.08 * rng.normal(size=(h, w, 3)), 0, 1).astype(np.float32)


def _chw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)


def _hwc(t):
  return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("which,factor,fn", [
    (0, 1.6, TF.adjust_brightness), (0, 0.35, TF.adjust_brightness),
    (1, 1.7, TF.adjust_contrast), (1, 0.3, TF.adjust_contrast),
    (2, 1.8, TF.adjust_saturation), (2, 0.25, TF.adjust_saturation),
    (3, 0.17, TF.adjust_hue), (3, -0.2, TF.adjust_hue)])
def test_each_colour_adjustment_matches_torchvision(which, factor, fn):
  x = _image(0)
  factors = jnp.asarray([1.0, 1.0, 1.0, 0.0]).at[which].set(factor)
  ours = np.asarray(_adjust(jnp.asarray(x), which, factors))
  ref = _hwc(fn(_chw(x), factor))
  np.testing.assert_allclose(ours, ref, atol=GRAY_TOL if which in (1, 2) else 2e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("strength", [(0.8, 0.8, 0.8, 0.2), (0.4, 0.4, 0.4, 0.1)])
def test_color_jitter_equals_torchvision_colorjitter_on_the_same_draws(seed, strength):
  """Order (a random permutation), factor ranges [1 - s, 1 + s] and [-h, h], and the ops: the real
  torchvision ColorJitter module, its randperm and uniforms replaced by the draws our key makes."""
  key = jax.random.key(seed)
  x = _image(seed + 1)
  ours = np.asarray(_jitter(key, jnp.asarray(x), jnp.asarray(strength, jnp.float32)))
  k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
  perm = [int(i) for i in jax.random.permutation(k_order, 4)]
  uniforms = [float(jax.random.uniform(k)) for k in (k_b, k_c, k_s, k_h)]
  ref = _hwc(torch_reference.torchvision_color_jitter(strength, perm, uniforms)(_chw(x)))
  np.testing.assert_allclose(ours, ref, atol=2 * GRAY_TOL)
  assert np.abs(ours - x).mean() > 0.01  # the jitter did something


def test_grayscale_matches_torchvision():
  x = _image(2)
  ours = np.asarray(jnp.broadcast_to(augment._gray(jnp.asarray(x)), x.shape))
  ref = _hwc(TF.rgb_to_grayscale(_chw(x), num_output_channels=3))
  np.testing.assert_allclose(ours, ref, atol=GRAY_TOL)


@pytest.mark.parametrize("seed,kernel", [(0, 3), (1, 5), (2, 9)])
def test_gaussian_blur_equals_torchvision_gaussianblur_on_the_same_draw(seed, kernel):
  """Kernel exp(-x^2 / 2 sigma^2) normalised, reflect padding, sigma ~ U(0.1, 2): torchvision's
  GaussianBlur(kernel, sigma=(0.1, 2.0)) with its uniform replaced by ours."""
  key = jax.random.key(seed)
  x = _image(seed, 16, 12)
  ours = np.asarray(jax.jit(augment._gaussian_blur, static_argnums=2)(key, jnp.asarray(x), kernel))
  u = float(jax.random.uniform(key))
  ref = _hwc(torch_reference.torchvision_gaussian_blur(kernel, (0.1, 2.0), u)(_chw(x)))
  np.testing.assert_allclose(ours, ref, atol=2e-5)


@pytest.mark.parametrize("size,scale", [(24, (0.08, 1.0)), (7, (0.08, 1.0)), (24, (0.2, 1.0))])
def test_crop_box_equals_torchvision_on_the_same_draws(size, scale):
  """Square images (the stealing views): box k of torchvision's get_params from our ten area and
  log-ratio uniforms and our two offset uniforms; on a square image torchvision's fallback is the
  whole image, as ours."""
  ratio = (3 / 4, 4 / 3)
  keys = jax.random.split(jax.random.key(size), 100)
  boxes = np.stack(jax.jit(jax.vmap(lambda k: augment._crop_box(k, size, size, scale=scale)))(keys), 1)

  def draws(key):
    k_area, k_ratio, k_i, k_j = jax.random.split(key, 4)
    return (jax.random.uniform(k_area, (10,)), jax.random.uniform(k_ratio, (10,)),
            jax.random.uniform(k_i), jax.random.uniform(k_j))

  refs = []
  for u_area, u_ratio, u_top, u_left in zip(*jax.tree.map(np.asarray, jax.vmap(draws)(keys))):
    refs.append(torch_reference.torchvision_rrc_params(
        size, size, scale, ratio, u_area.astype(np.float64), u_ratio.astype(np.float64),
        [float(u_top)] * 10, [float(u_left)] * 10))
  boxes, refs = np.asarray(boxes), np.asarray(refs)
  mismatched = np.flatnonzero((boxes != refs).any(axis=1))
  assert len(mismatched) <= 1, (boxes[mismatched[:5]], refs[mismatched[:5]])  # float32 vs float64
  assert len(np.unique(refs, axis=0)) > 20


@pytest.mark.parametrize("seed", range(6))
def test_resized_crop_matches_torchvision_inside_the_border(seed):
  """The sampled box resized to 16 x 16 (bilinear, antialiased) as torchvision's resized_crop of that
  box. Known gap: our resize reads the whole image through a translation, so the outermost output rows
  and columns also weigh pixels just outside the box (torchvision crops first); they are left out."""
  x = _image(3, 24, 24)
  key = jax.random.key(seed)
  top, left, h, w = (int(v) for v in augment._crop_box(key, 24, 24, scale=(0.2, 1.0)))
  ours = np.asarray(_resized_crop(key, jnp.asarray(x)))
  ref = _hwc(TF.resized_crop(_chw(x), top, left, h, w, [16, 16], antialias=True))
  np.testing.assert_allclose(ours[1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize("height,width", [(24, 24), (8, 40), (40, 8), (30, 24)])
def test_crop_box_fallback_is_torchvision_centre_crop(height, width):
  """With an area scale no draw can satisfy, torchvision's get_params falls back to the largest centred
  box with its aspect ratio clamped into (3/4, 4/3); ours must return the same box."""
  scale = (2.0, 3.0)  # every draw is larger than the image
  ours = tuple(int(v) for v in augment._crop_box(jax.random.key(0), height, width, scale=scale))
  ref = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), [3 / 4, 4 / 3])
  assert ours == tuple(ref)
