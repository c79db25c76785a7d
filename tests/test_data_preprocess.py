"""Preprocessing against independent references: PIL / torchvision geometry and resampling, torchvision's
RandomResizedCrop sampler, ToTensor + Normalize."""
import sys

# TensorFlow and triton (pulled in by torchvision) segfault when triton loads after TF; torch on CPU
# never needs triton.
sys.modules.setdefault("triton", None)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from b4b_jax.data import preprocess as pp  # noqa: E402
from b4b_jax.data._tf import tf  # noqa: E402
from tests import torch_reference  # noqa: E402

_PIL_METHOD = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _smooth_image(h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([128 + 100 * np.sin(xx / 5 + c) * np.cos(yy / 7) for c in range(3)], -1).astype(
      np.uint8)


def _noise_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(16, 20), (80, 90), (8, 60)])
def test_resize_matches_pil(method, size):
  for image, tol in ((_smooth_image(37, 53), 1), (_noise_image(37, 53), 4)):
    ours = pp.resize(image, size, method).numpy().astype(int)
    ref = np.asarray(Image.fromarray(image).resize(size[::-1], _PIL_METHOD[method])).astype(int)
    assert ours.shape == (*size, 3)
    diff = np.abs(ours - ref)
    assert diff.max() <= tol, (method, size, diff.max())
    assert diff.mean() < 0.35


def test_resize_batch_and_identity():
  images = np.stack([_noise_image(9, 11, s) for s in range(3)])
  out = pp.resize(images, (9, 11)).numpy()
  np.testing.assert_array_equal(out, images)  # same size: no change
  with pytest.raises(ValueError, match="resize method"):
    pp.resize(images, 4, "nearest")
  with pytest.raises(ValueError, match="image size"):
    pp.resize(images, (0, 4))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("hw", [(33, 47), (47, 33), (40, 40)])
def test_resize_shorter_and_center_crop_match_torchvision(method, hw):
  image = _smooth_image(*hw)
  pil = Image.fromarray(image)
  interp = getattr(T.InterpolationMode, method.upper())
  ref = np.asarray(T.CenterCrop(16)(T.Resize(21, interpolation=interp)(pil))).astype(int)
  resized = pp.resize_shorter(image, 21, method)
  assert min(resized.shape[:2]) == 21
  assert np.asarray(T.Resize(21, interpolation=interp)(pil)).shape == tuple(resized.shape)
  ours = pp.center_crop(resized, 16).numpy().astype(int)
  assert ours.shape == ref.shape == (16, 16, 3)
  assert np.abs(ours - ref).max() <= 1


def test_center_crop_offsets_and_padding_like_torchvision():
  image = torch.arange(7 * 10 * 3, dtype=torch.int32).reshape(7, 10, 3) % 251
  for size in [(4, 5), (2, 7), (7, 10), (9, 12)]:
    ref = TF.center_crop(image.permute(2, 0, 1), list(size)).permute(1, 2, 0).numpy()
    ours = pp.center_crop(tf.constant(image.numpy()), size).numpy()
    np.testing.assert_array_equal(ours, ref)


def _our_params(h, w, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), with_draws=False):
  """Boxes of pp.random_resized_crop_params for n example seeds and, with_draws, the uniforms in
  [0, 1) behind them: its four [2] sub-seeds each give ten float64 uniforms (one per attempt) for the
  area fraction, the log aspect ratio, the top and the left offset."""
  seeds = tf.stack([pp.example_seed(7, i) for i in range(n)])

  def one(seed):
    box = tf.stack(pp.random_resized_crop_params(h, w, seed, scale, ratio))
    subs = tf.random.experimental.stateless_split(seed, 4)
    draws = tf.stack([tf.random.stateless_uniform([10], subs[k], dtype=tf.float64) for k in range(4)])
    return box, draws

  fn = tf.function(lambda s: tf.map_fn(one, s, fn_output_signature=(tf.int32, tf.float64)))
  boxes, draws = fn(seeds)
  return (boxes.numpy(), draws.numpy()) if with_draws else boxes.numpy()


