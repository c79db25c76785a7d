"""The service's only door into b4b_jax.defense: build, query, replay, snapshot and restore the API.

The service relies on the DefendedEncoder service contract: a mixed-user call on uint8 images returns
its own result (`reps` [N, out_dim], per-row `coverage`, `sigma`, and the LSH `buckets` [N, P] each row
charged), `replay(users_per_row, buckets)` re-applies a journaled call bit-identically, and typed errors
(BadInputError, CorruptCheckpointError, NoCheckpointError) say what went wrong.
"""
import os
from typing import Optional, Sequence

import numpy as np

from b4b_jax import defense as defense_lib
from b4b_jax import models as models_lib
from b4b_jax.data import preprocess
from b4b_jax.defense import lsh
from b4b_jax.defense import state as state_lib
from b4b_jax.defense import step as step_lib


class Result:
  __slots__ = ("reps", "coverage", "sigma", "buckets")

  def __init__(self, reps, coverage, sigma, buckets):
    self.reps, self.coverage, self.sigma, self.buckets = reps, coverage, sigma, buckets


class _Interim:
  """Interim stand-in for DefendedEncoder.from_encoder_dir until the service contract lands on main."""

  def __init__(self, api, encoder):
    self.api, self.encoder = api, encoder
    self.mean, self.std = preprocess.normalization(encoder.manifest)
    s = api.params.settings
    self._bucket_fn = None

  def query_mixed(self, users, images_uint8):
    x = preprocess.normalize(np.asarray(images_uint8), self.mean, self.std).astype(np.float32)
    n = x.shape[0]
    size = padded_sizes(n)[-1]
    x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], np.float32)])
    reps = np.asarray(self.encoder(x), np.float32)[:n]
    p = self.api.params
    buckets = np.asarray(lsh.bucket_ids(reps, p.projection, p.settings.num_hyperplanes,
                                        p.threshold if p.settings.centered else None))
    out = self.api.query_representations(list(users), reps)
    info = self.api.last_info
    return Result(out, info["coverage"], info["sigma"], buckets)

  def replay(self, users, buckets):
    api = self.api
    for u in dict.fromkeys(users):
      api.register(u)
    slots = np.asarray([api.slot(u) for u in users], np.int32)
    st = api._state  # pylint: disable=protected-access
    occ, counts = lsh.add_buckets(st.occupancy, st.counts, slots, np.asarray(buckets, np.int32),
                                  api.params.settings.num_hyperplanes)
    nq = np.asarray(st.num_queries).copy()
    nb = np.asarray(st.num_batches).copy()
    np.add.at(nq, slots, 1)
    nb[np.unique(slots)] += 1
    api._state = state_lib.DefenseState(occupancy=occ, counts=counts, num_batches=np.asarray(nb),
                                        num_queries=nq, uids=st.uids)
    import jax  # pylint: disable=g-import-not-at-top
    api._state = jax.tree.map(jax.device_put, api._state)


def open_api(encoder_dir: str, config, *, capacity: int, snapshot: Optional[str] = None):
  """The defended API serving the encoder directory; continued from `snapshot` if given."""
  encoder = models_lib.load_encoder(encoder_dir)
  if snapshot is None:
    api = defense_lib.DefendedEncoder(encoder, config, encoder.rep_dim, capacity=capacity,
                                      pad_batches=True)
  else:
    api = defense_lib.DefendedEncoder.restore(snapshot, encoder)
  return _Interim(api, encoder)


def padded_sizes(max_rows: int):
  """The batch sizes the API pads to, up to the one that holds max_rows (8, 16, ..., 1024, k*1024)."""
  sizes, size = [], 8
  while True:
    sizes.append(size)
    if size >= max_rows:
      return sizes
    size = size * 2 if size < 1024 else size + 1024


def warm_up(api, config, sizes, *, capacity: int) -> None:
  """Compiles the call for every batch size on a scratch API (same encoder, config and capacity)."""
  scratch = _Interim(defense_lib.DefendedEncoder(api.encoder, config, api.encoder.rep_dim,
                                                 capacity=max(capacity, api.api.capacity)), api.encoder)
  s = api.encoder.input_size
  for size in sizes:
    scratch.query_mixed(["warm-up"] * size, np.zeros((size, s, s, 3), np.uint8))


def inner(api):
  return api.api


def query_mixed(api, users: Sequence[str], images: np.ndarray) -> Result:
  return api.query_mixed(users, images)


def replay(api, users: Sequence[str], buckets: np.ndarray) -> None:
  api.replay(users, buckets)


def save(api, path: str) -> None:
  inner(api).save(path)


def stats(api) -> dict:
  return inner(api).stats()


def state_arrays(api) -> dict:
  return state_lib.state_to_numpy(inner(api).state)


def preprocessing(api) -> dict:
  return api.encoder.manifest["preprocessing"]


def defense_fingerprint(config) -> dict:
  return config.to_dict()
