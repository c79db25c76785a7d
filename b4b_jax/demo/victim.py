"""The demo's victim: SimSiam (Chen & He, 2021) trained from scratch on bundled data, so the whole B4B
pipeline runs offline. (The paper's victims are pretrained checkpoints converted with weight_conversion.)

A ResNet backbone, a projector and a predictor are trained so that the prediction from one augmented view
matches the (stop-gradient) projection of the other. The backbone is the same `create_resnet` module
every other part uses; only the backbone is kept as the victim encoder (its pooled features are the API's
representations, as for the released SimSiam), saved with `b4b_jax.models.save_encoder` so every later
stage loads it exactly as it would a converted checkpoint.
"""
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from b4b_jax import xla_flags
from b4b_jax.models import layers
from b4b_jax.models.functional import apply_model, split_model
from b4b_jax.models.resnet import create_resnet


class _LinearBN(nnx.Module):
  """Linear (no bias) -> BatchNorm (-> ReLU), the unit of SimSiam's MLP heads."""

  def __init__(self, din: int, dout: int, *, relu: bool, rngs: nnx.Rngs):
    self.linear = nnx.Linear(din, dout, use_bias=False, rngs=rngs,
                             kernel_init=layers.torch_default_kernel)
    self.bn = layers.BatchNorm(dout)
    self.relu = relu

  def __call__(self, x, train):
    x = self.bn(self.linear(x), train)
    return jax.nn.relu(x) if self.relu else x


class SimSiam(nnx.Module):
  """backbone -> projector (3 layers, last BN without ReLU) -> predictor (bottleneck MLP)."""

  def __init__(self, backbone_name: str, *, proj_dim: int, pred_dim: int, small_input: bool,
               rngs: nnx.Rngs):
    self.backbone = create_resnet(backbone_name, rngs=rngs, small_input=small_input)
    d = self.backbone.rep_dim
    self.projector = nnx.List([_LinearBN(d, proj_dim, relu=True, rngs=rngs),
                               _LinearBN(proj_dim, proj_dim, relu=True, rngs=rngs),
                               _LinearBN(proj_dim, proj_dim, relu=False, rngs=rngs)])
    self.pred_hidden = _LinearBN(proj_dim, pred_dim, relu=True, rngs=rngs)
    self.pred_out = nnx.Linear(pred_dim, proj_dim, rngs=rngs, kernel_init=layers.torch_default_kernel)

  def __call__(self, x, train: bool = False):
    z = self.backbone(x, train)
    for layer in self.projector:
      z = layer(z, train)
    p = self.pred_out(self.pred_hidden(z, train))
    return z, p


def negative_cosine(p, z):
  """Mean over rows of -cos(p, stop_gradient(z))."""
  z = jax.lax.stop_gradient(z)
  p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  return -jnp.mean(jnp.sum(p * z, axis=-1))


