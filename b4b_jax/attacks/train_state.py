"""The stolen encoder's training state and its one jitted, data-parallel train step.

The state is a plain pytree {"step", "params", "batch_stats", "opt_state"} (nnx.State leaves, which
orbax stores as is). The step is `jax.jit` over a 1-D "data" mesh: images and targets sharded
P("data"), state replicated P() and donated. Because the model sees the *global* batch array,
BatchNorm statistics and the contrastive loss's negatives span all devices and hosts (SyncBN, as the
paper's multi-GPU runs), and 1 device and 8 devices compute the same function.

Optimiser as the paper's stealing setup: SGD, momentum 0.9, weight decay 0, lr = base_lr * batch / 256,
cosine decay to 0 over all steps (optax, per step; the original stepped it per epoch).
"""
import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from b4b_jax import xla_flags
from b4b_jax.attacks import augment as augment_lib
from b4b_jax.attacks import losses
from b4b_jax.data import preprocess
from b4b_jax.models import apply_model
from b4b_jax.utils import distributed


COMPUTE_DTYPES = ("float32", "bfloat16")


def default_compute_dtype() -> str:
  """bfloat16 on GPUs and TPUs (tensor cores / MXU; tests/test_attacks_train_step.py checks it tracks
  the float32 loss), float32 on CPUs (XLA's CPU convolutions gain nothing from bf16)."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


class StepConfig(NamedTuple):
  """Everything the compiled step depends on besides shapes (hashable: a jit cache key)."""
  loss: str = "infonce"
  temperature: Optional[float] = None
  learning_rate: float = 0.1           # peak lr after the batch/256 scaling
  total_steps: int = 1
  momentum: float = 0.9
  weight_decay: float = 0.0
  mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
  std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
  augment: bool = False                # attacker-side SimCLR views of the (uint8) query images
  input_size: int = 224
  center_targets: bool = False         # subtract the global batch mean of the responses (see below)
  # Mixed precision: "bfloat16" runs the forward and backward in bf16 (params, optimiser state, BatchNorm
  # statistics, the loss and the update stay float32; models.apply_model). "float32": as before.
  compute_dtype: str = "float32"


def scaled_learning_rate(base_lr: float, global_batch: int) -> float:
  return base_lr * global_batch / 256.0


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  if not cfg.learning_rate > 0 or cfg.total_steps < 1 or not 0 <= cfg.momentum < 1:
    raise ValueError(f"invalid optimiser settings: lr={cfg.learning_rate}, "
                     f"total_steps={cfg.total_steps}, momentum={cfg.momentum}")
  schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.total_steps)
  parts = []
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
  return optax.chain(*parts)


def init_state(params, batch_stats, cfg: StepConfig) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
          "opt_state": make_optimizer(cfg).init(params)}


def _cosine(a, b):
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return jnp.mean(jnp.sum(a * b, axis=1))


@functools.lru_cache(maxsize=16)
def make_train_step(graphdef, cfg: StepConfig, mesh: jax.sharding.Mesh):
  """Compiled `step(state, images uint8, targets, key) -> (state, metrics)`; cached per (model, cfg,
  mesh) so repeated runs in one process (resumption, tests) reuse the compilation."""
  if cfg.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {cfg.compute_dtype!r}")
  tx = make_optimizer(cfg)
  loss_fn = losses.get_loss(cfg.loss, temperature=cfg.temperature)
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(distributed.DATA_AXIS))

  def step(state, images, targets, key):
    if cfg.augment:
      x01 = augment_lib.simclr_augment(jax.random.fold_in(key, state["step"]),
                                       images.astype(jnp.float32) / 255.0, cfg.input_size)
      x = (x01 - jnp.asarray(cfg.mean)) / jnp.asarray(cfg.std)
    else:
      x = preprocess.normalize(images, cfg.mean, cfg.std)
    x = jax.lax.with_sharding_constraint(x, data)
    targets = targets.astype(jnp.float32)
    if cfg.center_targets:
      # A per-user affine transform y = xA + b adds the same offset b to every response; with
      # SimSiam-scale features b dominates and every response points the same way. Centring over the
      # (global) batch removes b, leaving an invertible linear image of the victim's representation.
      targets = targets - jnp.mean(targets, axis=0, keepdims=True)

    # Fresh copies of the batch-stat Variables, made inside the grad trace: nnx refuses to let
    # BatchNorm update Variables that were created at the outer (jit) trace level.
    def objective(params, batch_stats):
      batch_stats = jax.tree.map(lambda v: v, batch_stats)
      out, new_stats = apply_model(graphdef, params, batch_stats, x, train=True,
                                   compute_dtype=jnp.dtype(cfg.compute_dtype))
      return loss_fn(out, targets), (out, new_stats)

    (loss, (out, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state["params"], state["batch_stats"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "batch_stats": new_stats, "opt_state": opt_state}
    metrics = {"loss": loss, "cosine_to_target": _cosine(out, targets),
               "learning_rate": optax.cosine_decay_schedule(cfg.learning_rate, cfg.total_steps)(
                   state["step"]),
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  # On CPU the memory-optimised op order: a 2.7x smaller temporary buffer, faulted in afresh each step
  # (xla_flags.py, 2.).
  return jax.jit(step, in_shardings=(repl, data, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,),
                 compiler_options=xla_flags.training_options(mesh.devices.flat[0].platform))
