"""DefendedEncoder: the in-process B4B API (accounts, per-user state, save/restore, journal replay).

  api = DefendedEncoder.from_encoder_dir("encoders/victim", defense_config("simsiam"), capacity=1024)
  result = api.query("alice", images)     # uint8 NHWC at the manifest's input size -> QueryResult
  result.reps, result.coverage, result.sigma, result.buckets    # [N, out_dim], [N], [N], [N, P]
  api.coverage("alice"), api.sigma("alice"), api.num_queries("alice"), api.stats()
  api.save(path); api = DefendedEncoder.restore(path, "encoders/victim")
  api.replay(result.users, result.buckets)  # after restore: repeats a journaled call's charges exactly

Every experiment (legit users, attackers, sybils) goes through this object. The encoder forward and the
defense run as one jitted device call when encoder_fn is JAX-traceable (checked once with
jax.eval_shape; otherwise the encoder runs eagerly and only the defense is jitted). An encoder with
`.apply_fn(params, images)` and `.params` (models.load_encoder's Encoder) has its weights passed to that
jit as arguments, never compiled in as constants.

Contract (the served API builds on it):
  * every query call returns its own QueryResult (nothing is left on the object to read afterwards);
  * refused calls raise the typed errors of `errors.py` (all ValueError; a missing checkpoint is
    NoCheckpointError, a FileNotFoundError) and leave the defense state, the account registry, the
    counters and the expected input shape exactly as before the call;
  * user names are compared in Unicode NFC form; registering several users is all-or-nothing;
  * `capacity` user slots are allocated up front; registering more doubles them, which recompiles the
    jitted step once for the new shape (pre-size it for a service under traffic);
  * matrix transforms (dense_affine, binary) keep at most `config.transform_cache_mib` of per-user
    matrices on device (an LRU); one call may hold at most `max_users_per_call` distinct users;
  * the hardened image-keyed noise keeps at most `config.noise_cache_mib` of its per-(account, sigma
    level) Gaussian matrices on device (noise_cache.py, an LRU; image queries only). Neither cache
    changes an answer, and neither is saved.
"""
import collections
import collections.abc
import dataclasses
import functools
import hashlib
import json
import os
import re
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from b4b_jax.defense import config as config_lib
from b4b_jax.defense import cost
from b4b_jax.defense import errors
from b4b_jax.defense import hardened
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import lsh
from b4b_jax.defense import noise_cache
from b4b_jax.defense import state as state_lib
from b4b_jax.defense import step as step_lib
from b4b_jax.defense import transforms
from b4b_jax.models import normalization
from b4b_jax.utils import checkpoint

# /2: the metadata (config, seed, registry, settings, array checksums) is covered by one digest.
CHECKPOINT_FORMAT = "b4b_jax.defense.DefendedEncoder/2"
_PENDING_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")  # a save that never committed


@dataclasses.dataclass(frozen=True)
class QueryResult:
  """What one query call returned and charged.

  reps: float32 [N, out_dim], what the users receive. coverage: float32 [N], the row's user's coverage
  (percent) after this call. sigma: float32 [N], the noise std the row got (provider-only: it helps a
  thief). buckets: int32 [N, P + E], the charge codes: the LSH bucket the row charged in each projection,
  then (hardened noise_keying="per_input" only, E = hardened.seen_columns) the code the row marked seen;
  a journal keeps all columns to `replay` the call. users: the row's account name (NFC).
  """
  reps: np.ndarray
  coverage: np.ndarray
  sigma: np.ndarray
  buckets: np.ndarray
  users: Tuple[str, ...]


