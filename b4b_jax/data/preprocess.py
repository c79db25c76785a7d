"""Image preprocessing as in the paper's pipelines: one implementation per op, in TensorFlow ops.

The same functions run inside tf.data pipelines (TFDS, class folders) and over in-memory arrays
(`apply_transform`), so a stealing query is augmented identically whatever its source. Geometry follows
torchvision (RandomResizedCrop sampling, Resize's shorter-side rule, CenterCrop's offsets); resizing is
antialiased like PIL. Randomness is stateless: every random op takes an explicit [2] seed, derived per
example with `example_seed(seed, *ids)`, so the same config seed gives the same images on every run.

Images are uint8 HWC in and uint8 HWC out (rounded and clipped like PIL); `normalize` turns them into the
encoder's float input, on numpy, JAX or TF arrays alike.
"""
import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.data._tf import tf
# Normalisation lives beside the encoder's manifest (TensorFlow-free, so the service can use it);
# re-exported here, where the data pipelines use it.
from b4b_jax.models.normalization import NORMALIZATION  # pylint: disable=unused-import
from b4b_jax.models.normalization import RESIZE_METHODS
from b4b_jax.models.normalization import normalization  # pylint: disable=unused-import
from b4b_jax.models.normalization import normalize  # pylint: disable=unused-import

TRANSFORM_MODES = ("none", "resize", "center_crop", "random_resized_crop")
_RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a centre crop.


