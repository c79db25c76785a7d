"""The service's only door into b4b_jax.defense: build, query, replay, snapshot and restore the API.

Built on the DefendedEncoder service contract: `from_encoder` takes uint8 images and normalises them
inside the jitted call; a mixed-user call returns its own QueryResult (reps, per-row coverage and sigma,
and the LSH `buckets` [N, P] each row charged); `replay(users_per_row, buckets)` re-applies a journaled
call bit-identically; refusals are typed (BadInputError, CorruptCheckpointError, NoCheckpointError).
"""
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from b4b_jax import defense as defense_lib
from b4b_jax import models as models_lib
from b4b_jax.defense import state as state_lib


class Served:
  """The defended API and the encoder it fronts (the manifest gives the image geometry)."""

  def __init__(self, api: defense_lib.DefendedEncoder, encoder):
    self.api, self.encoder = api, encoder


def load_encoder(encoder_dir: str):
  return models_lib.load_encoder(encoder_dir)


def open_api(encoder, config, *, capacity: int, snapshot: Optional[str] = None,
             shard_rows: bool = False) -> Served:
  """The defended API serving the encoder (load_encoder); continued from `snapshot` if given.
  shard_rows: each micro-batch split over all local devices (DefendedEncoder's shard_rows)."""
  # fuse_encoder: a models.Encoder is traceable, so its first call need not trace it once more to find
  # out (DefendedEncoder's default probes with eval_shape, a second trace of the whole encoder).
  if snapshot is None:
    api = defense_lib.DefendedEncoder.from_encoder(encoder, config, capacity=capacity,
                                                   shard_rows=shard_rows, fuse_encoder=True)
  else:
    # restore() wraps a models.Encoder in the same uint8 normalising encoder from_encoder builds (one
    # per encoder, so the jit is shared with the warm-up's scratch API).
    api = defense_lib.DefendedEncoder.restore(snapshot, encoder, shard_rows=shard_rows,
                                              fuse_encoder=True)
  return Served(api, encoder)


def padded_sizes(max_rows: int):
  """The batch sizes the API pads to, up to the one that holds max_rows (8, 16, ..., 1024, k*1024)."""
  sizes, size = [], 8
  while True:
    sizes.append(size)
    if size >= max_rows:
      return sizes
    size = size * 2 if size < 1024 else size + 1024


def scratch_api(encoder, config, *, capacity: int, shard_rows: bool = False) -> Served:
  """An API for warm_up: the same encoder, config, capacity and sharding as the served one, so the
  same jitted function (one per encoder, made here, on the calling thread) and the same shapes."""
  return Served(defense_lib.DefendedEncoder.from_encoder(encoder, config, capacity=capacity,
                                                         shard_rows=shard_rows, fuse_encoder=True),
                encoder)


def warm_up(scratch: Served, sizes, stop=None) -> None:
  """Compiles the call for every batch size on the scratch API, touching no served state (may run on
  a thread while the served API is restored and serves). stop: a threading.Event checked between
  sizes (a stopping service waits for one compile at most)."""
  s = scratch.encoder.input_size
  for size in sizes:
    if stop is not None and stop.is_set():
      return
    scratch.api.query_mixed(["warm-up"] * size, np.zeros((size, s, s, 3), np.uint8))


def replay_entries(served: Served, entries: Iterable, *, max_rows: int = 8192) -> Tuple[int, int]:
  """Replays journal entries in order, several per device call where that is exact; returns
  (entries, calls).

  One replay call advances each user in it by one query batch (DefendedEncoder.replay), so
  consecutive entries are merged only while no user appears in two of them: the merged call then
  sets the same occupancy bits and counts (a union), adds the same query counts (a sum) and the same
  one batch per (entry, user). A user that recurs starts a new call. Every call is padded to max_rows
  rows (a call of one larger entry to its own padded size): one compiled shape for the whole replay, where calls of their own sizes
  compiled one program per size (2-5 s of a restart's 11 s on 2 quiet cores, benchmarks.serve_restart)."""
  api = served.api
  users: List[str] = []
  codes: List[np.ndarray] = []
  seen: set = set()
  num_entries = num_calls = 0

  def flush():
    nonlocal num_calls
    if users:
      api.replay(users, np.concatenate(codes) if len(codes) > 1 else codes[0], pad_to=max_rows)
      num_calls += 1
    users.clear()
    codes.clear()
    seen.clear()

  for entry in entries:
    names = set(entry.users_per_row)
    if (names & seen) or len(users) + len(entry.users_per_row) > max_rows:
      flush()
    users.extend(entry.users_per_row)
    codes.append(entry.codes)
    seen.update(names)
    num_entries += 1
  flush()
  return num_entries, num_calls


def inner(served: Served) -> defense_lib.DefendedEncoder:
  return served.api


def query_mixed(served: Served, users: Sequence[str], images: np.ndarray):
  return served.api.query_mixed(users, images)


def replay(served: Served, users: Sequence[str], buckets: np.ndarray) -> None:
  served.api.replay(users, buckets)


def save(served: Served, path: str) -> None:
  served.api.save(path)


def stats(served: Served) -> dict:
  return served.api.stats()


def state_arrays(served: Served) -> dict:
  return state_lib.state_to_numpy(served.api.state)


def preprocessing(served: Served) -> dict:
  return served.encoder.manifest["preprocessing"]


def defense_fingerprint(config) -> dict:
  """The defense config as compared between a snapshot and the running config (a cache size is not
  part of what is computed)."""
  return {k: v for k, v in config.to_dict().items()
          if k not in ("transform_cache_mib", "noise_cache_mib")}


def max_users_per_call(served: Served):
  return served.api.max_users_per_call
