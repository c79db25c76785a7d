"""A small stolen copy trained on what one attack received, and its fidelity to the victim.

Used by the attack suite (jobs/attack_suite.py) to turn every (attack, defense) cell into a real model:
`train_copy` runs the steal job's own train step (attacks/train_state.make_train_step: SGD + momentum,
cosine decay, the configured loss of attacks.losses) for a fixed number of steps over the received
(input, answer) pairs, so every attack's copy gets the same optimiser schedule and one compilation
serves the whole suite. How close a copy lands to the victim is evaluation/fidelity.py's job.

Pairs: uint8 images [N, H, W, 3] (what was sent, in pixels) and float32 answers [N, D]. Batches are
drawn from consecutive seeded permutations of the N pairs (with N < batch_size a batch repeats pairs),
so the step count, not N, fixes the compute: an attack that received fewer pairs sees each more often.
"""
from typing import NamedTuple, Optional, Tuple

import jax
import numpy as np
from flax import nnx

from b4b_jax import models as models_lib
from b4b_jax.attacks import losses as losses_lib
from b4b_jax.attacks import train_state as ts
from b4b_jax.utils import distributed


def create_copy_model(arch: str, target_dim: int, *, small_input: bool, seed: int):
  """The stolen architecture, with a 1x1 head to `target_dim` only where its natural width differs."""
  natural = nnx.eval_shape(lambda: models_lib.create_resnet(arch, rngs=nnx.Rngs(0),
                                                            small_input=small_input)).feature_dim
  out_dim = None if natural == target_dim else int(target_dim)
  return models_lib.create_resnet(arch, rngs=nnx.Rngs(seed), out_dim=out_dim, small_input=small_input)


def _encoder(graphdef, params, batch_stats, model, target_dim: int, preprocessing: dict):
  return models_lib.Encoder(graphdef, params, batch_stats,
                            {"rep_dim": int(target_dim), "preprocessing": dict(preprocessing),
                             "representation": {"method": "forward"},
                             "architecture": model.architecture()})


def initial_copy(arch: str, target_dim: int, *, preprocessing: dict, seed: int = 0):
  """The copy before any training (what train_copy starts from with the same seed): the reference a
  trained copy's fidelity and probe accuracy must beat to show that anything was stolen."""
  size = int(preprocessing["input_size"])
  model = create_copy_model(arch, target_dim, small_input=size <= 64, seed=seed)
  return _encoder(*models_lib.split_model(model), model, target_dim, preprocessing)


class TargetScaler(NamedTuple):
  """A thief's per-dimension standardisation of its answers: `apply` maps answers to the copy's
  training targets, `undo` maps the copy's outputs back to the answers' scale."""
  mean: np.ndarray   # [D] float32
  scale: np.ndarray  # [D] float32

  def apply(self, targets: np.ndarray) -> np.ndarray:
    return (targets - self.mean) / self.scale

  def undo(self, outputs: np.ndarray) -> np.ndarray:
    return outputs * self.scale + self.mean


def target_scaler(targets: np.ndarray) -> TargetScaler:
  """The (mean [D], scale [D]) of the answers a thief received, per dimension: it trains its copy on
  scaler.apply(targets) and reads the copy's outputs back through scaler.undo (an affine output layer
  it knows; nothing of the victim's beyond its answers). Why: encoder representations share a large
  mean and vary little around it, so plain MSE is spent on the mean and the copy learns little else
  in a short run; standardised, every dimension's variation weighs equally. A dimension with no spread
  keeps scale 1 (nothing to learn there but its mean)."""
  t = np.asarray(targets, np.float64)
  if t.ndim != 2 or len(t) < 2 or not np.all(np.isfinite(t)):
    raise ValueError(f"need finite [N >= 2, D] targets to standardise, got shape {t.shape}")
  mean, std = t.mean(0), t.std(0)
  scale = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max())), std, 1.0)
  return TargetScaler(mean.astype(np.float32), scale.astype(np.float32))


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """[steps, batch_size] row indices: consecutive seeded permutations of range(n), cut into batches."""
  if n < 1 or batch_size < 1 or steps < 1:
    raise ValueError(f"need n, batch_size and steps >= 1, got {n}, {batch_size}, {steps}")
  rng = np.random.default_rng(seed)
  need = steps * batch_size
  stream = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
  return stream[:need].reshape(steps, batch_size)


def train_copy(images_uint8: np.ndarray, targets: np.ndarray, *, arch: str, preprocessing: dict,
               mean, std, steps: int, batch_size: int, loss: str = "mse", base_lr: float = 0.4,
               temperature: Optional[float] = None, seed: int = 0) -> Tuple[models_lib.Encoder, list]:
  """(the copy as a models.Encoder, its per-step losses), trained from scratch for `steps` steps on
  one device (the suite's copies are small; the steal job is the data-parallel path)."""
  images_uint8, targets = np.asarray(images_uint8), np.asarray(targets, np.float32)
  if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
    raise ValueError(f"copy inputs must be uint8 [N, H, W, C], got {images_uint8.dtype} "
                     f"{images_uint8.shape}")
  if targets.ndim != 2 or len(targets) != len(images_uint8) or not np.all(np.isfinite(targets)):
    raise ValueError(f"copy targets must be finite [N={len(images_uint8)}, D], got {targets.shape}")
  losses_lib.get_loss(loss, temperature=temperature)  # ValueError naming an unknown loss
  size = int(preprocessing["input_size"])
  model = create_copy_model(arch, targets.shape[1], small_input=size <= 64, seed=seed)
  graphdef, params, batch_stats = models_lib.split_model(model)
  cfg = ts.StepConfig(loss=loss, temperature=temperature,
                      learning_rate=ts.scaled_learning_rate(base_lr, batch_size),
                      total_steps=int(steps), momentum=0.9, mean=tuple(float(m) for m in mean),
                      std=tuple(float(s) for s in std), input_size=size,
                      compute_dtype=ts.default_compute_dtype())
  mesh = distributed.data_mesh(1)
  state = distributed.replicate(jax.tree.map(np.asarray, ts.init_state(params, batch_stats, cfg)), mesh)
  step = ts.make_train_step(graphdef, cfg, mesh)
  key = jax.random.key(seed)
  pending = []
  for idx in batch_indices(len(targets), batch_size, steps, seed):
    state, metrics = step(state, images_uint8[idx], targets[idx], key)
    pending.append(metrics["loss"])
  seen = [float(x) for x in jax.device_get(pending)]
  if not np.all(np.isfinite(seen)):
    raise FloatingPointError(f"non-finite loss training the copy ({loss}, lr {base_lr})")
  weights = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
  copy = _encoder(graphdef, weights["params"], weights["batch_stats"], model, targets.shape[1],
                  preprocessing)
  return copy, seen

