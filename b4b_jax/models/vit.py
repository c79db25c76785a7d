"""DINO's VisionTransformer (ViT tiny/small/base, patch 16 or 8) as a Flax NNX module.

Matches facebookresearch/dino's vision_transformer.py (and timm's key names): a CLS token, learned
position embedding over CLS + patches, pre-norm blocks with LayerNorm eps 1e-6, one qkv Linear with bias
split in (3, heads, head_dim) order, exact (erf) GELU, and a final LayerNorm. Parameter paths mirror the
torch keys (`blocks.3.attn.qkv.weight` is `blocks/3/attn/qkv/kernel`).

Other input resolutions interpolate the patch position embeddings with torch's bicubic kernel and DINO's
scale-factor arithmetic (interpolate.py), so they match DINO's torch code, not jax.image.resize.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from b4b_jax.models import interpolate
from b4b_jax.models import layers

# name -> (embed_dim, depth, num_heads); DINO's vit_tiny / vit_small / vit_base (mlp_ratio 4).
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
_LN_EPS = 1e-6
_trunc02 = nnx.initializers.truncated_normal(0.02)  # DINO's trunc_normal_(std=.02) for weights


def _linear(cin, cout, rngs):
  return nnx.Linear(cin, cout, kernel_init=_trunc02, bias_init=nnx.initializers.zeros, rngs=rngs)


def _layer_norm(dim, rngs):
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"embed dim {dim} does not divide by {num_heads} heads")
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, rngs)
    self.proj = _linear(dim, dim, rngs)

  def __call__(self, x):
    b, n, c = x.shape
    h = self.num_heads
    # torch: qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    qkv = self.qkv(x).reshape(b, n, 3, h, c // h).transpose(2, 0, 3, 1, 4)  # [3, B, heads, N, hd]
    q, k, v = qkv[0], qkv[1], qkv[2]
    # Heads-major layout: XLA:CPU runs these batched matmuls about 2x faster than token-major einsums.
    # Scaling q (not the logits) by head_dim**-0.5 = 1/8 is exact for DINO's 64-wide heads.
    out = attention(q * (c // h) ** -0.5, k, v).transpose(0, 2, 1, 3).reshape(b, n, c)
    return self.proj(out)


def attention(q, k, v):
  """softmax(q k^T) v over [B, heads, N, head_dim], normalised after the value product: the row sums
  divide the [N, head_dim] output instead of the [N, N] weights. softmax(s) v = (exp(s - max) v) / sum
  exactly; in float32 the two orders differ by rounding (~1e-6 relative). XLA:CPU fuses the unnormalised
  weights into the value product, which made ViT-S/16's attention about 2x faster forward (session 37)
  and left its backward as fast; the max is a constant to autodiff, as in jax.nn.softmax."""
  logits = jnp.einsum("bhnd,bhmd->bhnm", q, k)
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = jnp.einsum("bhnm,bhmd->bhnd", weights, v)
  return out * (1.0 / jnp.sum(weights, axis=-1, keepdims=True))


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, rngs)
    self.fc2 = _linear(hidden, dim, rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, rngs)
    self.attn = Attention(dim, num_heads, rngs=rngs)
    self.norm2 = _layer_norm(dim, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)

  def __call__(self, x):
    # Each LayerNorm's output stored once (CPU only; the same values): XLA:CPU fuses a LayerNorm into
    # the matmul it feeds (qkv, fc1), and that fused matmul ran at ~120 instead of ~180 GFLOP/s once its
    # input outgrew the caches (ViT-S/16 at batch 128: the forward 13.9 -> 16.9 img/s; batch 32 alike).
    x = x + self.attn(layers.stored_once(self.norm1(x), self.norm1.scale[...]))
    return x + self.mlp(layers.stored_once(self.norm2(x), self.norm2.scale[...]))


class PatchEmbed(nnx.Module):

  def __init__(self, patch_size: int, dim: int, *, rngs: nnx.Rngs):
    self.patch_size = patch_size
    # torch's default Conv2d init (DINO leaves patch_embed.proj at it).
    self.proj = nnx.Conv(3, dim, (patch_size, patch_size), strides=(patch_size, patch_size),
                         padding="VALID", use_bias=True, rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)  # [B, H/p, W/p, D]; like torch, a remainder smaller than a patch is dropped
    return x.reshape(x.shape[0], -1, x.shape[-1])


class VisionTransformer(nnx.Module):
  """__call__(x NHWC) -> final-norm CLS token [N, D] (DINO's forward with num_classes=0)."""

  def __init__(self, name: str = "vit_small", *, rngs: nnx.Rngs, patch_size: int = 16,
               img_size: int = 224):
    if name not in VIT_SIZES:
      raise ValueError(f"unknown ViT {name!r}; expected one of {sorted(VIT_SIZES)}")
    if patch_size < 1 or img_size < patch_size:
      raise ValueError(f"need 1 <= patch_size <= img_size, got patch {patch_size}, image {img_size}")
    dim, depth, heads = VIT_SIZES[name]
    self.arch_name = name
    self.patch_size = int(patch_size)
    self.img_size = int(img_size)
    self.embed_dim = dim
    self.patch_embed = PatchEmbed(patch_size, dim, rngs=rngs)
    num_patches = (img_size // patch_size) ** 2
    self.cls_token = nnx.Param(_trunc02(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(_trunc02(rngs.params(), (1, num_patches + 1, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
    self.norm = _layer_norm(dim, rngs)

  def architecture(self) -> dict:
    return {"name": self.arch_name,
            "kwargs": {"patch_size": self.patch_size, "img_size": self.img_size}}

  @property
  def rep_dim(self) -> int:
    return self.embed_dim

  def interpolate_pos_encoding(self, image_hw) -> jax.Array:
    """Position embedding for an image of `image_hw`, resized the way DINO does (torch bicubic)."""
    pos = self.pos_embed[...]
    num_patches = pos.shape[1] - 1
    grid = (image_hw[0] // self.patch_size, image_hw[1] // self.patch_size)
    # DINO's test: same token count and a square image (a non-square image with the same grid is
    # still resized, by a factor of (grid + 0.1) / grid).
    if grid[0] * grid[1] == num_patches and image_hw[0] == image_hw[1]:
      return pos
    side, out_hw, factors = interpolate.dino_pos_embed_grid(num_patches, image_hw, self.patch_size)
    if out_hw != grid:
      raise ValueError(f"position-embedding interpolation gave a {out_hw} grid for {grid} patches")
    patch_pos = pos[0, 1:].reshape(side, side, -1)
    patch_pos = interpolate.resize_bicubic_torch(patch_pos, out_hw, factors)
    return jnp.concatenate([pos[:, :1], patch_pos.reshape(1, -1, pos.shape[-1])], axis=1)

  def prepare_tokens(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ViT expects NHWC images with 3 channels, got shape {x.shape}")
    if x.shape[1] < self.patch_size or x.shape[2] < self.patch_size:
      raise ValueError(f"image {x.shape[1:3]} is smaller than one {self.patch_size}px patch")
    tokens = self.patch_embed(x)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, self.embed_dim))
    tokens = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)
    return tokens + self.interpolate_pos_encoding(x.shape[1:3])

  def get_intermediate_layers(self, x: jax.Array, n: int = 1):
    """Outputs of the last n blocks, each through the final norm: list of [B, 1 + patches, D]."""
    if not 1 <= n <= len(self.blocks):
      raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
    x = self.prepare_tokens(x)
    outputs = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if len(self.blocks) - i <= n:
        outputs.append(self.norm(x))
    return outputs

  def dino_representation(self, x: jax.Array, n_last_blocks: int = 4) -> jax.Array:
    """B4B's DINO victim output: normed CLS tokens of the last n blocks, concatenated (1536-d ViT-S)."""
    return jnp.concatenate([o[:, 0] for o in self.get_intermediate_layers(x, n_last_blocks)], axis=-1)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout / stochastic depth in the frozen victim
    x = self.prepare_tokens(x)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)[:, 0]


def create_vit(name: str, *, rngs: nnx.Rngs, patch_size: int = 16, img_size: int = 224):
  """DINO ViT ("vit_tiny|vit_small|vit_base"), patch 16 or 8 (any patch size is accepted)."""
  return VisionTransformer(name, rngs=rngs, patch_size=patch_size, img_size=img_size)
