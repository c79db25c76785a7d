"""Stealing losses: the stolen encoder's outputs against the API's responses for the same images.

All take `stolen` [B, D] and `target` [B, D] (row i of each comes from the same image) and return a
scalar. Under jit with a batch sharded over the "data" mesh the [2B, 2B] similarity matrices of the
contrastive losses span the *global* batch, so every device sees the same negatives as one big device.

- `info_nce` (the paper's loss, tau 0.25): z = L2-normalise(concat[stolen, target]); cosine matrix
  z z^T with the diagonal removed; row i's positive is its pair (stolen_i <-> target_i), the other 2B-2
  rows are negatives; cross-entropy on logits/tau.
- `mse`: mean squared error over all elements (torch's nn.MSELoss default reduction).
- `soft_nearest_neighbor`: Frosst et al.'s soft nearest-neighbour loss over the same 2B points with
  labels = pair index, on squared Euclidean distances / temperature (reference section 7.3).
- `cosine`: 1 - mean cosine similarity of the pairs (scale-free: ignores how far the noise pushes a
  response's norm).
- `huber`: mean elementwise Huber loss, delta in units of the batch targets' RMS (the thief does not
  know the noise scale up front); quadratic for small residuals, linear for the noise's large ones.
The last two are the noise-robust losses of issue 12 (attacks/strategies/denoise.py's robust_loss);
`train.loss` in the steal job selects any of LOSSES, default "infonce" (the paper's).
"""
from typing import Callable

import jax
import jax.numpy as jnp

LOSSES = ("infonce", "mse", "softnn", "cosine", "huber")


def _check_pair(stolen, target):
  if stolen.ndim != 2 or stolen.shape != target.shape:
    raise ValueError(f"stolen {stolen.shape} and target {target.shape} must both be [B, D] and equal")


def _pair_index(batch: int) -> jnp.ndarray:
  """Row i of concat[stolen, target] pairs with row (i + B) mod 2B."""
  idx = jnp.arange(2 * batch)
  return (idx + batch) % (2 * batch)


def _paired_cross_entropy(logits: jnp.ndarray) -> jnp.ndarray:
  """Mean over rows of -log softmax(logits without the diagonal)[pair]; logits is [2B, 2B]."""
  n = logits.shape[0]
  eye = jnp.eye(n, dtype=bool)
  masked = jnp.where(eye, -jnp.inf, logits)
  pos = jnp.take_along_axis(logits, _pair_index(n // 2)[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(masked, axis=1) - pos)


def info_nce(stolen: jnp.ndarray, target: jnp.ndarray, *, temperature: float = 0.25) -> jnp.ndarray:
  _check_pair(stolen, target)
  z = jnp.concatenate([stolen, target], axis=0).astype(jnp.float32)
  # F.normalize semantics: x / max(||x||, eps).
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return _paired_cross_entropy(z @ z.T / temperature)


def mse(stolen: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  _check_pair(stolen, target)
  return jnp.mean(jnp.square(stolen.astype(jnp.float32) - target.astype(jnp.float32)))


def soft_nearest_neighbor(stolen: jnp.ndarray, target: jnp.ndarray, *,
                          temperature: float = 1000.0) -> jnp.ndarray:
  """One same-label neighbour per point: -mean log(exp(-d_pair/T) / sum_{j!=i} exp(-d_ij/T))."""
  _check_pair(stolen, target)
  z = jnp.concatenate([stolen, target], axis=0).astype(jnp.float32)
  sq = jnp.sum(z * z, axis=1)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
  return _paired_cross_entropy(-dist / temperature)


def cosine(stolen: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  _check_pair(stolen, target)
  stolen, target = stolen.astype(jnp.float32), target.astype(jnp.float32)
  num = jnp.sum(stolen * target, axis=1)
  den = jnp.linalg.norm(stolen, axis=1) * jnp.linalg.norm(target, axis=1) + 1e-12
  return 1.0 - jnp.mean(num / den)


def huber(stolen: jnp.ndarray, target: jnp.ndarray, *, delta: float = 1.0) -> jnp.ndarray:
  """0.5 r^2 for |r| <= d, d (|r| - d/2) beyond, d = delta x RMS(target) (of this batch)."""
  _check_pair(stolen, target)
  stolen, target = stolen.astype(jnp.float32), target.astype(jnp.float32)
  d = jnp.float32(delta) * jnp.sqrt(jnp.mean(target * target) + 1e-30)
  r = jnp.abs(stolen - target)
  return jnp.mean(jnp.where(r <= d, 0.5 * r * r, d * (r - 0.5 * d)))


def get_loss(name: str, *, temperature: float = None
             ) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """Loss by config name; `temperature` overrides the loss's default (InfoNCE 0.25, SoftNN 1000)."""
  if name == "infonce":
    t = 0.25 if temperature is None else temperature
  elif name == "softnn":
    t = 1000.0 if temperature is None else temperature
  elif name in ("mse", "cosine", "huber"):  # no temperature (a configured one is ignored, as before)
    return {"mse": mse, "cosine": cosine, "huber": huber}[name]
  else:
    raise ValueError(f"unknown stealing loss {name!r}; choose one of {LOSSES}")
  if not t > 0:
    raise ValueError(f"loss temperature must be > 0, got {t}")
  fn = info_nce if name == "infonce" else soft_nearest_neighbor
  return lambda s, v: fn(s, v, temperature=t)
