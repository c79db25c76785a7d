"""Defense parameters (shared, secret) and the per-user defense state (a pytree with a leading user axis).

State layout for capacity U, P projections, K hyperplanes (W = max(1, 2^K / 32) words):
  occupancy    uint32 [U, P, W]  bit b of word w of projection p: bucket 32 w + b was hit by this user
  counts       int32  [U, P]     occupied buckets per projection (always popcount(occupancy))
  num_batches  int32  [U]        query batches answered (folded into the noise key)
  num_queries  int32  [U]        representations answered
  uids         uint32 [U, 2]     64-bit user id (sha256 of the account name) per slot
At P=20, K=12: 10240 + 80 + 4 + 4 + 8 = 10336 bytes per user.
Only with noise_keying="per_input" (hardened.py; None otherwise, so the paper's state is unchanged):
  fine_occupancy uint32 [U, 1, W'] the seen codes (all fine codes hashed to b bits) this user was answered for
  fine_counts    int32  [U, 1]     how many distinct ones (repeats = num_queries - fine_counts)
"""
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.defense import config as config_lib
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import lsh


@flax.struct.dataclass
class DefenseParams:
  """What the server holds besides per-user state: hyperplanes and key streams (all from config.seed)."""
  hyperplanes: jax.Array  # (P, D, K) float32
  projection: jax.Array  # (P*K, D) the same numbers, laid out for one matmul
  threshold: jax.Array  # (P*K,) hash_center @ R (zeros without centring): bit = x @ R > threshold
  transform_key: jax.Array  # typed PRNG key: per-user transforms
  noise_key: jax.Array  # typed PRNG key: per-user, per-query noise
  settings: config_lib.Settings = flax.struct.field(pytree_node=False)
  fine_projection: Optional[jax.Array] = None  # per_input only: (T*b, D) fine-code hyperplanes
  fine_threshold: Optional[jax.Array] = None  # per_input only: (T*b,) hash_center @ fine hyperplanes
  image_omega: Optional[jax.Array] = None  # per_input, image_weight > 0: (G*G, F) random frequencies
  image_phase: Optional[jax.Array] = None  # per_input, image_weight > 0: (F,) random phases


@flax.struct.dataclass
class DefenseState:
  occupancy: jax.Array
  counts: jax.Array
  num_batches: jax.Array
  num_queries: jax.Array
  uids: jax.Array
  fine_occupancy: Optional[jax.Array] = None
  fine_counts: Optional[jax.Array] = None

  @property
  def capacity(self) -> int:
    return self.occupancy.shape[0]


STATE_FIELDS = ("occupancy", "counts", "num_batches", "num_queries", "uids", "fine_occupancy",
                "fine_counts")


def make_params(config, rep_dim: int) -> DefenseParams:
  """Validates `config` (ValueError naming the field) and derives the server's parameters."""
  s = config_lib.settings(config, rep_dim)
  hyperplanes, projection, transform_key, noise_key = _derive(
      jnp.uint32(s.seed), s.num_projections, s.rep_dim, s.num_hyperplanes)
  center = None if config.hash_center is None else jnp.asarray(config.hash_center, jnp.float32)
  fine = {}
  if s.noise_keying == "per_input":
    from b4b_jax.defense import hardened  # pylint: disable=g-import-not-at-top  (imports this module)
    fine = hardened.make_fine_params(s, center)
  return DefenseParams(hyperplanes=hyperplanes, projection=projection,
                       threshold=lsh.hash_threshold(projection, center),
                       transform_key=transform_key, noise_key=noise_key, settings=s, **fine)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _derive(seed, num_projections, rep_dim, num_hyperplanes):
  # One compiled call instead of a dozen eager ops (each eager op compiles on first use).
  hyperplanes = lsh.make_hyperplanes(keys_lib.stream_key(seed, "lsh"), num_projections, rep_dim,
                                     num_hyperplanes)
  return (hyperplanes, lsh.projection_matrix(hyperplanes), keys_lib.stream_key(seed, "transform"),
          keys_lib.stream_key(seed, "noise"))


def state_shapes(settings: config_lib.Settings, capacity: int) -> dict:
  p, w = settings.num_projections, lsh.words_per_projection(settings.num_hyperplanes)
  return {"occupancy": ((capacity, p, w), np.uint32), "counts": ((capacity, p), np.int32),
          "num_batches": ((capacity,), np.int32), "num_queries": ((capacity,), np.int32),
          "uids": ((capacity, 2), np.uint32)} | (
              {"fine_occupancy": ((capacity, 1, lsh.words_per_projection(settings.fine_code_bits)),
                                  np.uint32), "fine_counts": ((capacity, 1), np.int32)}
              if settings.noise_keying == "per_input" else {})


def init_state(params: DefenseParams, capacity: int) -> DefenseState:
  """Empty state for `capacity` user slots (no bucket occupied, no query answered)."""
  if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
    raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
  shapes = state_shapes(params.settings, int(capacity))
  # Host zeros + transfer: no per-shape kernel compilation for a one-off fill.
  return DefenseState(**{k: jax.device_put(np.zeros(shape, dtype)) for k, (shape, dtype) in
                         shapes.items()})


def grow_state(state: DefenseState, capacity: int) -> DefenseState:
  """The same state with room for `capacity` slots (existing slots keep everything)."""
  if capacity < state.capacity:
    raise ValueError(f"cannot shrink the defense state from {state.capacity} to {capacity} slots")
  return resize_rows(state, capacity)


@functools.partial(jax.jit, static_argnums=1)
def resize_rows(tree, rows: int):
  """Every leaf cut or zero-padded along its leading axis to `rows` (one compiled call)."""
  def resize(a):
    if rows <= a.shape[0]:
      return a[:rows]
    return jnp.concatenate([a, jnp.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)], axis=0)
  return jax.tree.map(resize, tree)


def set_uid(state: DefenseState, slot, uid) -> DefenseState:
  """Assigns 64-bit user ids (uint32 [2] each, see keys.uid_from_name) to slots in one device call.

  `slot` an int and `uid` [2], or slots [n] and uids [n, 2] (registering many users at once). The
  state is not donated. Batches are padded to a power of two (padding dropped), so few shapes compile.
  """
  slots = np.asarray(slot, np.int32).reshape(-1)
  uids = np.asarray(uid, np.uint32).reshape(-1, 2)
  if len(slots) != len(uids):
    raise ValueError(f"set_uid: {len(slots)} slots for {len(uids)} ids")
  size = 1 << max(0, len(slots) - 1).bit_length()
  slots = np.concatenate([slots, np.full((size - len(slots),), state.capacity, np.int32)])
  uids = np.concatenate([uids, np.zeros((size - len(uids), 2), np.uint32)])
  return _set_uids(state, jax.device_put(slots), jax.device_put(uids))


@jax.jit
def _set_uids(state, slots, uids):
  return state.replace(uids=state.uids.at[slots].set(uids, mode="drop"))


def state_bytes_per_user(state_or_params: Any) -> int:
  if isinstance(state_or_params, DefenseParams):
    shapes = state_shapes(state_or_params.settings, 1)
    return int(sum(np.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in shapes.values()))
  return int(sum(a.nbytes for a in jax.tree.leaves(state_or_params)) // state_or_params.capacity)


def state_to_numpy(state: DefenseState) -> dict:
  return {k: np.asarray(getattr(state, k)) for k in STATE_FIELDS if getattr(state, k) is not None}


def state_from_numpy(arrays: dict) -> DefenseState:
  return DefenseState(**{k: jax.device_put(np.asarray(arrays[k])) for k in STATE_FIELDS
                         if k in arrays})
