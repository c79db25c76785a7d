"""Per-user output transforms (paper §3.4), drawn once per user from the server key and the user id.

  identity            y = x
  diag_affine         y = x * s + t,            s, t ~ U(-1, 1)^D
  dense_affine        y = x @ A + b,            A ~ U(-1, 1)^{D x D}, b ~ U(-1, 1)^D
  pad_shuffle         y = concat(x, c)[perm],   c ~ N(0, 1)^pad_dim fixed per user, perm of D + pad_dim
  affine_pad_shuffle  diag_affine, then pad_shuffle (independent draws)
  binary              y_j = [x . S_j > b_j],    m = floor(binary_ratio * D) hyperplanes; S rows 0..D-2
                      are -tan(2 pi U[0, 1)), the last row is ones; b_j = S_j . p_j for a random point
                      p_j with coordinates on linspace(0, 1, 1000); optional debinarize: 0 -> U(0, .5],
                      1 -> U(.5, 1] with fresh noise per query.

Only dense_affine and binary hold a matrix; the others are O(D) per user and are applied elementwise /
by gathers, never through a D x D matrix. Parameters of many users live in a "table" (leading axis G);
each row of a batch names its table entry. Matrix transforms are applied per user group (rows sorted by
entry, fixed-size chunks) so a user's matrix is read once per chunk, not materialised per row.
"""
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.defense import config as config_lib
from b4b_jax.defense import keys as keys_lib

Params = Dict[str, jax.Array]
_HIGHEST = jax.lax.Precision.HIGHEST
# Rows per matmul chunk of the matrix transforms. Fixed, so a row's result never depends on how many
# other rows (or users) share its call: mixed batches equal per-user calls bit for bit.
_CHUNK = 64
# Sub-streams of a user's transform key (independent draws for each part).
_SCALE, _SHIFT, _MATRIX, _BIAS, _PAD, _PERM, _SLOPES, _POINTS = range(8)


def user_params(s: config_lib.Settings, stream: jax.Array, uid: jax.Array) -> Params:
  """Transform parameters of the user with 64-bit id `uid` (uint32 [2]); traceable and vmappable."""
  key = keys_lib.user_key(stream, uid)
  sub = lambda i: jax.random.fold_in(key, i)  # pylint: disable=unnecessary-lambda-assignment
  d = s.rep_dim
  out: Params = {}
  if s.transform in ("diag_affine", "affine_pad_shuffle"):
    out["scale"] = jax.random.uniform(sub(_SCALE), (d,), jnp.float32, -1.0, 1.0)
    out["shift"] = jax.random.uniform(sub(_SHIFT), (d,), jnp.float32, -1.0, 1.0)
  if s.transform in ("pad_shuffle", "affine_pad_shuffle"):
    out["pad"] = jax.random.normal(sub(_PAD), (s.pad_dim,), jnp.float32)
    out["perm"] = jax.random.permutation(sub(_PERM), d + s.pad_dim).astype(jnp.int32)
  if s.transform == "dense_affine":
    out["matrix"] = jax.random.uniform(sub(_MATRIX), (d, d), jnp.float32, -1.0, 1.0)
    out["bias"] = jax.random.uniform(sub(_BIAS), (d,), jnp.float32, -1.0, 1.0)
  if s.transform == "binary":
    m = s.binary_dim
    angles = jax.random.uniform(sub(_SLOPES), (d - 1, m), jnp.float32)
    slopes = jnp.concatenate([-jnp.tan(2.0 * jnp.pi * angles), jnp.ones((1, m), jnp.float32)], axis=0)
    points = jax.random.randint(sub(_POINTS), (d, m), 0, 1000).astype(jnp.float32) / 999.0
    out["matrix"] = slopes
    out["bias"] = jnp.sum(slopes * points, axis=0)  # each hyperplane passes through its point
  return out


def make_table(s: config_lib.Settings, stream: jax.Array, uids: jax.Array) -> Params:
  """Parameters of several users (uids uint32 [G, 2]) stacked along a leading axis."""
  if s.transform == "identity" or not s.enabled:
    return {}
  return jax.vmap(lambda u: user_params(s, stream, u))(uids)


def apply(s: config_lib.Settings, table: Params, index: jax.Array, x: jax.Array,
          row_keys: Optional[jax.Array] = None) -> jax.Array:
  """Transforms rows x [N, D]; row n uses table entry index[n]. row_keys: per-row keys (debinarize)."""
  t = s.transform
  if t == "identity":
    return x
  if t in ("diag_affine", "affine_pad_shuffle"):
    x = x * table["scale"][index] + table["shift"][index]
  if t in ("pad_shuffle", "affine_pad_shuffle"):
    padded = jnp.concatenate([x, table["pad"][index]], axis=1)
    x = jnp.take_along_axis(padded, table["perm"][index], axis=1)
  if t == "dense_affine":
    x = grouped_matmul(x, index, table["matrix"]) + table["bias"][index]
  if t == "binary":
    bits = grouped_matmul(x, index, table["matrix"]) > table["bias"][index]
    if s.debinarize:
      if row_keys is None:
        raise ValueError("debinarize needs per-row keys")
      u = jax.vmap(lambda k: jax.random.uniform(k, (s.binary_dim,), jnp.float32))(row_keys)
      x = jnp.where(bits, 0.5, 0.0) + 0.5 * (1.0 - u)  # (0, .5] for 0 bits, (.5, 1] for 1 bits
    else:
      x = bits.astype(jnp.float32)
  return x