def _torch_params(h, w, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  torch.manual_seed(0)
  img = torch.zeros(1, h, w)
  return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


# (height, width, scale): boxes that mostly fit; a wide image where about a quarter of the examples
# use all ten attempts and fall back to torchvision's centre crop; a tall one; small crops of a small
# image, where off-by-one offsets show.
@pytest.mark.parametrize("h,w,scale", [(60, 90, (0.08, 1.0)), (60, 90, (0.7, 1.0)),
                                       (90, 40, (0.5, 1.0)), (9, 7, (0.05, 0.3))])
def test_random_resized_crop_params_equal_torchvision_box_by_box(h, w, scale):
  """Each of our boxes equals the box torchvision's own get_params computes from the same uniform
  draws (tests/torch_reference.py runs torchvision's code with its random calls scripted): area
  fraction, log-uniform aspect ratio, rounding of the sides, first fitting attempt, offsets
  floor(u * (H - h + 1)), and the centre-crop fallback after ten misses."""
  n = 200
  ratio = (3 / 4, 4 / 3)
  ours, draws = _our_params(h, w, n, scale, ratio, with_draws=True)
  ref = np.array([torch_reference.torchvision_rrc_params(h, w, scale, ratio, *d) for d in draws])
  mismatched = np.flatnonzero((ours != ref).any(axis=1))
  # Float32 (torch's log of the ratio bounds) against float64 can move a side across a .5 rounding
  # boundary in a rare draw; anything systematic changes most boxes.
  assert len(mismatched) <= 1, (ours[mismatched[:5]], ref[mismatched[:5]])
  full = (ref[:, 2] == h) | (ref[:, 3] == w)
  if scale[0] == 0.7:  # the fallback branch was exercised, and agreed
    assert 20 < full.sum() < 180
  assert len(np.unique(ref, axis=0)) > n // 4  # varied boxes, not one repeated fallback


def test_random_resized_crop_params_match_torchvision_distribution():
  # torchvision with its own random stream: same law of the boxes (a check of the seeding, which the
  # box-by-box test above takes as given).
  h, w, n = 60, 90, 600
  ours, ref = _our_params(h, w, n), _torch_params(h, w, n)
  for boxes in (ours, ref):
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
  for k, name in enumerate(["top", "left", "h", "w"]):
    se = np.sqrt(ours[:, k].var() / n + ref[:, k].var() / n)
    assert abs(ours[:, k].mean() - ref[:, k].mean()) < 4 * se, name


@pytest.mark.parametrize("hw", [(5, 300), (300, 5)])
def test_random_resized_crop_fallback_equals_torchvision(hw):
  # No box of area >= 8 % fits such thin images: both fall back to the same centre crop.
  ours = _our_params(*hw, 5)
  ref = _torch_params(*hw, 5)
  np.testing.assert_array_equal(ours, ref)


def test_random_resized_crop_resamples_the_box_like_torchvision():
  image = _smooth_image(50, 70)
  seed = pp.example_seed(3, 1)
  top, left, h, w = (int(v) for v in pp.random_resized_crop_params(50, 70, seed))
  ours = pp.random_resized_crop(image, 24, seed).numpy().astype(int)
  ref = np.asarray(TF.resized_crop(Image.fromarray(image), top, left, h, w, [24, 24])).astype(int)
  assert np.abs(ours - ref).max() <= 1


def test_random_flip_is_a_fair_horizontal_flip():
  image = _noise_image(4, 6)
  flipped = 0
  for i in range(200):
    out = pp.random_flip(image, pp.example_seed(0, i)).numpy()
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 70 < flipped < 130
  a = pp.random_flip(image, pp.example_seed(5, 9)).numpy()
  np.testing.assert_array_equal(a, pp.random_flip(image, pp.example_seed(5, 9)).numpy())


def test_normalize_exact_against_torchvision():
  image = _noise_image(5, 7)
  for name in ("imagenet", "cifar", "svhn"):
    mean, std = pp.NORMALIZATION[name]
    ref = T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(image))).permute(1, 2, 0).numpy()
    ours = pp.normalize(image, spec=name)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)  # numpy: bit-identical
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: pp.normalize(x, mean, std))(
        jnp.asarray(image))), ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(pp.normalize(tf.constant(image), mean, std).numpy(), ref, atol=2e-6)
  assert pp.NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert pp.NORMALIZATION["cifar"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
  assert pp.NORMALIZATION["svhn"] == ((0.4300, 0.4284, 0.4427), (0.1963, 0.1979, 0.1995))


def test_normalization_from_manifest_and_bad_specs():
  manifest = {"architecture": "resnet50", "preprocessing": {"mean": [0.1, 0.2, 0.3],
                                                            "std": [0.5, 0.5, 0.25]}}
  mean, std = pp.normalization(manifest)
  np.testing.assert_allclose(mean, [0.1, 0.2, 0.3])

  class Enc:
    pass
  enc = Enc()
  enc.manifest = {"normalization": "cifar"}
  np.testing.assert_allclose(pp.normalization(enc)[1], pp.NORMALIZATION["cifar"][1])
  with pytest.raises(ValueError, match="unknown normalisation 'imnet'"):
    pp.normalization("imnet")
  with pytest.raises(ValueError, match="positive std"):
    pp.normalization(([0, 0, 0], [1, 0, 1]))
  with pytest.raises(ValueError, match="no normalisation"):
    pp.normalization({"architecture": "vit"})
  with pytest.raises(ValueError, match="RGB"):
    pp.normalize(np.zeros((2, 2, 1), np.uint8), spec="imagenet")


def test_transforms_shapes_presets_and_errors():
  gray = np.random.default_rng(1).integers(0, 256, (30, 45, 1), dtype=np.uint8)
  seed = pp.example_seed(0, 0)
  for name in pp.TRANSFORM_PRESETS:
    t = pp.make_transform(name, size=16)
    out = t(gray, seed)
    assert out.dtype == tf.uint8 and tuple(out.shape) == (16, 16, 3), name
  np.testing.assert_array_equal(pp.Transform("none")(gray).numpy(), np.repeat(gray, 3, -1))
  t = pp.make_transform({"mode": "random_resized_crop", "size": 8, "flip": True})
  assert t.is_random and t.size == 8
  with pytest.raises(ValueError, match="is random: pass a seed"):
    t(gray)
  with pytest.raises(ValueError, match="transform mode"):
    pp.Transform("crop")
  with pytest.raises(ValueError, match="scale"):
    pp.Transform("random_resized_crop", 8, scale=(0.5, 0.1))
  with pytest.raises(ValueError, match="unknown transform fields"):
    pp.make_transform({"mode": "resize", "sise": 3})
  with pytest.raises(ValueError, match="unknown transform preset"):
    pp.make_transform("steal")


def test_apply_transform_is_seeded():
  images = np.stack([_noise_image(20, 24, s) for s in range(6)])
  crop = pp.make_transform("steal_crop", size=12)
  a = pp.apply_transform(images, crop, seed=1)
  b = pp.apply_transform(images, pp.make_transform({"mode": "random_resized_crop", "size": 12,
                                                    "flip": True}), seed=1)
  c = pp.apply_transform(images, crop, seed=2)
  d = pp.apply_transform(images, crop, seed=1, epoch=1)
  assert a.shape == (6, 12, 12, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, d)
  # Example i's draw depends only on (seed, epoch, id), not on its neighbours.
  np.testing.assert_array_equal(pp.apply_transform(images[3:4], crop, seed=1, ids=[3]), a[3:4])
  with pytest.raises(ValueError, match="uint8"):
    pp.apply_transform(images.astype(np.float32), "resize")
