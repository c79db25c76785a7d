"""ResNet-18/34/50 with torchvision's exact topology (v1.5), NHWC, as Flax NNX modules.

Module and parameter names mirror torchvision's state-dict keys (`layer1.0.conv1.weight` is
`layer1/0/conv1/kernel` here, `downsample.0`/`downsample.1` are the shortcut conv and BatchNorm), so the
weight converters are one-to-one tables. Differences from flax defaults that matter for equivalence:
explicit torch padding (flax "SAME" pads asymmetrically at stride 2), the stride on the bottleneck's 3x3
conv (v1.5), BatchNorm with torch's eps and momentum (layers.BatchNorm).

Names: "resnet18", "resnet34", "resnet50", and width variants "resnet18_w0.25" (every channel count times
0.25: a 128-d ResNet-18 for quick CPU runs) or "resnet50_w2". The forward returns the average-pooled
feature [N, D]; `out_dim` inserts the B4B stolen-DINO head (a 1x1 conv, no bias, before pooling).
`small_input` swaps the stem for a 3x3 stride-1 conv without max-pool (32x32 images).
On CPU a bottleneck's output is stored once (`layers.stored_once`): XLA's fusion had recomputed the
stage's residual stream inside each of its consumers (in-process A/B: the ResNet-50 stealing step
5-6 % faster with B4B_HOST_MEMORY=keep, a forward 7-9 %; values up to float32 rounding). A basic
block's output is the next block's 3x3 convolution input, which `layers.conv` already keeps.
"""
import re
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from b4b_jax.models import layers

# name -> (block type, blocks per stage)
RESNET_DEPTHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_NAME_RE = re.compile(r"^(resnet\d+)(?:_w(\d+(?:\.\d+)?))?$")


def parse_resnet_name(name: str):
  """'resnet18_w0.25' -> ('resnet18', 'basic', (2, 2, 2, 2), base_width 16). Raises ValueError."""
  match = _NAME_RE.match(name)
  if not match or match.group(1) not in RESNET_DEPTHS:
    raise ValueError(f"unknown ResNet {name!r}; expected one of {sorted(RESNET_DEPTHS)}, optionally "
                     f"with a width suffix such as '_w0.25' or '_w2'")
  width = float(match.group(2)) if match.group(2) else 1.0
  base = 64 * width
  if base < 1 or base != int(base):
    raise ValueError(f"width {width} of {name!r} gives {base} stem channels; 64 * width must be a "
                     f"positive integer")
  block, depths = RESNET_DEPTHS[match.group(1)]
  return match.group(1), block, depths, int(base)


def _conv(cin, cout, kernel, stride, pad, rngs, init=layers.kaiming_normal_fan_out):
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=init, rngs=rngs,
                  conv_general_dilated=layers.conv)  # lax's conv with a faster kernel gradient on CPU


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, planes, 3, stride, 1, rngs)
    self.bn1 = layers.BatchNorm(planes)
    self.conv2 = _conv(planes, planes, 3, 1, 1, rngs)
    self.bn2 = layers.BatchNorm(planes)
    self.downsample = _shortcut(cin, planes, stride, rngs)

  def __call__(self, x, train=False):
    y = jax.nn.relu(self.bn1(self.conv1(x), train))
    y = self.bn2(self.conv2(y), train)
    return jax.nn.relu(y + _apply_shortcut(self.downsample, x, train))


class Bottleneck(nnx.Module):
  """torchvision Bottleneck (v1.5: stride on the 3x3 conv)."""
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, planes, 1, 1, 0, rngs)
    self.bn1 = layers.BatchNorm(planes)
    self.conv2 = _conv(planes, planes, 3, stride, 1, rngs)
    self.bn2 = layers.BatchNorm(planes)
    self.conv3 = _conv(planes, planes * 4, 1, 1, 0, rngs)
    self.bn3 = layers.BatchNorm(planes * 4)
    self.downsample = _shortcut(cin, planes * 4, stride, rngs)

  def __call__(self, x, train=False):
    y = jax.nn.relu(self.bn1(self.conv1(x), train))
    y = jax.nn.relu(self.bn2(self.conv2(y), train))
    y = self.bn3(self.conv3(y), train)
    out = jax.nn.relu(y + _apply_shortcut(self.downsample, x, train))
    # Stored once: XLA recomputed the stage's residual stream in every consumer.
    return layers.stored_once(out, self.conv3.kernel[...])


