"""The service's only door into b4b_jax.defense: build, query, replay, snapshot and restore the API.

Built on the DefendedEncoder service contract: `from_encoder` takes uint8 images and normalises them
inside the jitted call; a mixed-user call returns its own QueryResult (reps, per-row coverage and sigma,
and the LSH `buckets` [N, P] each row charged); `replay(users_per_row, buckets)` re-applies a journaled
call bit-identically; refusals are typed (BadInputError, CorruptCheckpointError, NoCheckpointError).
"""
from typing import Optional, Sequence

import numpy as np

from b4b_jax import defense as defense_lib
from b4b_jax import models as models_lib
from b4b_jax.defense import state as state_lib


class Served:
  """The defended API and the encoder it fronts (the manifest gives the image geometry)."""

  def __init__(self, api: defense_lib.DefendedEncoder, encoder):
    self.api, self.encoder = api, encoder


def open_api(encoder_dir: str, config, *, capacity: int, snapshot: Optional[str] = None) -> Served:
  """The defended API serving the encoder directory; continued from `snapshot` if given."""
  encoder = models_lib.load_encoder(encoder_dir)
  if snapshot is None:
    api = defense_lib.DefendedEncoder.from_encoder(encoder, config, capacity=capacity)
  else:
    # restore() wraps a models.Encoder in the same uint8 normalising encoder from_encoder builds (one
    # per encoder, so the jit is shared with the warm-up's scratch API).
    api = defense_lib.DefendedEncoder.restore(snapshot, encoder)
  return Served(api, encoder)


def padded_sizes(max_rows: int):
  """The batch sizes the API pads to, up to the one that holds max_rows (8, 16, ..., 1024, k*1024)."""
  sizes, size = [], 8
  while True:
    sizes.append(size)
    if size >= max_rows:
      return sizes
    size = size * 2 if size < 1024 else size + 1024


def warm_up(served: Served, config, sizes, *, capacity: int) -> None:
  """Compiles the call for every batch size on a scratch API (same encoder, config and capacity, so
  the same jitted function and shapes), leaving the served state untouched."""
  scratch = defense_lib.DefendedEncoder.from_encoder(served.encoder, config,
                                                     capacity=max(capacity, served.api.capacity))
  s = served.encoder.input_size
  for size in sizes:
    scratch.query_mixed(["warm-up"] * size, np.zeros((size, s, s, 3), np.uint8))
  scratch.replay(["warm-up"], np.zeros((1, served.api.params.settings.num_projections), np.int32))


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
  return {k: v for k, v in config.to_dict().items() if k != "transform_cache_mib"}


def max_users_per_call(served: Served):
  return served.api.max_users_per_call