def simsiam_loss(z1, p1, z2, p2):
  """The symmetric SimSiam loss; its minimum is -1."""
  return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def train_simsiam_victim(images: np.ndarray, config: ml_collections.ConfigDict, *,
                         augment_fn: Callable[[jax.Array, jax.Array], jax.Array],
                         normalize_fn: Callable[[jax.Array], jax.Array],
                         progress=None, metrics_writer=None, stage: str = "victim"):
  """Trains SimSiam on uint8 NHWC `images`; returns (backbone nnx.Module, list of per-epoch losses).

  config: backbone, small_input, proj_dim, pred_dim, epochs, batch_size, base_lr (x batch/256; linear
  warmup over warmup_epochs, then cosine to 0), momentum, weight_decay, seed. `augment_fn(key, images01)` makes one random view of a [B,H,W,3] batch
  in [0, 1]; `normalize_fn` maps [0, 1] images to the encoder's input normalisation.
  """
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"SimSiam training expects uint8 NHWC RGB images, got {images.dtype} "
                     f"{images.shape}")
  batch = int(config.batch_size)
  if len(images) < batch:
    raise ValueError(f"{len(images)} training images is fewer than one batch of {batch}")
  steps_per_epoch = len(images) // batch
  total_steps = steps_per_epoch * int(config.epochs)
  model = SimSiam(config.backbone, proj_dim=config.proj_dim, pred_dim=config.pred_dim,
                  small_input=config.small_input, rngs=nnx.Rngs(config.seed))
  graphdef, params, batch_stats = split_model(model)
  peak = config.base_lr * batch / 256
  warmup = min(steps_per_epoch * int(config.get("warmup_epochs", 0)), total_steps - 1)
  lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps) if warmup > 0 else \
      optax.cosine_decay_schedule(peak, total_steps)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(lr, momentum=config.momentum))
  opt_state = tx.init(params)

  @functools.partial(jax.jit, compiler_options=xla_flags.training_options(jax.default_backend()))
  def train_step(params, batch_stats, opt_state, key, uint8_batch):
    x01 = uint8_batch.astype(jnp.float32) / 255.0
    k1, k2 = jax.random.split(key)
    v1 = normalize_fn(augment_fn(k1, x01))
    v2 = normalize_fn(augment_fn(k2, x01))

    def loss_fn(params):
      # One forward over both views: BatchNorm sees 2B rows, as when SimSiam concatenates views.
      (z, p), new_stats = apply_model(graphdef, params, batch_stats,
                                      jnp.concatenate([v1, v2]), train=True)
      z1, z2 = jnp.split(z, 2)
      p1, p2 = jnp.split(p, 2)
      return simsiam_loss(z1, p1, z2, p2), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  epoch_losses = []
  step = 0
  for epoch in range(int(config.epochs)):
    order = rng.permutation(len(images))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      params, batch_stats, opt_state, loss = train_step(
          params, batch_stats, opt_state, jax.random.fold_in(key, step), images[idx])
      step += 1
      loss = float(loss)
      if not math.isfinite(loss):
        raise FloatingPointError(f"SimSiam loss is {loss} at step {step}")
      losses.append(loss)
      if progress is not None:
        progress.update(step, loss=loss)
      if metrics_writer is not None and (step % 10 == 0 or step == total_steps):
        metrics_writer.write_scalars(step, {"loss": loss, "lr": float(lr(step))}, stage=stage)
    epoch_losses.append(float(np.mean(losses)))
  trained = nnx.merge(graphdef, params, batch_stats)
  return trained.backbone, epoch_losses


# ------------------------------------------------------------------------------------------ collapse
class VictimCollapsedError(RuntimeError):
  """The trained victim maps different images to (nearly) the same direction: SimSiam collapsed."""


def collapse_stats(representations: np.ndarray) -> dict:
  """How far from collapse a set of representations [N, D] is.

  normalized_std: the mean over dimensions of the std of the l2-normalised representations, times
  sqrt(D) (SimSiam paper, Fig. 2): 0 for a collapsed encoder (every image the same direction), about 1
  when the directions spread over the sphere. effective_rank: exp(entropy) of the centred
  representations' singular-value spectrum (1 = one direction carries all the variance, D = isotropic).
  """
  x = np.asarray(representations, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"need [N >= 2, D] representations, got shape {x.shape}")
  z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
  p = s / s.sum() if s.sum() > 0 else np.ones_like(s) / len(s)
  return {"normalized_std": float(z.std(0).mean() * np.sqrt(x.shape[1])),
          "effective_rank": float(np.exp(-np.sum(p * np.log(np.maximum(p, 1e-30))))),
          "top_direction_share": float(p.max())}


def check_not_collapsed(stats: dict, min_normalized_std: float) -> None:
  """Raises VictimCollapsedError, naming the numbers, if collapse_stats' normalized_std is too low."""
  if not stats["normalized_std"] >= min_normalized_std:
    raise VictimCollapsedError(
        f"the SimSiam victim collapsed: the std of its l2-normalised representations per dimension is "
        f"{stats['normalized_std']:.3f} x 1/sqrt(D) (< {min_normalized_std}; about 1 when healthy), "
        f"effective rank {stats['effective_rank']:.1f}. Every later number would measure a constant "
        "encoder. Lower victim.base_lr, raise victim.warmup_epochs or change victim.seed.")
