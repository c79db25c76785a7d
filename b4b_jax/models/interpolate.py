"""torch.nn.functional.interpolate(mode="bicubic", align_corners=False) in JAX, for position embeddings.

jax.image.resize(method="cubic") is a different filter: Keys' kernel with a = -0.5 and edge weights
renormalised, while torch uses a = -0.75, clamps source indices at the border, and (when given a
scale_factor) maps coordinates with that factor rather than out/in. DINO resizes position embeddings with
an explicit scale_factor, so matching it needs torch's rule. The interpolation is linear, so it is a
[out, in] matrix per axis, computed here in numpy exactly as torch's CPU kernel computes indices and
weights (float32 coordinates), and applied with two einsums at full precision.
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # torch's bicubic constant (upsample_bicubic2d)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """[len(t), 4] weights of the taps at floor(x) - 1 ... floor(x) + 2 (torch's coefficient formulas)."""
  a = np.float32(_A)

  def conv1(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def conv2(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  one = np.float32(1)
  return np.stack([conv2(t + one), conv1(t), conv1(one - t), conv2((one - t) + one)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int,
                         scale_factor: Optional[float] = None) -> np.ndarray:
  """[out_size, in_size] float32 matrix M with torch_resize(v) = M @ v along one axis.

  scale_factor: the value passed to F.interpolate (torch then uses 1/scale_factor for coordinates);
  None means torch's size= path (in/out).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in={in_size} out={out_size}")
  if scale_factor is not None and scale_factor > 0:
    scale = np.float32(1.0 / scale_factor)
  else:
    scale = np.float32(in_size / out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
  base = np.floor(src)
  t = (src - base).astype(np.float32)
  weights = _cubic_weights(t)
  matrix = np.zeros((out_size, in_size), np.float64)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), idx), weights[:, k])
  return matrix.astype(np.float32)


def resize_bicubic_torch(x: jax.Array, out_hw, scale_factor=None) -> jax.Array:
  """Bicubic resize of [H, W, C] like F.interpolate(..., mode="bicubic", align_corners=False)."""
  h, w = x.shape[0], x.shape[1]
  sh, sw = (None, None) if scale_factor is None else scale_factor
  mh = jnp.asarray(torch_bicubic_matrix(h, out_hw[0], sh))
  mw = jnp.asarray(torch_bicubic_matrix(w, out_hw[1], sw))
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,hwc->owc", mh, x, precision=hp)
  return jnp.einsum("pw,owc->opc", mw, y, precision=hp)


def dino_pos_embed_grid(num_patches: int, image_hw, patch_size: int):
  """DINO's interpolate_pos_encoding arithmetic: (grid side, out grid (h, w), scale factors).

  DINO adds 0.1 to the target grid "to avoid floating point error" and passes
  scale_factor=(h0 / sqrt(N), w0 / sqrt(N)); the output size is floor(side * factor).
  """
  side = int(math.sqrt(num_patches))
  if side * side != num_patches:
    raise ValueError(f"position embedding has {num_patches} patch tokens, not a square grid")
  h0 = image_hw[0] // patch_size + 0.1
  w0 = image_hw[1] // patch_size + 0.1
  factors = (h0 / math.sqrt(num_patches), w0 / math.sqrt(num_patches))
  out = (int(math.floor(side * factors[0])), int(math.floor(side * factors[1])))
  return side, out, factors