class DefendedEncoder:
  """An encoder behind the B4B defense, serving many user accounts.

  Args:
    encoder_fn: images -> representations [N, rep_dim]; any callable, ideally JAX-traceable (then
      fused with the defense into one jitted call). If it has `.apply_fn(params, images)` and
      `.params`, the weights are passed to the fused jit as arguments rather than compiled in as
      constants. None for an embedding-level API that only serves `query_representations`.
      `from_encoder_dir` builds one that takes uint8 images and normalises them inside the jit.
    config: `defense_config(...)`; validated (ValueError naming the field).
    rep_dim: dimension D of the encoder's representations.
    capacity: user slots allocated up front. Registering user capacity+1 doubles them, and the next
      call recompiles for the new shape: size it for the expected accounts when serving traffic.
    require_registration: if True, querying an unregistered user is an UnknownUserError; otherwise a
      new user name is registered on its first query.
    input_shape: (H, W, C) the images must have; None = fixed by the first successful query.
    fuse_encoder: True/False forces fusing encoder and defense in one jit; None = detect.
    pad_batches: round batch sizes up (8, 16, ..., 1024, then multiples of 1024) with ignored padding
      rows, so varying batch sizes compile only a few shapes.
    min_batch_rows: with pad_batches, pad every call to at least this many rows: a client sending
      batches of this size and a shorter last one compiles one shape, not two or three (each costs
      ~1 s of compilation on a 2-core CPU; answers do not depend on the padding).
    uint8_images: images are uint8 [0, 255] and encoder_fn normalises them itself (from_encoder_dir);
      False: images are floating point, already normalised.
    shard_rows: split each fused image call's (padded) rows over all local devices (a 1-D mesh), so
      one call runs data-parallel; a batch whose padded size the device count does not divide runs as
      is. The state stays wherever the compiled call puts it; results equal the one-device call.
  """

  def __init__(self, encoder_fn: Optional[Callable], config: ml_collections.ConfigDict, rep_dim: int,
               *, capacity: int = 8, require_registration: bool = False,
               input_shape: Optional[Sequence[int]] = None, fuse_encoder: Optional[bool] = None,
               pad_batches: bool = True, min_batch_rows: int = 0, uint8_images: bool = False,
               shard_rows: bool = False):
    if isinstance(min_batch_rows, bool) or not isinstance(min_batch_rows, (int, np.integer)) or \
        min_batch_rows < 0:
      raise ValueError(f"min_batch_rows must be an int >= 0, got {min_batch_rows!r}")
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
    self._min_batch_rows = int(min_batch_rows)
    self._uint8 = bool(uint8_images)
    devices = jax.local_devices()
    self._row_sharding = (jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("rows",)),
                                                     jax.sharding.PartitionSpec("rows"))
                          if shard_rows and len(devices) > 1 else None)
    self._fused_serve = None
    self._names: List[str] = []
    self._slots: Dict[str, int] = {}
    self._uid_owner: Dict[Tuple[int, int], str] = {}
    self._tables = _TransformTables(self._params, self.capacity, self._config.transform_cache_mib)
    self._noise_weights = noise_cache.NoiseWeightCache(
        self._params, config_lib.noise_cache_mib(self._config), self.capacity)

  @classmethod
  def from_encoder_dir(cls, encoder_dir: str, config: ml_collections.ConfigDict, *, capacity: int = 8,
                       **kwargs) -> "DefendedEncoder":
    """The API in front of an encoder directory (models.save_encoder / weight_conversion.convert).

    Queries take uint8 NHWC images at the manifest's input size (resized and cropped as its
    preprocessing says); they are normalised with the manifest's mean/std inside the jitted call, and
    the weights are jit arguments. kwargs: as the constructor (require_registration, ...).
    """
    from b4b_jax import models  # pylint: disable=g-import-not-at-top  (flax; only this path needs it)
    return cls.from_encoder(models.load_encoder(encoder_dir), config, capacity=capacity, **kwargs)

  @classmethod
  def from_encoder(cls, encoder, config: ml_collections.ConfigDict, *, capacity: int = 8,
                   **kwargs) -> "DefendedEncoder":
    """As from_encoder_dir, for an already loaded models.Encoder."""
    size = int(encoder.manifest["preprocessing"]["input_size"])
    kwargs.setdefault("input_shape", (size, size, 3))
    return cls(_normalising_encoder(encoder), config, encoder.rep_dim, capacity=capacity,
               uint8_images=True, **kwargs)

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
  def input_shape(self) -> Optional[Tuple[int, ...]]:
    return self._input_shape

  @property
  def max_users_per_call(self) -> Optional[int]:
    """Most distinct users one call may hold (matrix transforms' cache bound); None = no limit."""
    return self._tables.bound

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
    """Registers account `user` (idempotent; name compared in NFC form) and returns its slot."""
    name = keys_lib.normalize_name(user)
    self._register_all([name])
    return self._slots[name]

  def slot(self, user: str) -> int:
    name = keys_lib.normalize_name(user)
    if name not in self._slots:
      raise errors.UnknownUserError(f"unknown user {name!r} (registered: {len(self._names)} users)")
    return self._slots[name]

  # ----------------------------------------------------------------------------- queries
  def query(self, user: str, images) -> QueryResult:
    """What the API returns to `user` for `images` (NHWC; uint8 for from_encoder_dir, else float)."""
    images = self._check_images(images)
    return self._serve([keys_lib.normalize_name(user)] * images.shape[0], images, from_images=True)

  def query_mixed(self, users_per_row: Sequence[str], images) -> QueryResult:
    """One call serving rows of many users; row n is a query of users_per_row[n]."""
    images = self._check_images(images)
    users = self._check_users(users_per_row, images.shape[0])
    return self._serve(users, images, from_images=True)

  def query_representations(self, user, reps) -> QueryResult:
    """Defends clean representations [N, rep_dim] that were already computed (embedding experiments).

    `user` is one name, or a sequence of names (one per row) for a mixed batch.
    """
    reps = self._check_reps(reps)
    if isinstance(user, str):
      users = [keys_lib.normalize_name(user)] * reps.shape[0]
    else:
      users = self._check_users(user, reps.shape[0])
    return self._serve(users, reps, from_images=False)

  def replay(self, users_per_row: Sequence[str], buckets, *, pad_to: int = 0) -> None:
    """Charges a call again from its journal entry, without computing representations.

    users_per_row and buckets [N, P + E] int32 are one earlier call's `result.users` and `result.buckets`
    (one replay per original call: a user's rows in one call are one query batch). Registers unknown
    users as that call did and advances the same state (occupancy, counts, query and batch counters,
    which key the noise), so snapshot + replay of every later call ends bit-identical to the state
    before a crash. Bad entries raise BadInputError with nothing changed. pad_to: pad the call to at
    least this many rows (padding rows are ignored), so a replay of many calls of different sizes
    compiles one shape instead of one per size.
    """
    p, extra = self._settings.num_projections, hardened.seen_columns(self._settings)
    width = p + extra
    buckets_shape = getattr(buckets, "shape", None)
    if buckets_shape is None or len(buckets_shape) != 2 or buckets_shape[1] != width:
      raise errors.BadInputError(f"replay: buckets must have shape [N, {width}] ({p} LSH buckets"
                                 + (f" + {extra} seen codes of the hardened mode" if extra else "")
                                 + f"), got {buckets_shape}")
    if not np.issubdtype(np.asarray(buckets).dtype, np.integer):
      raise errors.BadInputError(f"replay: buckets must be integers, got dtype {buckets.dtype}")
    buckets = np.asarray(buckets)
    for name, columns, bits in (("bucket ids", buckets[:, :p], self._settings.num_hyperplanes),
                                ("seen codes", buckets[:, p:], self._settings.fine_code_bits)):
      if columns.size and (columns.min() < 0 or columns.max() >= 1 << bits):
        raise errors.BadInputError(f"replay: {name} must be in [0, {1 << bits}), got "
                                   f"[{columns.min()}, {columns.max()}]")
    users = self._check_users(users_per_row, buckets.shape[0])
    n = len(users)
    if n == 0:
      return
    new_users = self._admit(users)
    slots = np.asarray([self._slots[u] for u in users], np.int32)
    buckets = buckets.astype(np.int32)
    if self._pad_batches or pad_to > n:
      size = max(_padded_size(n) if self._pad_batches else n, int(pad_to))
      slots = np.concatenate([slots, np.full((size - n,), -1, np.int32)])
      buckets = _pad_rows(buckets, size)
    try:
      self._state = step_lib.replay_step(self._settings, self._state,
                                         _jit_arg(slots, np.int32), _jit_arg(buckets, np.int32))
    except Exception:
      self._forget(new_users)
      raise

  # ----------------------------------------------------------------------------- read-outs
  def coverage(self, user: str) -> float:
    """The user's coverage in percent (mean over projections of occupied buckets / 2^K)."""
    counts = np.asarray(self._state.counts)[self.slot(user)].astype(np.float64)
    return float(100.0 * counts.mean() / (1 << self._settings.num_hyperplanes))

  def sigma(self, user: str) -> float:
    """Noise std at the user's current coverage (what a next batch adding no new bucket would get)."""
    slot = self.slot(user)
    coverage = self.coverage(user)
    if self._settings.repeat_charge:  # hardened: repeats charged as coverage (hardened.py)
      coverage = float(hardened.charged_coverage(
          self._settings, coverage, float(np.asarray(self._state.num_queries)[slot]),
          float(np.asarray(self._state.fine_counts)[slot, 0])))
    return self._sigma_at(coverage)

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

    Returns the step written. Older steps are kept (max 2), so a crash mid-save loses nothing. One
    sha256 in the metadata covers everything else in it (config, seed, registry, settings, the arrays'
    checksums): any edit or damage is a CorruptCheckpointError on restore.
    """
    arrays = state_lib.state_to_numpy(self._state)
    meta = {"format": CHECKPOINT_FORMAT, "config": self._config.to_dict(), "rep_dim": self.rep_dim,
            "capacity": self.capacity, "users": list(self._names),
            "require_registration": self._require_registration,
            "input_shape": None if self._input_shape is None else list(self._input_shape),
            "uint8_images": self._uint8,
            "hyperplanes_sha256": _sha256(self._params.hyperplanes),
            "arrays_sha256": {k: _sha256(v) for k, v in arrays.items()}}
    meta["integrity_sha256"] = _meta_digest(meta)
    ckpt = checkpoint.Checkpointer(path, max_to_keep=2)
    try:
      steps = ckpt.all_steps()
      step = 0 if not steps else max(steps) + 1
      ckpt.save(step, arrays, meta)
    finally:
      ckpt.close()
    return step

  @classmethod
  def restore(cls, path: str, encoder_fn: Optional[Callable], *, step: Optional[int] = None,
              **kwargs) -> "DefendedEncoder":
    """Rebuilds the API saved at `path`; every user continues exactly where it was.

    step: None = the latest committed step. A damaged latest step is a CorruptCheckpointError that
      names the older intact step; restoring that one (and losing what was charged after it) takes an
      explicit `step=` and is logged. Only a save that never committed (killed mid-save) falls back to
      the previous step on its own, with a warning: that is the designed crash behaviour.
    encoder_fn: as the constructor; for an API built by from_encoder_dir, the encoder directory (or its
      loaded models.Encoder) again.
    kwargs: `fuse_encoder`, `input_shape` (defaults from the checkpoint), `pad_batches`.
    Raises NoCheckpointError (a FileNotFoundError) if nothing was ever committed at `path`, and
    CorruptCheckpointError if it is damaged, edited or inconsistent.
    """
    if not os.path.lexists(path):
      raise errors.NoCheckpointError(f"no defense checkpoint at {path!r}")
    if not os.path.isdir(path):
      raise errors.CorruptCheckpointError(f"{path!r} is not a defense checkpoint directory")
    entries = os.listdir(path)
    committed = sorted(int(e) for e in entries if e.isdigit() and os.path.isdir(os.path.join(path, e)))
    pending = sorted(int(m.group(1)) for m in map(_PENDING_STEP.match, entries) if m)
    if not committed:
      raise errors.NoCheckpointError(
          f"no committed defense checkpoint at {path!r}" +
          (f" (a save of step {pending[-1]} never completed)" if pending else ""))
    latest = committed[-1]
    if step is None:
      step = latest
      if pending and pending[-1] > latest:
        logging.warning("defense checkpoint %s: step %d was never completed (a save was interrupted); "
                        "restoring step %d, the last committed one", path, pending[-1], latest)
    elif step not in committed:
      raise errors.NoCheckpointError(f"defense checkpoint {path!r} has no step {step} (steps "
                                     f"{committed})")
    elif step != latest:
      logging.warning("defense checkpoint %s: restoring step %d as asked although step %d exists; "
                      "what was charged after step %d is not in this state", path, step, latest, step)
    older = [s for s in committed if s < step]
    hint = (f"; the older step {older[-1]} may be intact: restore(path, encoder_fn, step={older[-1]}) "
            f"restores it, losing what was charged after it" if older else "")
    try:
      arrays, meta = checkpoint.load_pytree(path, step=step)
      return cls._from_checkpoint(f"defense checkpoint at {path!r} step {step}", arrays, meta,
                                  encoder_fn, **kwargs)
    except errors.CorruptCheckpointError as e:
      raise errors.CorruptCheckpointError(f"{e}{hint}") from e
    except Exception as e:  # orbax raises many kinds (FileNotFoundError included) for damaged files
      raise errors.CorruptCheckpointError(f"defense checkpoint at {path!r} step {step} is damaged or "
                                          f"unreadable ({type(e).__name__}: {e}){hint}") from e

  @classmethod
  def _from_checkpoint(cls, where, arrays, meta, encoder_fn, **kwargs):
    corrupt = errors.CorruptCheckpointError
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
      raise corrupt(f"{where}: not a {CHECKPOINT_FORMAT} checkpoint (format "
                    f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("integrity_sha256") != _meta_digest(meta):
      raise corrupt(f"{where}: the metadata (config, seed, registry, settings) fails its integrity "
                    "check: it was edited or damaged")
    try:
      config = ml_collections.ConfigDict(meta["config"])
      capacity, rep_dim, users = int(meta["capacity"]), int(meta["rep_dim"]), list(meta["users"])
      settings = config_lib.settings(config, rep_dim)
    except (KeyError, TypeError, ValueError) as e:
      raise corrupt(f"{where}: invalid metadata ({e})") from e
    if capacity < max(1, len(users)):
      raise corrupt(f"{where}: capacity {capacity} < {len(users)} registered users")
    if len(set(users)) != len(users):
      raise corrupt(f"{where}: duplicate user names in the registry")
    expected = state_lib.state_shapes(settings, capacity)
    host = {}
    for name, (shape, dtype) in expected.items():
      if not isinstance(arrays, dict) or name not in arrays:
        raise corrupt(f"{where}: state array {name!r} is missing")
      a = np.asarray(arrays[name])
      if a.shape != shape or a.dtype != dtype:
        raise corrupt(f"{where}: state array {name!r} has shape {a.shape} {a.dtype}, the config "
                      f"expects {shape} {np.dtype(dtype)}")
      if _sha256(a) != meta.get("arrays_sha256", {}).get(name):
        raise corrupt(f"{where}: state array {name!r} does not match its recorded checksum")
      host[name] = a
    if not np.array_equal(lsh.popcount(host["occupancy"]), host["counts"]):
      raise corrupt(f"{where}: bucket counts disagree with the occupancy bits")
    if (host["num_queries"] < 0).any() or (host["num_batches"] < 0).any() or (
        host["num_batches"] > host["num_queries"]).any():
      raise corrupt(f"{where}: inconsistent query counters")
    try:
      uids = np.stack([keys_lib.uid_from_name(name) for name in users]) if users else np.zeros(
          (0, 2), np.uint32)
    except errors.BadInputError as e:
      raise corrupt(f"{where}: invalid user name in the registry ({e})") from e
    for slot, name in enumerate(users):
      if not np.array_equal(host["uids"][slot], uids[slot]) or keys_lib.normalize_name(name) != name:
        raise corrupt(f"{where}: slot {slot} does not hold the id of user {name!r}")
    unused = slice(len(users), capacity)
    if host["occupancy"][unused].any() or host["num_queries"][unused].any() or host["uids"][
        unused].any():
      raise corrupt(f"{where}: unregistered slots hold state")
    kwargs.setdefault("input_shape", meta.get("input_shape"))
    kwargs.setdefault("uint8_images", bool(meta.get("uint8_images", False)))
    if kwargs["uint8_images"] and isinstance(encoder_fn, str):  # an encoder directory
      from b4b_jax import models  # pylint: disable=g-import-not-at-top
      encoder_fn = models.load_encoder(encoder_fn)
    if kwargs["uint8_images"] and hasattr(encoder_fn, "manifest"):  # a models.Encoder
      encoder_fn = _normalising_encoder(encoder_fn)
    api = cls(encoder_fn, config, rep_dim, capacity=capacity,
              require_registration=bool(meta.get("require_registration", False)), **kwargs)
    if _sha256(api._params.hyperplanes) != meta.get("hyperplanes_sha256"):
      raise corrupt(f"{where}: the LSH hyperplanes derived from the saved seed differ from the "
                    "saved ones (different JAX PRNG?); coverage could not continue exactly")
    # The registry in one go: the saved state already holds the ids, the O(D) transform table is
    # written in one device call.
    api._state = state_lib.state_from_numpy(host)
    api._add_to_registry(users, uids, list(range(len(users))))
    return api

  # ----------------------------------------------------------------------------- internals
  def _sigma_at(self, coverage: float) -> float:
    s = self._settings
    if not s.enabled:
      return 0.0
    if s.static_sigma is not None:
      return float(s.static_sigma)
    return float(cost.noise_std(coverage, s.lam, s.alpha, s.beta))

  def _add_to_registry(self, names: List[str], uids: np.ndarray, slots: List[int]) -> None:
    for name, uid, slot in zip(names, uids, slots):
      self._names.append(name)
      self._slots[name] = slot
      self._uid_owner[tuple(int(v) for v in uid)] = name
    self._tables.add_users(slots, uids)

  def _register_all(self, names: Sequence[str]) -> List[str]:
    """Registers the new names among `names` (already NFC) all-or-nothing; returns those added."""
    new = [n for n in dict.fromkeys(names) if n not in self._slots]
    if not new:
      return []
    uids = np.stack([keys_lib.uid_from_name(n) for n in new])
    owners = dict(self._uid_owner)
    for name, uid in zip(new, uids):  # 64-bit sha256 prefixes: practically never; refuse to share keys
      owner = owners.setdefault(tuple(int(v) for v in uid), name)
      if owner != name:
        raise errors.BadInputError(f"user {name!r} has the same 64-bit id as {owner!r}; choose "
                                   "another name")
    before = (self._state, self._tables.snapshot())
    first = len(self._names)
    slots = list(range(first, first + len(new)))
    try:
      if first + len(new) > self.capacity:
        new_capacity = self.capacity
        while new_capacity < first + len(new):  # doubling: few distinct shapes ever compile
          new_capacity *= 2
        self._state = state_lib.grow_state(self._state, new_capacity)
        self._tables.grow(new_capacity)
        self._noise_weights.fit(new_capacity)
      self._state = state_lib.set_uid(self._state, slots, uids)
      self._add_to_registry(new, uids, slots)
    except BaseException:
      self._state = before[0]
      self._tables.restore(before[1])
      self._drop_names(first)
      raise
    return new

  def _drop_names(self, first: int) -> None:
    for name in self._names[first:]:
      slot = self._slots.pop(name, None)
      self._uid_owner.pop(tuple(int(v) for v in keys_lib.uid_from_name(name)), None)
      if slot is not None:
        self._tables.remove_user(slot)
    del self._names[first:]

  def _admit(self, users: List[str]) -> Tuple[int, int, List[str]]:
    """Refuses unknown users where registration is required, else registers them (undo: _forget)."""
    unknown = [u for u in dict.fromkeys(users) if u not in self._slots]
    if unknown and self._require_registration:
      raise errors.UnknownUserError(f"unknown user {unknown[0]!r}: this API requires register() "
                                    "before queries")
    undo = (len(self._names), self.capacity)
    return undo + (self._register_all(unknown),)

  def _forget(self, admitted) -> None:
    """Undoes the registrations of a call that failed (state otherwise untouched)."""
    previous_users, previous_capacity, new = admitted
    if not new:
      return
    slots = [self._slots[n] for n in new]
    self._drop_names(previous_users)
    self._state = state_lib.set_uid(self._state, slots, np.zeros((len(slots), 2), np.uint32))
    if self.capacity > previous_capacity:
      self._state = state_lib.resize_rows(self._state, previous_capacity)
      self._tables.shrink(previous_capacity)

  def _check_images(self, images) -> jax.Array:
    if self._encoder_fn is None:
      raise errors.BadInputError("this DefendedEncoder has no encoder_fn; use query_representations")
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
      raise errors.BadInputError(f"images must be an array [N, H, W, C], got {type(images).__name__}")
    if len(shape) != 4:
      raise errors.BadInputError(f"images must be NHWC with rank 4, got shape {tuple(shape)}")
    if self._uint8 and dtype != np.uint8:
      raise errors.BadInputError(f"images must be uint8 in [0, 255] (normalised inside the API), got "
                                 f"dtype {dtype}")
    if not self._uint8 and not jnp.issubdtype(dtype, jnp.floating):
      raise errors.BadInputError(f"images must be floating point (normalised float32), got dtype "
                                 f"{dtype}")
    if self._input_shape is not None and tuple(shape[1:]) != self._input_shape:
      raise errors.BadInputError(f"images have shape {tuple(shape[1:])} per image, this API expects "
                                 f"{self._input_shape}")
    return images

  def _check_reps(self, reps) -> np.ndarray:
    shape = getattr(reps, "shape", None)
    dtype = getattr(reps, "dtype", None)
    if shape is None or dtype is None:
      raise errors.BadInputError(f"representations must be an array [N, {self.rep_dim}], got "
                                 f"{type(reps).__name__}")
    if len(shape) != 2 or shape[1] != self.rep_dim:
      raise errors.BadInputError(f"representations must have shape [N, {self.rep_dim}], got "
                                 f"{tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise errors.BadInputError(f"representations must be floating point, got dtype {dtype}")
    return reps

  def _check_users(self, users_per_row, n: int) -> List[str]:
    if isinstance(users_per_row, (str, bytes)) or not isinstance(users_per_row, collections.abc.Iterable):
      raise errors.BadInputError("users_per_row must be a sequence of user names, one per row, not "
                                 f"{type(users_per_row).__name__}")
    users = list(users_per_row)
    if len(users) != n:
      raise errors.BadInputError(f"users_per_row has {len(users)} names for {n} rows")
    canonical = {}
    out = []
    for row, u in enumerate(users):
      if isinstance(u, str) and u in canonical:
        out.append(canonical[u])
        continue
      try:
        canonical[u] = keys_lib.normalize_name(u)
      except errors.BadInputError as e:
        raise errors.BadInputError(f"users_per_row[{row}]: {e}") from None
      out.append(canonical[u])
    return out

  def _serve(self, users: List[str], inputs, *, from_images: bool) -> QueryResult:
    n = int(inputs.shape[0])
    if n == 0:
      return QueryResult(np.zeros((0, self.out_dim), np.float32), np.zeros((0,), np.float32),
                         np.zeros((0,), np.float32),
                         np.zeros((0, self._settings.num_projections
                                   + hardened.seen_columns(self._settings)), np.int32), ())
    distinct = len(set(users))
    if self._tables.bound is not None and distinct > self._tables.bound:
      raise errors.BadInputError(
          f"this call holds {distinct} distinct users; the {self._settings.transform} transform keeps "
          f"at most {self._tables.bound} users' matrices on device (defense config "
          f"transform_cache_mib={self._config.transform_cache_mib}): split the call or raise it")
    # All checks before any state changes: unknown users, then (only now) auto-registration.
    admitted = self._admit(users)
    slots = np.asarray([self._slots[u] for u in users], np.int32)
    accounts = None
    if from_images and self._noise_weights.bound:  # image-keyed noise: W's drawn before, by account
      names = list(dict.fromkeys(users))
      where = {name: i for i, name in enumerate(names)}
      accounts = ([noise_cache.account_key(keys_lib.uid_from_name(name)) for name in names],
                  np.asarray([where[u] for u in users], np.int64))
    try:
      table, index = self._tables.lookup(slots)
      weights, weight_index = (self._noise_weights.lookup(*accounts) if accounts is not None
                               else (None, None))
      if self._pad_batches:  # fewer shapes -> fewer compilations; padding rows (slot -1) are ignored
        size = max(_padded_size(n), _padded_size(self._min_batch_rows))
        slots = np.concatenate([slots, np.full((size - n,), -1, np.int32)])
        index = np.concatenate([index, np.zeros((size - n,), np.int32)])
        if weight_index is not None:
          weight_index = np.concatenate([weight_index, np.full((size - n,), -1, np.int32)])
        inputs = _pad_rows(inputs, size)
      if from_images:
        state, returned, info = self._run_images(slots, table, index, inputs, weights, weight_index)
      else:
        state, returned, info = step_lib.defense_step(
            self._params, self._state, _jit_arg(slots, np.int32), _jit_arg(inputs, np.float32), table,
            _jit_arg(index, np.int32))
    except Exception:
      self._forget(admitted)
      raise
    self._state = state  # unchanged values if the step rejected the batch (see step.py)
    if not bool(info["all_finite"]):
      self._forget(admitted)
      what = "images" if from_images else "representations"
      bad = [] if self._uint8 else _nonfinite_rows(inputs[:n])
      where = f" (rows {bad[:10]})" if bad else " (the encoder produced them)"
      raise errors.BadInputError(f"non-finite (NaN/Inf) representations for these {what}{where}; "
                                 "nothing was counted and the defense state is unchanged")
    if from_images and self._input_shape is None:  # only a call that was served fixes the shape
      self._input_shape = tuple(int(v) for v in inputs.shape[1:])
    if accounts is not None:
      self._noise_weights.record(*accounts, np.asarray(info["noise_level"])[:n])
    return QueryResult(reps=np.asarray(returned)[:n], coverage=np.asarray(info["coverage"])[:n],
                       sigma=np.asarray(info["sigma"])[:n],
                       buckets=np.asarray(info["buckets"], np.int32)[:n], users=tuple(users))

  def _run_images(self, slots, table, index, images, weights=None, weight_index=None):
    """The step on images (fused with the encoder when it traces); weights, weight_index: the W cache's
    arrays and int32 [N] entry per row (noise_cache.py), or None."""
    reps = None
    image_dtype = np.uint8 if self._uint8 else np.float32
    if self._fuse is None:
      if _is_traceable(self._encoder_fn, images, image_dtype):
        self._fuse = True
      else:  # not traceable, or these images are bad: an eager call tells which
        reps = self._eager_encode(images)
        self._fuse = False
        logging.warning("encoder_fn is not JAX-traceable: running it eagerly, outside the defense jit")
    if self._fuse:
      if self._fused_serve is None:
        self._fused_serve = _fused_serve_for(self._encoder_fn)
      try:
        return self._fused_serve(self._params, self._state, table, _jit_arg(index, np.int32),
                                 _jit_arg(slots, np.int32), self._rows(images, image_dtype),
                                 _encoder_parts(self._encoder_fn)[1], weights, weight_index)
      except (ValueError, FloatingPointError):
        raise
      except Exception as e:  # shape errors inside encoder_fn surface at trace time (nothing donated)
        if self._state.occupancy.is_deleted():
          raise
        raise errors.BadInputError(f"encoder_fn failed on images of shape {tuple(images.shape)}: "
                                   f"{e}") from e
    if reps is None:
      reps = self._eager_encode(images)
    descriptors = _image_descriptors(self._settings, _jit_arg(images, image_dtype))
    return step_lib.defense_step(self._params, self._state, _jit_arg(slots, np.int32), reps, table,
                                 _jit_arg(index, np.int32), descriptors, weights, weight_index)

  def _rows(self, images, dtype) -> jax.Array:
    """The images as the jitted call's argument; split over the local devices by rows with shard_rows
    (when they divide)."""
    sharding = self._row_sharding
    if sharding is None or images.shape[0] % sharding.mesh.size:
      return _jit_arg(images, dtype)
    return jax.device_put(np.asarray(images, dtype), sharding)

  def _eager_encode(self, images):
    try:
      reps = self._encoder_fn(images)
    except Exception as e:
      raise errors.BadInputError(f"encoder_fn failed on images of shape {tuple(images.shape)}: "
                                 f"{e}") from e
    return self._check_encoder_output(reps, images.shape[0])

  def _check_encoder_output(self, reps, n):
    shape = getattr(reps, "shape", None)
    if shape is None or tuple(shape) != (n, self.rep_dim):
      raise errors.BadInputError(f"encoder_fn returned shape {shape}, expected ({n}, {self.rep_dim})")
    return _jit_arg(reps, np.float32)


class _TransformTables:
  """Per-user transform parameters kept on device, so no query regenerates them.

  O(D) transforms: one entry per slot (index = slot). Matrix transforms (dense_affine, binary; D x D or
  D x 2D per user): an LRU of whole users, grown on demand up to `bound` entries, the most that fit in
  `cache_mib` MiB (at least one). A call needing more distinct users than `bound` is refused by the
  API before anything changes; results never depend on which entry holds a user.
  """

  def __init__(self, params: state_lib.DefenseParams, capacity: int, cache_mib: float):
    s = params.settings
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
    self.bound = None
    self._table = {}
    if self.kind == "none":
      return
    shapes = jax.eval_shape(lambda u: transforms.user_params(s, self._stream, u),
                            jax.ShapeDtypeStruct((2,), jnp.uint32))
    self._shapes = shapes
    if self.kind == "lru":
      per_user = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(shapes))
      self.bound = max(1, int(float(cache_mib) * 2**20 // per_user))
    self._table = self._empty(capacity if self.kind == "slots" else min(capacity, self.bound))

  def _empty(self, size: int):
    return jax.tree.map(lambda a: jax.device_put(np.zeros((size,) + a.shape, a.dtype)), self._shapes)

  def _write(self, entries: Sequence[int], uids: np.ndarray) -> None:
    """Writes the parameters of `uids` [n, 2] into `entries` in one device call (padded to 2^k)."""
    size = 1 << max(0, len(entries) - 1).bit_length()
    index = np.full((size,), self.entries(), np.int32)  # padding: out of range, dropped
    index[:len(entries)] = entries
    padded = np.zeros((size, 2), np.uint32)
    padded[:len(entries)] = uids
    self._table = _write_table_entries(self._settings, self._table, jax.device_put(index),
                                       self._stream, jax.device_put(padded))

  def entries(self) -> int:
    return jax.tree.leaves(self._table)[0].shape[0] if self._table else 0

  def snapshot(self):
    return self._table, dict(self._uids), collections.OrderedDict(self._entry_of_slot)

  def restore(self, snap) -> None:
    self._table, self._uids, self._entry_of_slot = snap

  def grow(self, capacity: int) -> None:
    if self.kind == "slots":
      self._table = state_lib.resize_rows(self._table, capacity)

  def shrink(self, capacity: int) -> None:
    for slot in [s for s in self._uids if s >= capacity]:
      self.remove_user(slot)
    if self.kind == "slots":
      self._table = state_lib.resize_rows(self._table, capacity)

  def remove_user(self, slot: int) -> None:
    self._uids.pop(slot, None)
    self._entry_of_slot.pop(slot, None)

  def add_users(self, slots: Sequence[int], uids: np.ndarray) -> None:
    for slot, uid in zip(slots, uids):
      self._uids[slot] = np.asarray(uid, np.uint32)
      self._entry_of_slot.pop(slot, None)
    if self.kind == "slots" and len(slots):
      self._write(list(slots), np.asarray(uids, np.uint32))

  def lookup(self, slots: np.ndarray):
    """(table, entry index per row) for the rows' slots."""
    if self.kind == "none":
      return {}, slots
    if self.kind == "slots":
      return self._table, slots
    needed = list(dict.fromkeys(int(s) for s in slots))
    if len(needed) > self.bound:  # the API refuses such calls first; never exceed the bound
      raise errors.BadInputError(f"{len(needed)} distinct users in one call; at most {self.bound}")
    if len(needed) > self.entries():
      self._table = state_lib.resize_rows(
          self._table, min(self.bound, max(2 * self.entries(), len(needed))))
    used = set(self._entry_of_slot.values())
    free = [e for e in range(self.entries()) if e not in used]
    writes = []
    for slot in needed:
      if slot in self._entry_of_slot:
        self._entry_of_slot.move_to_end(slot)
        continue
      if free:
        entry = free.pop()
      else:  # evict the least recently used user that this call does not need
        victim = next(s for s in self._entry_of_slot if s not in needed)
        entry = self._entry_of_slot.pop(victim)
      writes.append((entry, slot))
      self._entry_of_slot[slot] = entry
    if writes:
      self._write([e for e, _ in writes], np.stack([self._uids[s] for _, s in writes]))
    index = np.asarray([self._entry_of_slot[int(s)] for s in slots], np.int32)
    return self._table, index


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _write_table_entries(settings, table, entries, stream, uids):
  new = jax.vmap(lambda u: transforms.user_params(settings, stream, u))(uids)
  return jax.tree.map(lambda t, v: t.at[entries].set(v, mode="drop"), table, new)