def grouped_matmul(x: jax.Array, index: jax.Array, matrices: jax.Array) -> jax.Array:
  """y[n] = x[n] @ matrices[index[n]] without building a per-row matrix.

  Rows are sorted by entry and processed in fixed chunks of _CHUNK rows of one entry each; the loop runs
  sum_g ceil(n_g / _CHUNK) times (data dependent), so a batch of one user costs one plain matmul.
  """
  n, d = x.shape
  num_entries, _, e = matrices.shape
  order = jnp.argsort(index, stable=True)
  xs = jnp.concatenate([x[order], jnp.zeros((_CHUNK, d), x.dtype)], axis=0)
  sizes = jnp.zeros((num_entries,), jnp.int32).at[index].add(1)
  starts = jnp.cumsum(sizes) - sizes
  chunks = (sizes + _CHUNK - 1) // _CHUNK
  chunk_end = jnp.cumsum(chunks)
  chunk_start = chunk_end - chunks

  def body(c, out):
    g = jnp.sum(chunk_end <= c)
    row0 = starts[g] + (c - chunk_start[g]) * _CHUNK
    rows = jax.lax.dynamic_slice(xs, (row0, 0), (_CHUNK, d))
    y = jnp.dot(rows, matrices[g], precision=_HIGHEST)
    mine = (row0 + jnp.arange(_CHUNK)) < starts[g] + sizes[g]
    current = jax.lax.dynamic_slice(out, (row0, 0), (_CHUNK, e))
    return jax.lax.dynamic_update_slice(out, jnp.where(mine[:, None], y, current), (row0, 0))

  out = jax.lax.fori_loop(0, chunk_end[-1], body, jnp.zeros((n + _CHUNK, e), x.dtype))
  return jnp.zeros((n, e), x.dtype).at[order].set(out[:n])


def invert(s: config_lib.Settings, params: Params, y) -> np.ndarray:
  """Recovers the (noised) representation from one user's transformed output (affine transforms).

  `params` are that user's parameters (`user_transform_params`); y is [N, out_dim] or [out_dim].
  """
  if s.transform not in config_lib.INVERTIBLE_TRANSFORMS or not s.enabled:
    if not s.enabled:
      return np.asarray(y)
    raise ValueError(f"transform {s.transform!r} is not invertible")
  y = np.asarray(y, np.float64)
  p = {k: np.asarray(v) for k, v in params.items()}
  d = s.rep_dim
  if s.transform in ("pad_shuffle", "affine_pad_shuffle"):
    unshuffled = np.empty_like(y)
    unshuffled[..., p["perm"]] = y
    y = unshuffled[..., :d]
  if s.transform in ("diag_affine", "affine_pad_shuffle"):
    y = (y - p["shift"]) / p["scale"]
  if s.transform == "dense_affine":
    y = np.linalg.solve(p["matrix"].T.astype(np.float64), (y - p["bias"]).T).T
  return y


def user_transform_params(config, rep_dim: int, user: str) -> Dict[str, np.ndarray]:
  """The transform parameters the server draws for account `user` (from config.seed and the name)."""
  s = config_lib.settings(config, rep_dim)
  stream = keys_lib.stream_key(s.seed, "transform")
  params = user_params(s, stream, jnp.asarray(keys_lib.uid_from_name(user)))
  return {k: np.asarray(v) for k, v in params.items()}


def invert_user_transform(config, rep_dim: int, params: Dict[str, np.ndarray], y) -> np.ndarray:
  """Inverse of one user's affine transform (params from `user_transform_params`); float64 result."""
  return invert(config_lib.settings(config, rep_dim), params, y)


def apply_user_transform(config, rep_dim: int, params: Dict[str, np.ndarray], x,
                         row_keys: Optional[jax.Array] = None) -> np.ndarray:
  """Applies one user's transform (params from `user_transform_params`) to x [N, D]."""
  s = config_lib.settings(config, rep_dim)
  x = jnp.asarray(x, jnp.float32)
  table = {k: jnp.asarray(v)[None] for k, v in params.items()}
  return np.asarray(apply(s, table, jnp.zeros((x.shape[0],), jnp.int32), x, row_keys))
