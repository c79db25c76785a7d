"""DefendedEncoder: the in-process B4B API (accounts, per-user state, save/restore).

  api = DefendedEncoder(encoder_fn, defense_config("simsiam"), rep_dim=2048)
  out = api.query("alice", images)        # images NHWC float32 -> np.ndarray [N, api.out_dim]
  api.coverage("alice"), api.sigma("alice"), api.num_queries("alice"), api.stats()
  api.save(path); api = DefendedEncoder.restore(path, encoder_fn)

Every experiment (legit users, attackers, sybils) goes through this object. The encoder forward and the
defense run as one jitted device call when encoder_fn is JAX-traceable (checked once with
jax.eval_shape; otherwise the encoder runs eagerly and only the defense is jitted).

Bad input (wrong shapes or dtypes, NaN/Inf representations, unknown users when registration is
required, invalid config, corrupted checkpoints) raises ValueError naming the problem, and the defense
state, the account registry and the counters are exactly as before the call.
"""
import collections
import functools
import hashlib
import os
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from b4b_jax.defense import config as config_lib
from b4b_jax.defense import cost
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import lsh
from b4b_jax.defense import state as state_lib
from b4b_jax.defense import step as step_lib
from b4b_jax.defense import transforms
from b4b_jax.utils import checkpoint

CHECKPOINT_FORMAT = "b4b_jax.defense.DefendedEncoder/1"