_NORMALISING = weakref.WeakKeyDictionary()  # models.Encoder -> its uint8 wrapper (shares compilations)


class _NormalisingEncoder:
  """A models.Encoder taking uint8 images: normalised with its manifest's mean/std inside the jit."""

  def __init__(self, encoder):
    mean, std = normalization.normalization(encoder.manifest)
    self._normalize = lambda x: normalization.normalize(x, mean, std)
    self._apply = encoder.apply_fn
    self.params = encoder.params
    self.rep_dim = encoder.rep_dim

  def apply_fn(self, params, images):
    return self._apply(params, self._normalize(jnp.asarray(images)))

  def __call__(self, images):
    return self.apply_fn(self.params, images)


def _normalising_encoder(encoder) -> _NormalisingEncoder:
  fn = _NORMALISING.get(encoder)
  if fn is None:
    fn = _NORMALISING[encoder] = _NormalisingEncoder(encoder)
  return fn


def _meta_digest(meta: dict) -> str:
  """sha256 of the metadata's canonical JSON (all keys but the digest itself)."""
  body = {k: v for k, v in meta.items() if k != "integrity_sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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

  def serve(params, state, table, index, users, images, encoder_params, noise_weights=None,
            noise_weight_index=None):
    reps = apply_fn(encoder_params, images)
    n, d = images.shape[0], params.settings.rep_dim
    if tuple(reps.shape) != (n, d):
      raise ValueError(f"encoder_fn returned shape {tuple(reps.shape)}, expected ({n}, {d})")
    return step_lib.defense_step_impl(params, state, users, reps.astype(jnp.float32), table, index,
                                      _image_descriptors(params.settings, images), noise_weights,
                                      noise_weight_index)

  return jax.jit(serve, donate_argnums=(1,))


def _image_descriptors(settings, images):
  """The hardened mode's image descriptors (hardened.image_descriptor), None when nothing uses them."""
  if settings.noise_keying != "per_input" or settings.image_weight <= 0:
    return None
  return _descriptor_jit(images, settings.image_grid)


_descriptor_jit = jax.jit(hardened.image_descriptor, static_argnums=1)


def _is_traceable(encoder_fn, images, dtype) -> bool:
  apply_fn, encoder_params = _encoder_parts(encoder_fn)
  try:
    jax.eval_shape(apply_fn, encoder_params, jax.ShapeDtypeStruct(tuple(images.shape), dtype))
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _jit_arg(x, dtype):
  """x as an argument of a jitted call, of `dtype`: a jax.Array as it is (cast if need be), anything
  else as a numpy array, which the call moves to the device itself. A jax.device_put first cost
  ~0.15 ms more per query (8 images, hardened default, 0.42 -> 0.29 ms in-process on the 2-core CPU),
  and jnp.asarray of a numpy array compiles a tiny kernel per shape in this JAX version."""
  if isinstance(x, jax.Array):
    return x if x.dtype == dtype else x.astype(dtype)
  return np.asarray(x, dtype)


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