# ---------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------
def example_seed(seed, *ids) -> tf.Tensor:
  """A [2] int32 stateless seed for one random draw, from the config seed and integer ids (epoch,
  example index, ...). Different ids give independent streams; the same ids give the same draw."""
  s = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x6234, tf.int64)])  # "b4" in hex, any constant
  s = tf.random.experimental.stateless_fold_in(s, tf.constant(0, tf.int64))
  for i in ids:
    s = tf.random.experimental.stateless_fold_in(s, tf.cast(i, tf.int64))
  return s


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------
def size_hw(size) -> Tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    size = (int(size), int(size))
  size = tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"image size must be a positive int or (height, width), got {size}")
  return size


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  # PIL stores resampled values rounded and clipped to 0..255 (bicubic overshoots).
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Grayscale [..., 1] -> [..., 3] by tiling (Fashion-MNIST, digits); RGBA -> RGB; RGB unchanged."""
  channels = image.shape[-1]
  if channels == 1:
    return tf.repeat(image, 3, axis=-1)
  if channels == 4:
    return image[..., :3]
  if channels == 3:
    return image
  raise ValueError(f"expected 1, 3 or 4 image channels (a static last dimension), got {image.shape}")


def resize(image, size, method: str = "bilinear") -> tf.Tensor:
  """Resize [H, W, C] or [N, H, W, C] to `size` (int or (h, w)) with antialiasing (PIL-like)."""
  return _resize_to(image, tf.constant(size_hw(size), tf.int32), method)


def _resize_to(image, hw: tf.Tensor, method: str) -> tf.Tensor:
  # Like PIL: a horizontal pass, then a vertical one, each rounded and clipped to uint8 (one 2-D pass
  # in float would let bicubic overshoot of the first pass through, unlike PIL and torchvision).
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}")
  shape = tf.shape(image)
  x = _resize_pass(tf.cast(image, tf.float32), tf.stack([shape[-3], hw[1]]), hw[1] >= shape[-2], method)
  return _to_uint8(_resize_pass(tf.cast(_to_uint8(x), tf.float32), hw, hw[0] >= shape[-3], method))


def _resize_pass(x: tf.Tensor, hw: tf.Tensor, upsampling: tf.Tensor, method: str) -> tf.Tensor:
  """x (float) resized to hw along one axis, the other keeping its size; `upsampling`: that axis grows
  or keeps its size.

  Bilinear upsampling is PIL's triangle filter of support 1 at every output pixel, edges included (PIL
  drops the taps outside the image and renormalises, which leaves the edge pixel, as ResizeBilinear's
  clamped coordinate does), so it runs as ResizeBilinear (half-pixel centres): in a tf.data map on the
  2-core CPU a 40x43 crop to 224 px took the two passes at 11,300 images/s this way and 1,600 with
  the antialiased ScaleAndTranslate kernel, which stays for downsampling (a wider filter, like PIL's)
  and for bicubic (PIL's renormalised edge taps differ from ResizeBicubic's clamped ones). The values
  are that kernel's up to float rounding: over 300 random sizes, 0.37 % of pixels moved by 1-2 after
  both passes, and as many differ from PIL's fixed-point results as before (5.0 %)."""
  def antialiased():
    return tf.image.resize(x, hw, method=method, antialias=True)
  if method != "bilinear":
    return antialiased()
  return tf.cond(upsampling, lambda: tf.image.resize(x, hw, method="bilinear", antialias=False),
                 antialiased)


def resize_shorter(image, shorter: int, method: str = "bilinear") -> tf.Tensor:
  """torchvision Resize(int): the shorter side becomes `shorter`, the longer int(shorter*long/short)."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[-3], tf.int64), tf.cast(shape[-2], tf.int64)
  s = tf.constant(int(shorter), tf.int64)
  new_h = tf.where(h <= w, s, (s * h) // w)
  new_w = tf.where(h <= w, (s * w) // h, s)
  return _resize_to(image, tf.cast(tf.stack([new_h, new_w]), tf.int32), method)


def center_crop(image, size) -> tf.Tensor:
  """torchvision CenterCrop: offsets round((H - h) / 2); images smaller than the crop are zero-padded."""
  th, tw = size_hw(size)
  shape = tf.shape(image)
  h, w = shape[-3], shape[-2]
  pad_h, pad_w = tf.maximum(th - h, 0), tf.maximum(tw - w, 0)
  paddings = [[pad_h // 2, (pad_h + 1) // 2], [pad_w // 2, (pad_w + 1) // 2], [0, 0]]
  if image.shape.rank == 4:
    paddings = [[0, 0]] + paddings
  image = tf.pad(image, paddings)
  h, w = h + pad_h, w + pad_w
  # Python's round() is half-to-even, and so is tf.round.
  top = tf.cast(tf.round(tf.cast(h - th, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(w - tw, tf.float64) / 2.0), tf.int32)
  return image[..., top:top + th, left:left + tw, :]


def random_resized_crop_params(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params with stateless TF randomness -> (top, left, h, w) int32.

  Ten attempts: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); w = round(sqrt(area * r)),
  h = round(sqrt(area / r)); the first box that fits wins, at a uniform position. If none fits, the
  whole image centre-cropped to the nearest allowed aspect ratio.
  """
  _check_range("scale", scale, 0.0, 1.0)
  _check_range("ratio", ratio, 0.0, math.inf)
  seeds = tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), 4)
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  area = h * w
  target = area * tf.random.stateless_uniform([_RRC_ATTEMPTS], seeds[0], scale[0], scale[1], tf.float64)
  log_r = tf.random.stateless_uniform([_RRC_ATTEMPTS], seeds[1], math.log(ratio[0]), math.log(ratio[1]),
                                      tf.float64)
  aspect = tf.exp(log_r)
  cw = tf.round(tf.sqrt(target * aspect))
  ch = tf.round(tf.sqrt(target / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  # Uniform integer offsets in [0, H - h] and [0, W - w] for each attempt.
  u_top = tf.random.stateless_uniform([_RRC_ATTEMPTS], seeds[2], dtype=tf.float64)
  u_left = tf.random.stateless_uniform([_RRC_ATTEMPTS], seeds[3], dtype=tf.float64)
  top = tf.floor(u_top * (h - ch + 1))
  left = tf.floor(u_left * (w - cw + 1))
  first = tf.argmax(tf.cast(fits, tf.int32))

  # Fallback: centre crop with the aspect ratio clamped into `ratio`.
  in_ratio = w / h
  fb_w = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  fb_top = tf.floor((h - fb_h) / 2)
  fb_left = tf.floor((w - fb_w) / 2)
  any_fits = tf.reduce_any(fits)
  box = tf.where(any_fits,
                 tf.stack([top[first], left[first], ch[first], cw[first]]),
                 tf.stack([fb_top, fb_left, fb_h, fb_w]))
  return tf.unstack(tf.cast(box, tf.int32))


def random_resized_crop(image, size, seed, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = "bilinear") -> tf.Tensor:
  """RandomResizedCrop(size, scale, ratio) of one HWC image: crop a torchvision-sampled box, resize."""
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_params(shape[0], shape[1], seed, scale, ratio)
  return resize(image[top:top + h, left:left + w, :], size, method)


def random_flip(image, seed) -> tf.Tensor:
  """Horizontal flip of one HWC image with probability 1/2."""
  image = tf.convert_to_tensor(image)
  flip = tf.random.stateless_uniform([], tf.convert_to_tensor(seed)) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[-2]), lambda: image)