def _shortcut(cin, cout, stride, rngs):
  # torchvision's `downsample = Sequential(conv1x1, BatchNorm)` where shape changes, else identity.
  if stride == 1 and cin == cout:
    return None
  return nnx.List([_conv(cin, cout, 1, stride, 0, rngs), layers.BatchNorm(cout)])


def _apply_shortcut(downsample, x, train):
  if downsample is None:
    return x
  return downsample[1](downsample[0](x), train)


def max_pool_3x3_s2(x):
  """torch MaxPool2d(3, stride=2, padding=1): padding counts as -inf (layers.max_pool)."""
  return layers.max_pool(x, 3, 2, 1)


class ResNet(nnx.Module):
  """torchvision ResNet without the classifier: __call__(x NHWC, train=False) -> [N, D] features."""

  def __init__(self, name: str = "resnet50", *, rngs: nnx.Rngs, out_dim: Optional[int] = None,
               small_input: bool = False):
    _, block_type, depths, base = parse_resnet_name(name)
    if out_dim is not None and (not isinstance(out_dim, int) or out_dim < 1):
      raise ValueError(f"out_dim must be a positive int or None, got {out_dim!r}")
    self.arch_name = name
    self.out_dim = out_dim
    self.small_input = bool(small_input)
    block_cls = BasicBlock if block_type == "basic" else Bottleneck
    if small_input:  # CIFAR-style stem: keeps 32x32 inputs from collapsing to 1x1 by layer4.
      self.conv1 = _conv(3, base, 3, 1, 1, rngs)
    else:
      self.conv1 = _conv(3, base, 7, 2, 3, rngs)
    self.bn1 = layers.BatchNorm(base)
    cin = base
    for stage, num_blocks in enumerate(depths):
      planes = base * 2**stage
      blocks = []
      for i in range(num_blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(block_cls(cin, planes, stride, rngs=rngs))
        cin = planes * block_cls.expansion
      setattr(self, f"layer{stage + 1}", nnx.List(blocks))
    self.feature_dim = cin
    if out_dim is not None:
      # The B4B stolen model for DINO victims: Conv2d(2048, 1536, 1, bias=False) then avg-pool.
      self.proj = _conv(cin, out_dim, 1, 1, 0, rngs, init=layers.torch_default_kernel)
    else:
      self.proj = None

  @property
  def rep_dim(self) -> int:
    return self.out_dim if self.out_dim is not None else self.feature_dim

  def architecture(self) -> dict:
    return {"name": self.arch_name,
            "kwargs": {"out_dim": self.out_dim, "small_input": self.small_input}}

  def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
    """layer4's output [N, h, w, C] (before the optional projection and pooling)."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects NHWC images with 3 channels, got shape {x.shape}")
    x = jax.nn.relu(self.bn1(self.conv1(x), train))
    if not self.small_input:
      x = max_pool_3x3_s2(x)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x, train)
    return x

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self.feature_map(x, train)
    if self.proj is not None:
      x = self.proj(x)
    return jnp.mean(x, axis=(1, 2))


def create_resnet(name: str, *, rngs: nnx.Rngs, out_dim: Optional[int] = None,
                  small_input: bool = False) -> ResNet:
  """A torchvision-topology ResNet ("resnet18|34|50" with optional "_w<width>")."""
  return ResNet(name, rngs=rngs, out_dim=out_dim, small_input=small_input)
