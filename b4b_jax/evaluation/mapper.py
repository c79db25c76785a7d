"""Mappers from one account's representation space to another's (the sybil's remapping step).

Kept in this one small module so it can be swapped for the attacks part's mapper: the remapping
experiment only calls `fit_mapper(kind, source, target, ...) -> callable`.

  * "linear" (the paper's choice): the affine least-squares map source -> target, solved in closed
    form (float64 normal equations with a tiny ridge relative to the data scale). This is the best any
    linear mapper trained on the same pairs can do, so the remapping cost it reports is not inflated by
    an under-trained optimiser.
  * "mlp": 3-layer ReLU network (the original end-to-end mapper), Adam + MSE on minibatches, the epoch
    chosen on a held-out 20% of the pairs.
"""
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ("linear", "mlp")


def _check_pairs(source, target):
  source = np.asarray(source, np.float64)
  target = np.asarray(target, np.float64)
  if source.ndim != 2 or target.ndim != 2 or source.shape[0] != target.shape[0]:
    raise ValueError(f"mapper pairs must be [n, d_src] and [n, d_dst] with the same n, got "
                     f"{source.shape} and {target.shape}")
  if source.shape[0] < 1:
    raise ValueError("mapper needs at least one pair")
  if not (np.all(np.isfinite(source)) and np.all(np.isfinite(target))):
    raise ValueError("mapper pairs contain NaN or Inf")
  return source, target


def fit_linear_mapper(source, target, *, ridge: float = 1e-9) -> Callable[[np.ndarray], np.ndarray]:
  """Affine least squares target ~ source @ W + b; ridge is relative to the mean Gram eigenvalue."""
  source, target = _check_pairs(source, target)
  # Centring fits the bias exactly and keeps the normal equations well conditioned.
  s_mean, t_mean = source.mean(0), target.mean(0)
  s = source - s_mean
  gram = s.T @ s
  scale = max(float(np.trace(gram)) / gram.shape[0], 1e-300)
  gram[np.diag_indices_from(gram)] += ridge * scale
  w = np.linalg.solve(gram, s.T @ (target - t_mean))
  b = t_mean - s_mean @ w

  def apply(x):
    return (np.asarray(x, np.float64) @ w + b).astype(np.float32)

  return apply


def _mlp_init(key, d_in, d_hidden, d_out):
  dims = [d_in, d_hidden, d_hidden, d_out]
  params = []
  for i, k in enumerate(jax.random.split(key, 3)):
    bound = 1.0 / math.sqrt(dims[i])  # PyTorch Linear's default init range
    kw, kb = jax.random.split(k)
    params.append({"w": jax.random.uniform(kw, (dims[i], dims[i + 1]), minval=-bound, maxval=bound),
                   "b": jax.random.uniform(kb, (dims[i + 1],), minval=-bound, maxval=bound)})
  return params


def _mlp_apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


@functools.partial(jax.jit, static_argnames=("batch_size", "learning_rate"))
def _mlp_epoch(params, opt_state, best, key, xs, ys, xv, yv, *, batch_size, learning_rate):
  opt = optax.adam(learning_rate)
  n = xs.shape[0]
  num_batches = max(n // batch_size, 1)
  order = jax.random.permutation(key, n)[:num_batches * batch_size].reshape(num_batches, -1)

  def step(carry, idx):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((_mlp_apply(p, xs[idx]) - ys[idx]) ** 2))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
  val = jnp.mean((_mlp_apply(params, xv) - yv) ** 2)
  better = val < best["val"]
  best = {"params": jax.tree.map(lambda a, b: jnp.where(better, a, b), params, best["params"]),
          "val": jnp.where(better, val, best["val"])}
  return params, opt_state, best


def fit_mlp_mapper(source, target, *, epochs: int = 50, batch_size: int = 64,
                   learning_rate: float = 1e-4, hidden: int = 0, val_fraction: float = 0.2,
                   seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """3-layer ReLU mapper (hidden = source dim by default), epoch chosen on held-out pairs."""
  source, target = _check_pairs(source, target)
  n = source.shape[0]
  num_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
  perm = np.random.default_rng(seed).permutation(n)
  tr, va = perm[num_val:], perm[:num_val] if num_val else perm
  # Inputs and targets are standardised so one learning rate suits every representation scale.
  mu_s, sd_s = source[tr].mean(0), source[tr].std(0) + 1e-12
  mu_t, sd_t = target[tr].mean(0), target[tr].std(0).mean() + 1e-12
  xs = jnp.asarray((source[tr] - mu_s) / sd_s, jnp.float32)
  ys = jnp.asarray((target[tr] - mu_t) / sd_t, jnp.float32)
  xv = jnp.asarray((source[va] - mu_s) / sd_s, jnp.float32)
  yv = jnp.asarray((target[va] - mu_t) / sd_t, jnp.float32)
  key = jax.random.key(seed)
  params = _mlp_init(key, source.shape[1], hidden or source.shape[1], target.shape[1])
  opt_state = optax.adam(learning_rate).init(params)
  best = {"params": params, "val": jnp.asarray(jnp.inf, jnp.float32)}
  bs = min(batch_size, xs.shape[0])
  for epoch in range(1, epochs + 1):
    params, opt_state, best = _mlp_epoch(params, opt_state, best, jax.random.fold_in(key, epoch), xs,
                                         ys, xv, yv, batch_size=bs, learning_rate=learning_rate)
  final = best["params"]

  def apply(x):
    x = jnp.asarray((np.asarray(x, np.float64) - mu_s) / sd_s, jnp.float32)
    return (np.asarray(_mlp_apply(final, x), np.float64) * sd_t + mu_t).astype(np.float32)

  return apply


def fit_mapper(kind: str, source, target, *, seed: int = 0, **options) -> Callable:
  """Fits a mapper of `kind` on paired rows (source[i] and target[i] answer the same query)."""
  if kind == "linear":
    return fit_linear_mapper(source, target, **{k: v for k, v in options.items() if k == "ridge"})
  if kind == "mlp":
    allowed = {"epochs", "batch_size", "learning_rate", "hidden", "val_fraction"}
    return fit_mlp_mapper(source, target, seed=seed,
                          **{k: v for k, v in options.items() if k in allowed})
  raise ValueError(f"unknown mapper kind {kind!r}; choose one of {KINDS}")