def _check_range(name, pair, lo, hi):
  # Both bounds must be positive too: a zero scale gives empty boxes, a zero ratio log(0).
  if len(pair) != 2 or not lo < pair[0] <= pair[1] <= hi:
    raise ValueError(f"{name} must be (low, high) with {lo} < low <= high <= {hi}, got {pair}")


# ---------------------------------------------------------------------------------------------------
# Whole transforms (what a config selects)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Transform:
  """One image pipeline: uint8 HWC (1, 3 or 4 channels, any size) -> uint8 [size, size, 3].

  mode:
    "none"                no geometry change (only RGB conversion and the optional flip)
    "resize"              Resize((size, size)), e.g. CIFAR's Resize(224)
    "center_crop"         Resize(resize_size) on the shorter side + CenterCrop(size) (evaluation);
                          resize_size defaults to round(size * 256 / 224)
    "random_resized_crop" [Resize(resize_size) on the shorter side, if given] + RandomResizedCrop(size,
                          scale, ratio) (stealing queries, DINO training)
  flip: random horizontal flip after the geometry (p = 1/2).
  """
  mode: str = "resize"
  size: int = 224
  resize_size: Optional[int] = None
  method: str = "bilinear"
  flip: bool = False
  scale: Tuple[float, float] = (0.08, 1.0)
  ratio: Tuple[float, float] = (3 / 4, 4 / 3)

  def __post_init__(self):
    if self.mode not in TRANSFORM_MODES:
      raise ValueError(f"transform mode must be one of {TRANSFORM_MODES}, got {self.mode!r}")
    if self.method not in RESIZE_METHODS:
      raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {self.method!r}")
    if self.mode != "none":
      size_hw(self.size)
    if self.resize_size is not None and int(self.resize_size) < 1:
      raise ValueError(f"resize_size must be positive, got {self.resize_size}")
    object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
    object.__setattr__(self, "ratio", tuple(float(r) for r in self.ratio))
    _check_range("scale", self.scale, 0.0, 1.0)
    _check_range("ratio", self.ratio, 0.0, math.inf)

  @property
  def is_random(self) -> bool:
    return self.flip or self.mode == "random_resized_crop"

  @property
  def output_size(self) -> Optional[Tuple[int, int]]:
    return None if self.mode == "none" else size_hw(self.size)

  def __call__(self, image, seed=None) -> tf.Tensor:
    """Applies the transform to one HWC image; `seed` ([2] ints, see example_seed) if random."""
    if self.is_random and seed is None:
      raise ValueError(f"transform {self} is random: pass a seed (see example_seed)")
    image = to_rgb(tf.convert_to_tensor(image))
    if image.dtype != tf.uint8:
      raise ValueError(f"transforms take uint8 images, got {image.dtype.name}")
    seeds = tf.random.experimental.stateless_split(seed, 2) if self.is_random else (None, None)
    if self.mode == "resize":
      image = resize(image, self.size, self.method)
    elif self.mode == "center_crop":
      resize_size = self.resize_size or int(round(size_hw(self.size)[0] * 256 / 224))
      image = center_crop(resize_shorter(image, resize_size, self.method), self.size)
    elif self.mode == "random_resized_crop":
      if self.resize_size is not None:
        image = resize_shorter(image, self.resize_size, self.method)
      image = random_resized_crop(image, self.size, seeds[0], scale=self.scale, ratio=self.ratio,
                                  method=self.method)
    if self.flip:
      image = random_flip(image, seeds[1])
    return image