class DefendedEncoder:
  """An encoder behind the B4B defense, serving many user accounts.

  Args:
    encoder_fn: images (NHWC float32) -> representations [N, rep_dim]; any callable, ideally
      JAX-traceable (then fused with the defense into one jitted call). If it has `.apply_fn(params,
      images)` and `.params` (b4b_jax.models.load_encoder's Encoder), the weights are passed to the
      fused jit as arguments rather than compiled in as constants. None for an embedding-level API
      that only serves `query_representations`.
    config: `defense_config(...)`; validated (ValueError naming the field).
    rep_dim: dimension D of the encoder's representations.
    capacity: initial number of user slots; doubled automatically when more users register.
    require_registration: if True, querying an unregistered user is a ValueError; otherwise a new user
      name is registered on its first query.
    input_shape: (H, W, C) the images must have; None = fixed by the first successful query.
    fuse_encoder: True/False forces fusing encoder and defense in one jit; None = detect.
    transform_cache_size: users whose matrix transform (dense_affine, binary) is kept on device (LRU).
    pad_batches: round batch sizes up (8, 16, ..., 1024, then multiples of 1024) with ignored padding
      rows, so varying batch sizes compile only a few shapes.
  """

  def __init__(self, encoder_fn: Optional[Callable], config: ml_collections.ConfigDict, rep_dim: int,
               *, capacity: int = 8, require_registration: bool = False,
               input_shape: Optional[Sequence[int]] = None, fuse_encoder: Optional[bool] = None,
               transform_cache_size: int = 8, pad_batches: bool = True):
    self._config = ml_collections.ConfigDict(config.to_dict())
    self._params = state_lib.make_params(self._config, rep_dim)  # validates config and rep_dim
    self._config.lock()
    self._settings = self._params.settings
    self._state = state_lib.init_state(self._params, capacity)
    self._encoder_fn = encoder_fn
    self._require_registration = bool(require_registration)
    self._input_shape = None if input_shape is None else _shape_tuple(input_shape, "input_shape")
    self._fuse = fuse_encoder
    self._pad_batches = bool(pad_batches)
    self._fused_serve = None
    self._names: List[str] = []
    self._slots: Dict[str, int] = {}
    self._uid_owner: Dict[Tuple[int, int], str] = {}
    self._tables = _TransformTables(self._params, capacity, transform_cache_size)
    self.last_info: Optional[dict] = None

  # ----------------------------------------------------------------------------- accounts
  @property
  def config(self) -> ml_collections.ConfigDict:
    return self._config

  @property
  def rep_dim(self) -> int:
    return self._settings.rep_dim

  @property
  def out_dim(self) -> int:
    return self._settings.out_dim

  @property
  def capacity(self) -> int:
    return self._state.capacity

  @property
  def users(self) -> List[str]:
    return list(self._names)

  @property
  def params(self) -> state_lib.DefenseParams:
    return self._params

  @property
  def state(self) -> state_lib.DefenseState:
    """The current defense state (do not pass it to defense_step: the step donates it)."""
    return self._state

  def register(self, user: str) -> int:
    """Registers account `user` (idempotent) and returns its slot."""
    if user in self._slots:
      return self._slots[user]
    uid = keys_lib.uid_from_name(user)  # ValueError for non-string / empty names
    owner = self._uid_owner.get(tuple(int(v) for v in uid))
    if owner is not None:  # 64-bit sha256 prefixes: practically never; refuse rather than share keys
      raise ValueError(f"user {user!r} has the same 64-bit id as {owner!r}; choose another name")
    slot = len(self._names)
    if slot >= self.capacity:
      new_capacity = max(2 * self.capacity, slot + 1)
      self._state = state_lib.grow_state(self._state, new_capacity)
      self._tables.grow(new_capacity)
    self._state = _set_uid(self._state, slot, _device(uid, np.uint32))
    self._tables.add_user(slot, uid)
    self._names.append(user)
    self._slots[user] = slot
    self._uid_owner[tuple(int(v) for v in uid)] = user
    return slot

  def slot(self, user: str) -> int:
    if user not in self._slots:
      raise ValueError(f"unknown user {user!r} (registered: {len(self._names)} users)")
    return self._slots[user]

  # ----------------------------------------------------------------------------- queries
  def query(self, user: str, images) -> np.ndarray:
    """What the API returns to `user` for `images` (NHWC float): np.ndarray [N, out_dim]."""
    images = self._check_images(images)
    return self._serve([user] * images.shape[0], images, from_images=True)

  def query_mixed(self, users_per_row: Sequence[str], images) -> np.ndarray:
    """One call serving rows of many users; row n is a query of users_per_row[n]."""
    images = self._check_images(images)
    users = self._check_users(users_per_row, images.shape[0])
    return self._serve(users, images, from_images=True)

  def query_representations(self, user, reps) -> np.ndarray:
    """Defends clean representations [N, rep_dim] that were already computed (embedding experiments).

    `user` is one name, or a sequence of names (one per row) for a mixed batch.
    """
    reps = self._check_reps(reps)
    if isinstance(user, str):
      users = [user] * reps.shape[0]
    else:
      users = self._check_users(user, reps.shape[0])
    return self._serve(users, reps, from_images=False)

  # ----------------------------------------------------------------------------- read-outs
  def coverage(self, user: str) -> float:
    """The user's coverage in percent (mean over projections of occupied buckets / 2^K)."""
    counts = np.asarray(self._state.counts)[self.slot(user)].astype(np.float64)
    return float(100.0 * counts.mean() / (1 << self._settings.num_hyperplanes))

  def sigma(self, user: str) -> float:
    """Noise std at the user's current coverage (what a next batch adding no new bucket would get)."""
    return self._sigma_at(self.coverage(user))

  def num_queries(self, user: str) -> int:
    """Representations returned to the user so far."""
    return int(np.asarray(self._state.num_queries)[self.slot(user)])

  def num_query_batches(self, user: str) -> int:
    return int(np.asarray(self._state.num_batches)[self.slot(user)])

  def stats(self) -> dict:
    """Per-user coverage/sigma/query counts plus totals and the defense settings (JSON friendly)."""
    n = len(self._names)
    # Whole arrays to host, then index: indexing device arrays eagerly compiles a kernel per shape.
    counts = np.asarray(self._state.counts)[:n].astype(np.float64)
    queries = np.asarray(self._state.num_queries)[:n]
    batches = np.asarray(self._state.num_batches)[:n]
    coverages = 100.0 * counts.mean(axis=1) / (1 << self._settings.num_hyperplanes) if n else []
    users = {}
    for i, name in enumerate(self._names):
      users[name] = {"slot": i, "coverage": float(coverages[i]), "sigma": self._sigma_at(coverages[i]),
                     "num_queries": int(queries[i]), "num_query_batches": int(batches[i])}
    return {"num_users": n, "capacity": self.capacity, "rep_dim": self.rep_dim,
            "out_dim": self.out_dim, "total_queries": int(queries.sum()) if n else 0,
            "state_bytes_per_user": state_lib.state_bytes_per_user(self._params),
            "config": self._config.to_dict(), "users": users}

  # ----------------------------------------------------------------------------- persistence
  def save(self, path: str) -> int:
    """Saves state, registry and config under directory `path` (orbax; a new step each call).

    Returns the step written. Older steps are kept (max 2), so a crash mid-save loses nothing.
    """
    arrays = state_lib.state_to_numpy(self._state)
    meta = {"format": CHECKPOINT_FORMAT, "config": self._config.to_dict(), "rep_dim": self.rep_dim,
            "capacity": self.capacity, "users": list(self._names),
            "require_registration": self._require_registration,
            "input_shape": None if self._input_shape is None else list(self._input_shape),
            "hyperplanes_sha256": _sha256(self._params.hyperplanes),
            "arrays_sha256": {k: _sha256(v) for k, v in arrays.items()}}
    ckpt = checkpoint.Checkpointer(path, max_to_keep=2)
    try:
      latest = ckpt.latest_step()
      step = 0 if latest is None else latest + 1
      ckpt.save(step, arrays, meta)
    finally:
      ckpt.close()
    return step

  @classmethod
  def restore(cls, path: str, encoder_fn: Optional[Callable], **kwargs) -> "DefendedEncoder":
    """Rebuilds the API saved at `path`; every user continues exactly where it was.

    kwargs: `fuse_encoder`, `transform_cache_size`, `input_shape` (defaults from the checkpoint).
    Raises FileNotFoundError if there is no checkpoint, ValueError if it is corrupted or inconsistent.
    """
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no defense checkpoint directory at {path!r}")
    try:
      arrays, meta = checkpoint.load_pytree(path)
    except FileNotFoundError:
      raise
    except Exception as e:  # orbax raises many kinds of errors for damaged files
      raise ValueError(f"defense checkpoint at {path!r} is corrupted or unreadable: {e}") from e
    return cls._from_checkpoint(path, arrays, meta, encoder_fn, **kwargs)

  @classmethod
  def _from_checkpoint(cls, path, arrays, meta, encoder_fn, **kwargs):
    where = f"defense checkpoint at {path!r}"
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
      raise ValueError(f"{where}: not a {CHECKPOINT_FORMAT} checkpoint (format "
                       f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
      config = ml_collections.ConfigDict(meta["config"])
      capacity, rep_dim, users = int(meta["capacity"]), int(meta["rep_dim"]), list(meta["users"])
      settings = config_lib.settings(config, rep_dim)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: invalid metadata ({e})") from e
    if capacity < max(1, len(users)):
      raise ValueError(f"{where}: capacity {capacity} < {len(users)} registered users")
    if len(set(users)) != len(users):
      raise ValueError(f"{where}: duplicate user names in the registry")
    expected = state_lib.state_shapes(settings, capacity)
    host = {}
    for name, (shape, dtype) in expected.items():
      if not isinstance(arrays, dict) or name not in arrays:
        raise ValueError(f"{where}: state array {name!r} is missing")
      a = np.asarray(arrays[name])
      if a.shape != shape or a.dtype != dtype:
        raise ValueError(f"{where}: state array {name!r} has shape {a.shape} {a.dtype}, the config "
                         f"expects {shape} {np.dtype(dtype)}")
      if _sha256(a) != meta.get("arrays_sha256", {}).get(name):
        raise ValueError(f"{where}: state array {name!r} does not match its recorded checksum")
      host[name] = a
    if not np.array_equal(lsh.popcount(host["occupancy"]), host["counts"]):
      raise ValueError(f"{where}: bucket counts disagree with the occupancy bits")
    if (host["num_queries"] < 0).any() or (host["num_batches"] < 0).any() or (
        host["num_batches"] > host["num_queries"]).any():
      raise ValueError(f"{where}: inconsistent query counters")
    for slot, name in enumerate(users):
      if not np.array_equal(host["uids"][slot], keys_lib.uid_from_name(name)):
        raise ValueError(f"{where}: slot {slot} does not hold the id of user {name!r}")
    unused = slice(len(users), capacity)
    if host["occupancy"][unused].any() or host["num_queries"][unused].any() or host["uids"][
        unused].any():
      raise ValueError(f"{where}: unregistered slots hold state")
    kwargs.setdefault("input_shape", meta.get("input_shape"))
    api = cls(encoder_fn, config, rep_dim, capacity=capacity,
              require_registration=bool(meta.get("require_registration", False)), **kwargs)
    if _sha256(api._params.hyperplanes) != meta.get("hyperplanes_sha256"):
      raise ValueError(f"{where}: the LSH hyperplanes derived from the saved seed differ from the "
                       "saved ones (different JAX PRNG?); coverage could not continue exactly")
    for name in users:
      api.register(name)
    api._state = state_lib.state_from_numpy(host)
    return api

  # ----------------------------------------------------------------------------- internals
  def _sigma_at(self, coverage: float) -> float:
    s = self._settings
    if not s.enabled:
      return 0.0
    if s.static_sigma is not None:
      return float(s.static_sigma)
    return float(cost.noise_std(coverage, s.lam, s.alpha, s.beta))

  def _check_images(self, images) -> jax.Array:
    if self._encoder_fn is None:
      raise ValueError("this DefendedEncoder has no encoder_fn; use query_representations")
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
      raise ValueError(f"images must be an array [N, H, W, C], got {type(images).__name__}")
    if len(shape) != 4:
      raise ValueError(f"images must be NHWC with rank 4, got shape {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"images must be floating point (normalised float32), got dtype {dtype}")
    if self._input_shape is not None and tuple(shape[1:]) != self._input_shape:
      raise ValueError(f"images have shape {tuple(shape[1:])} per image, this API expects "
                       f"{self._input_shape}")
    return images

  def _check_reps(self, reps) -> np.ndarray:
    shape = getattr(reps, "shape", None)
    dtype = getattr(reps, "dtype", None)
    if shape is None or dtype is None:
      raise ValueError(f"representations must be an array [N, {self.rep_dim}], got "
                       f"{type(reps).__name__}")
    if len(shape) != 2 or shape[1] != self.rep_dim:
      raise ValueError(f"representations must have shape [N, {self.rep_dim}], got {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"representations must be floating point, got dtype {dtype}")
    return reps

  def _check_users(self, users_per_row, n: int) -> List[str]:
    if isinstance(users_per_row, str):
      raise ValueError("users_per_row must be a sequence of user names, one per row, not a string")
    users = list(users_per_row)
    if len(users) != n:
      raise ValueError(f"users_per_row has {len(users)} names for {n} rows")
    return users

  def _serve(self, users: List[str], inputs, *, from_images: bool) -> np.ndarray:
    n = int(inputs.shape[0])
    if n == 0:
      self.last_info = {"coverage": np.zeros((0,), np.float32), "sigma": np.zeros((0,), np.float32),
                        "users": []}
      return np.zeros((0, self.out_dim), np.float32)
    # All checks before any state changes: unknown users, then (only now) auto-registration.
    unknown = sorted({u for u in users if u not in self._slots}, key=users.index)
    for u in unknown:
      if self._require_registration:
        raise ValueError(f"unknown user {u!r}: this API requires register() before queries")
      keys_lib.uid_from_name(u)  # validates the name
    previous_capacity, previous_users = self.capacity, len(self._names)
    for u in unknown:
      self.register(u)
    slots = np.asarray([self._slots[u] for u in users], np.int32)
    try:
      table, index = self._tables.lookup(slots)
      if self._pad_batches:  # fewer shapes -> fewer compilations; padding rows (slot -1) are ignored
        size = _padded_size(n)
        slots = np.concatenate([slots, np.full((size - n,), -1, np.int32)])
        index = np.concatenate([index, np.zeros((size - n,), np.int32)])
        inputs = _pad_rows(inputs, size)
      if from_images:
        state, returned, info = self._run_images(slots, table, index, inputs)
      else:
        state, returned, info = step_lib.defense_step(
            self._params, self._state, _device(slots, np.int32), _device(inputs, np.float32), table,
            _device(index, np.int32))
    except Exception:
      self._forget_new_users(previous_users, previous_capacity)
      raise
    self._state = state  # unchanged values if the step rejected the batch (see step.py)
    if not bool(info["all_finite"]):
      self._forget_new_users(previous_users, previous_capacity)
      what = "images" if from_images else "representations"
      bad = _nonfinite_rows(inputs[:n])
      where = f" (rows {bad[:10]})" if bad else " (the encoder produced them)"
      raise ValueError(f"non-finite (NaN/Inf) representations for these {what}{where}; nothing was "
                       "counted and the defense state is unchanged")
    self.last_info = {"coverage": np.asarray(info["coverage"])[:n],
                      "sigma": np.asarray(info["sigma"])[:n], "users": list(users)}
    return np.asarray(returned)[:n]

  def _run_images(self, slots, table, index, images):
    reps = None
    if self._fuse is None:
      if _is_traceable(self._encoder_fn, images):
        self._fuse = True
      else:  # not traceable, or these images are bad: an eager call tells which
        reps = self._eager_encode(images)
        self._fuse = False
        logging.warning("encoder_fn is not JAX-traceable: running it eagerly, outside the defense jit")
    if self._fuse:
      if self._fused_serve is None:
        self._fused_serve = _fused_serve_for(self._encoder_fn)
      try:
        result = self._fused_serve(self._params, self._state, table, _device(index, np.int32),
                                   _device(slots, np.int32), _device(images, np.float32),
                                   _encoder_parts(self._encoder_fn)[1])
      except (ValueError, FloatingPointError):
        raise
      except Exception as e:  # shape errors inside encoder_fn surface at trace time (nothing donated)
        if self._state.occupancy.is_deleted():
          raise
        raise ValueError(f"encoder_fn failed on images of shape {tuple(images.shape)}: {e}") from e
    else:
      if reps is None:
        reps = self._eager_encode(images)
      result = step_lib.defense_step(self._params, self._state, _device(slots, np.int32), reps, table,
                                     _device(index, np.int32))
    if self._input_shape is None:
      self._input_shape = tuple(int(v) for v in images.shape[1:])
    return result

  def _eager_encode(self, images):
    try:
      reps = self._encoder_fn(images)
    except Exception as e:
      raise ValueError(f"encoder_fn failed on images of shape {tuple(images.shape)}: {e}") from e
    return self._check_encoder_output(reps, images.shape[0])

  def _check_encoder_output(self, reps, n):
    shape = getattr(reps, "shape", None)
    if shape is None or tuple(shape) != (n, self.rep_dim):
      raise ValueError(f"encoder_fn returned shape {shape}, expected ({n}, {self.rep_dim})")
    return _device(reps, np.float32)

  def _forget_new_users(self, previous_users: int, previous_capacity: int) -> None:
    """Undoes the auto-registrations of a call that failed (state otherwise untouched)."""
    for name in self._names[previous_users:]:
      slot = self._slots.pop(name)
      del self._uid_owner[tuple(int(v) for v in keys_lib.uid_from_name(name))]
      self._state = _set_uid(self._state, slot, _device(np.zeros((2,)), np.uint32))
    del self._names[previous_users:]
    if self.capacity > previous_capacity:
      self._state = state_lib.resize_rows(self._state, previous_capacity)
      self._tables.shrink(previous_capacity)


class _TransformTables:
  """Per-user transform parameters kept on device, so no query regenerates them.

  O(D) transforms: one entry per slot (index = slot). Matrix transforms (dense_affine, binary; D x D or
  D x 2D per user): an LRU of `cache_size` entries, grown when a single call needs more users.
  """

  def __init__(self, params: state_lib.DefenseParams, capacity: int, cache_size: int):
    s = params.settings
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
      raise ValueError(f"transform_cache_size must be a positive integer, got {cache_size!r}")
    self._settings = s
    self._stream = params.transform_key
    if not s.enabled or s.transform == "identity":
      self.kind = "none"
    elif s.transform in config_lib.MATRIX_TRANSFORMS:
      self.kind = "lru"
    else:
      self.kind = "slots"
    self._uids: Dict[int, np.ndarray] = {}
    self._entry_of_slot: "collections.OrderedDict[int, int]" = collections.OrderedDict()
    size = {"none": 0, "slots": capacity, "lru": cache_size}[self.kind]
    self._table = self._empty(size) if size else {}

  def _empty(self, size: int):
    shapes = jax.eval_shape(lambda u: transforms.user_params(self._settings, self._stream, u),
                            jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda a: jax.device_put(np.zeros((size,) + a.shape, a.dtype)), shapes)

  def _write(self, table, entry: int, uid):
    return _write_table_entry(self._settings, table, jnp.int32(entry), self._stream, uid)

  def _entries(self) -> int:
    return jax.tree.leaves(self._table)[0].shape[0] if self._table else 0

  def _resize(self, size: int):
    self._table = state_lib.resize_rows(self._table, size)

  def grow(self, capacity: int) -> None:
    if self.kind == "slots":
      self._resize(capacity)

  def shrink(self, capacity: int) -> None:
    for slot in [s for s in self._uids if s >= capacity]:
      del self._uids[slot]
      self._entry_of_slot.pop(slot, None)
    if self.kind == "slots":
      self._resize(capacity)

  def add_user(self, slot: int, uid: np.ndarray) -> None:
    self._uids[slot] = np.asarray(uid, np.uint32)
    self._entry_of_slot.pop(slot, None)
    if self.kind == "slots":
      self._table = self._write(self._table, slot, _device(uid, np.uint32))

  def lookup(self, slots: np.ndarray):
    """(table, entry index per row) for the rows' slots."""
    if self.kind == "none":
      return {}, slots
    if self.kind == "slots":
      return self._table, slots
    needed = list(dict.fromkeys(int(s) for s in slots))
    if len(needed) > self._entries():
      self._resize(max(2 * self._entries(), len(needed)))
    used = set(self._entry_of_slot.values())
    free = [e for e in range(self._entries()) if e not in used]
    for slot in needed:
      if slot in self._entry_of_slot:
        self._entry_of_slot.move_to_end(slot)
        continue
      if free:
        entry = free.pop()
      else:  # evict the least recently used user that this call does not need
        victim = next(s for s in self._entry_of_slot if s not in needed)
        entry = self._entry_of_slot.pop(victim)
      self._table = self._write(self._table, entry, _device(self._uids[slot], np.uint32))
      self._entry_of_slot[slot] = entry
    index = np.asarray([self._entry_of_slot[int(s)] for s in slots], np.int32)
    return self._table, index


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _write_table_entry(settings, table, entry, stream, uid):
  new = transforms.user_params(settings, stream, uid)
  return jax.tree.map(lambda t, v: t.at[entry].set(v), table, new)


_FUSED_CACHE = weakref.WeakKeyDictionary()  # encoder_fn -> jitted serve (shared by API instances)


def _fused_serve_for(encoder_fn):
  try:
    if encoder_fn not in _FUSED_CACHE:
      _FUSED_CACHE[encoder_fn] = _make_fused_serve(encoder_fn)
    return _FUSED_CACHE[encoder_fn]
  except TypeError:  # not weak-referenceable
    return _make_fused_serve(encoder_fn)


def _encoder_parts(encoder_fn):
  """(apply(encoder_params, images), encoder_params). Encoders exposing `.apply_fn(params, x)` and
  `.params` (b4b_jax.models' Encoder) get their weights passed as jit arguments instead of being
  baked into the compiled program as constants."""
  apply_fn, params = getattr(encoder_fn, "apply_fn", None), getattr(encoder_fn, "params", None)
  if callable(apply_fn) and params is not None:
    return apply_fn, params
  return (lambda _, images: encoder_fn(images)), None


def _make_fused_serve(encoder_fn):
  apply_fn, _ = _encoder_parts(encoder_fn)

  def serve(params, state, table, index, users, images, encoder_params):
    reps = apply_fn(encoder_params, images)
    n, d = images.shape[0], params.settings.rep_dim
    if tuple(reps.shape) != (n, d):
      raise ValueError(f"encoder_fn returned shape {tuple(reps.shape)}, expected ({n}, {d})")
    return step_lib.defense_step_impl(params, state, users, reps.astype(jnp.float32), table, index)

  return jax.jit(serve, donate_argnums=(1,))


@functools.partial(jax.jit, donate_argnums=0)
def _set_uid(state, slot, uid):
  return state.replace(uids=state.uids.at[slot].set(uid))


def _is_traceable(encoder_fn, images) -> bool:
  apply_fn, encoder_params = _encoder_parts(encoder_fn)
  try:
    jax.eval_shape(apply_fn, encoder_params,
                   jax.ShapeDtypeStruct(tuple(images.shape), jnp.float32))
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _device(x, dtype) -> jax.Array:
  """x as a device array of `dtype`. (jnp.asarray of a numpy array compiles a tiny kernel per shape
  in this JAX version; device_put does not.)"""
  if isinstance(x, jax.Array):
    return x if x.dtype == dtype else x.astype(dtype)
  return jax.device_put(np.asarray(x, dtype))


def _padded_size(n: int) -> int:
  """Batch sizes are rounded up to 8, 16, ..., 1024, then to multiples of 1024."""
  if n <= 1024:
    return max(8, 1 << (n - 1).bit_length())
  return -(-n // 1024) * 1024


def _pad_rows(inputs, size: int):
  n = inputs.shape[0]
  if n == size:
    return inputs
  if isinstance(inputs, jax.Array):
    return jnp.concatenate([inputs, jnp.zeros((size - n,) + inputs.shape[1:], inputs.dtype)])
  inputs = np.asarray(inputs)
  return np.concatenate([inputs, np.zeros((size - n,) + inputs.shape[1:], inputs.dtype)])


def _nonfinite_rows(inputs) -> List[int]:
  try:
    a = np.asarray(inputs)
  except Exception:  # pylint: disable=broad-except
    return []
  bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
  return [int(i) for i in np.flatnonzero(bad)]


def _sha256(a) -> str:
  a = np.ascontiguousarray(np.asarray(a))
  return hashlib.sha256(str((a.shape, a.dtype.str)).encode() + a.tobytes()).hexdigest()


def _shape_tuple(shape, name) -> Tuple[int, ...]:
  try:
    out = tuple(int(v) for v in shape)
  except TypeError as e:
    raise ValueError(f"{name} must be a sequence of ints, got {shape!r}") from e
  if len(out) != 3 or min(out) < 1:
    raise ValueError(f"{name} must be (H, W, C) with positive sizes, got {shape!r}")
  return out
