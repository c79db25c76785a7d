"""Where every random draw of the defense comes from.

One master seed (config.seed) -> independent streams (LSH hyperplanes, per-user transforms, noise) ->
per-user keys folded from a 64-bit user id. The user id is derived from the account name with sha256,
so no per-user key material is ever stored: the server can recreate any user's transform from the name.
Noise keys additionally fold in the user's query-batch counter and the row's rank within the batch, so
no two queries of a user ever share noise and a batch mixing users equals per-user calls.
"""
import hashlib

import jax
import numpy as np

_STREAMS = {"lsh": 0, "transform": 1, "noise": 2, "fine": 3, "input_noise": 4}


def master_key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def stream_key(seed: int, stream: str) -> jax.Array:
  return jax.random.fold_in(master_key(seed), _STREAMS[stream])


def uid_from_name(name: str) -> np.ndarray:
  """Stable 64-bit id of an account name, as two uint32 words (first 8 bytes of sha256(name))."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"user names must be non-empty strings, got {name!r}")
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  return np.frombuffer(digest[:8], dtype=">u4").astype(np.uint32)


def user_key(stream: jax.Array, uid: jax.Array) -> jax.Array:
  """Per-user key of a stream; `uid` is a uint32 [2] array (traceable, vmappable)."""
  return jax.random.fold_in(jax.random.fold_in(stream, uid[0]), uid[1])
