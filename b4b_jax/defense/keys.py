"""Where every random draw of the defense comes from.

One master seed (config.seed) -> independent streams (LSH hyperplanes, per-user transforms, noise) ->
per-user keys folded from a 64-bit user id. The user id is derived from the account name with sha256,
so no per-user key material is ever stored: the server can recreate any user's transform from the name.
Names are compared (and hashed) in Unicode NFC form.
Noise keys additionally fold in the user's query-batch counter and the row's rank within the batch, so
no two queries of a user ever share noise and a batch mixing users equals per-user calls.
"""
import hashlib
import unicodedata

import jax
import numpy as np

from b4b_jax.defense import errors

_STREAMS = {"lsh": 0, "transform": 1, "noise": 2, "fine": 3, "input_noise": 4, "image": 5,
            "image_noise": 6}


def master_key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def stream_key(seed: int, stream: str) -> jax.Array:
  return jax.random.fold_in(master_key(seed), _STREAMS[stream])


MAX_NAME_LENGTH = 1024


def normalize_name(name) -> str:
  """The canonical form of an account name: Unicode NFC, so "café" typed either way is one account.

  BadInputError names the problem for non-strings, empty names, names that are not valid Unicode (lone
  surrogates such as '\ud800' cannot be encoded) and names longer than MAX_NAME_LENGTH characters.
  """
  if not isinstance(name, str):
    raise errors.BadInputError(f"user names must be strings, got {type(name).__name__} {name!r:.80}")
  if not name:
    raise errors.BadInputError("user names must be non-empty strings, got ''")
  if len(name) > MAX_NAME_LENGTH:
    raise errors.BadInputError(f"user name of {len(name)} characters is longer than {MAX_NAME_LENGTH}")
  try:
    name.encode("utf-8")
  except UnicodeEncodeError as e:
    raise errors.BadInputError(f"user name {name!r:.80} is not valid Unicode text ({e.reason} at "
                               f"position {e.start})") from None
  return unicodedata.normalize("NFC", name)


def uid_from_name(name: str) -> np.ndarray:
  """Stable 64-bit id of an account name, as two uint32 words (first 8 bytes of sha256 of the NFC
  form's UTF-8 bytes)."""
  digest = hashlib.sha256(normalize_name(name).encode("utf-8")).digest()
  return np.frombuffer(digest[:8], dtype=">u4").astype(np.uint32)


def user_key(stream: jax.Array, uid: jax.Array) -> jax.Array:
  """Per-user key of a stream; `uid` is a uint32 [2] array (traceable, vmappable)."""
  return jax.random.fold_in(jax.random.fold_in(stream, uid[0]), uid[1])