# The paper's pipelines by name (reference file, section 7.2); `size` scales them for small runs.
def _presets(size: int) -> Mapping[str, Transform]:
  return {
      "resize": Transform("resize", size),
      "resize_flip": Transform("resize", size, flip=True),  # CIFAR/SVHN/STL10 stealing, SimSiam embeds
      "steal_crop": Transform("random_resized_crop", size, flip=True),  # ImageNet stealing queries
      "eval_center": Transform("center_crop", size),  # Resize 256 + CenterCrop 224
      "dino_train": Transform("random_resized_crop", size, resize_size=round(size * 256 / 224),
                              method="bicubic", flip=True),
      "dino_eval": Transform("center_crop", size, method="bicubic"),
  }


TRANSFORM_PRESETS = tuple(_presets(224))


def make_transform(spec: Union[None, str, Transform, Mapping[str, Any]], size: Optional[int] = None
                   ) -> Optional[Transform]:
  """A Transform from a preset name (TRANSFORM_PRESETS, at `size`, default 224), a dict / ConfigDict of
  Transform fields (e.g. {"mode": "random_resized_crop", "size": 32, "flip": True}), or a Transform."""
  if spec is None or isinstance(spec, Transform):
    return spec
  if isinstance(spec, str):
    presets = _presets(size or 224)
    if spec not in presets:
      raise ValueError(f"unknown transform preset {spec!r}; known: {sorted(presets)}")
    return presets[spec]
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if isinstance(spec, Mapping):
    fields = {f.name for f in dataclasses.fields(Transform)}
    unknown = set(spec) - fields
    if unknown:
      raise ValueError(f"unknown transform fields {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = dict(spec)
    if size is not None and "size" not in kwargs:
      kwargs["size"] = size
    return Transform(**kwargs)
  raise ValueError(f"cannot make a transform from {spec!r}")


def apply_transform(images: np.ndarray, transform, *, seed: int = 0, ids: Optional[Sequence[int]] = None,
                    epoch: int = 0, batch_size: int = 256) -> np.ndarray:
  """Runs `transform` over in-memory uint8 images [N, H, W, C] -> uint8 [N, size, size, 3].

  Example i draws its randomness from example_seed(seed, epoch, ids[i]) (ids default to 0..N-1), the
  same per-example seeds as evaluation.embeddings.batches_of, so arrays and streams agree.
  """
  transform = make_transform(transform)
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"apply_transform takes uint8 [N, H, W, C] images, got {images.dtype} "
                     f"{images.shape}")
  n = len(images)
  ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
  if ids.shape != (n,):
    raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
  if n == 0:
    size = transform.output_size or images.shape[1:3]
    return np.zeros((0, *size, 3), np.uint8)
  ds = tf.data.Dataset.from_tensor_slices((images, ids))
  ds = ds.map(lambda im, i: transform(im, example_seed(seed, epoch, i)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Each batch copied into one preallocated result as it arrives: concatenating the list of batches at
  # the end held every batch and the result at once and copied everything once more.
  out = None
  start = 0
  for batch in ds.batch(batch_size).as_numpy_iterator():
    if out is None:
      out = np.empty((n, *batch.shape[1:]), batch.dtype)
    out[start:start + len(batch)] = batch
    start += len(batch)
  return out
