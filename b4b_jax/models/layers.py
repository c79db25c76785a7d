"""Layers with PyTorch semantics, so converted torch weights give torch's numbers.

`BatchNorm` differs from `nnx.BatchNorm` in what torch does differently: running statistics are updated
with momentum 0.1 in torch's convention (new = 0.9 * old + 0.1 * batch) and the running variance uses the
unbiased batch variance (n / (n - 1)), while normalisation in training uses the biased one.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torch.nn.Conv2d / Linear keep no state; only their initialisation differs from flax's defaults.
# torchvision ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every conv.
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Conv2d/Linear init: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm{1,2}d over the last (channel) axis.

  train=True normalises with the batch statistics (global over a batch sharded across devices when
  called under jax.jit) and updates the running statistics; train=False uses the running statistics.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               zero_scale: bool = False):
    self.scale = nnx.Param(jnp.zeros((num_features,)) if zero_scale else jnp.ones((num_features,)))
    self.bias = nnx.Param(jnp.zeros((num_features,)))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
    self.var = nnx.BatchStat(jnp.ones((num_features,)))
    self.momentum = momentum
    self.epsilon = epsilon

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if train:
      axes = tuple(range(x.ndim - 1))
      count = int(np.prod([x.shape[a] for a in axes]))
      if count < 2:
        raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got input "
                         f"shape {x.shape}")
      # Statistics in float32 even for bfloat16 activations (mixed precision): a bf16 sum over a
      # batch of 256 x 56 x 56 values would lose the mean; the running averages stay float32.
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=axes)
      # Two-pass variance: E[(x - mean)^2] is accurate where E[x^2] - mean^2 cancels.
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      unbiased = var * (count / (count - 1))
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = self.mean[...], self.var[...]
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    if x.dtype == jnp.float32:
      return (x - mean) * inv + self.bias[...]
    # Mixed precision: fold the normalisation into one scale and shift in float32, apply in x's dtype.
    shift = self.bias[...] - mean * inv
    return x * inv.astype(x.dtype) + shift.astype(x.dtype)
