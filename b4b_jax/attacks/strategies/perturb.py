"""Near-duplicate perturbations a thief applies to repeats (images float32 NHWC in [0, 1]).

Each keeps an image visually the same: `jitter` (uniform +-1/255 per pixel, the smallest change an
8-bit image can carry), `shift` (1 pixel in a random direction, edge replicated), `jpeg` (re-encoded at
a random quality in [70, 95]), `crop_flip` (crop 1-2 pixels off each side, resized back, flipped with
probability 1/2). "exact" returns the images unchanged.
"""
import numpy as np

from b4b_jax.data._tf import tf

PERTURBATIONS = ("exact", "jitter", "shift", "jpeg", "crop_flip")


def perturb_images(kind: str, images01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  if kind not in PERTURBATIONS:
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
  x = np.asarray(images01, np.float32)
  if kind == "exact":
    return x.copy()
  if kind == "jitter":
    return np.clip(x + rng.uniform(-1 / 255, 1 / 255, size=x.shape).astype(np.float32), 0.0, 1.0)
  if kind == "shift":
    return np.stack([_shift(img, *_direction(rng)) for img in x])
  if kind == "jpeg":
    out = []
    for img in x:
      encoded = tf.io.encode_jpeg(tf.constant(np.round(img * 255).astype(np.uint8)),
                                  quality=int(rng.integers(70, 96)))
      out.append(tf.io.decode_jpeg(encoded, channels=img.shape[-1]).numpy().astype(np.float32) / 255)
    return np.stack(out)
  h, w = x.shape[1:3]
  out = []
  for img in x:
    top, left, bottom, right = rng.integers(1, 3, size=4)
    crop = img[top:h - bottom, left:w - right]
    resized = tf.image.resize(crop, (h, w), method="bilinear").numpy()
    out.append(resized[:, ::-1] if rng.random() < 0.5 else resized)
  return np.clip(np.stack(out), 0.0, 1.0).astype(np.float32)


def _direction(rng):
  return [(0, 1), (0, -1), (1, 0), (-1, 0)][int(rng.integers(4))]


def _shift(img, dy, dx):
  pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = img.shape[:2]
  return pad[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
