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
import jax.numpy as jnp
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


# Key arithmetic on raw threefry key data, for the per-row noise keys of the jitted step.
#
# jax.random.fold_in / jax.random.bits on a CPU lower every threefry call to a rolled 5-iteration loop
# (XLA while), and the step derives each row's noise seeds through six of them (two for the user id,
# the batch counter, the rank, the noise sub-stream, the seed words): ~30 tiny loop iterations of
# separately dispatched ops per call. The functions below compute the same Threefry-2x32 (Salmon et
# al., 2011; 20 rounds) as straight-line elementwise ops that XLA fuses, on uint32 [..., 2] key data
# (jax.random.key_data). They return bit-identical keys and words (tests/test_defense_noise.py checks
# them against jax.random), so no drawn value changes.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 of counter words (x1, x2) under key (k1, k2), all uint32 arrays (broadcast)."""
  keys = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
    x1 = x1 + keys[(block + 1) % 3]
    x2 = x2 + keys[(block + 2) % 3] + np.uint32(block + 1)
  return x1, x2


def fast_keys_apply(key: jax.Array) -> bool:
  """Whether fold_in_data / bits_data reproduce jax.random for `key`'s implementation: threefry2x32
  keys (the default), and for bits_data the partitionable counter layout (JAX's default since 0.5)."""
  return (str(jax.random.key_impl(key)) == "threefry2x32"
          and bool(jax.config.jax_threefry_partitionable))


def fold_in_data(key_data: jax.Array, data: jax.Array) -> jax.Array:
  """uint32 [..., 2]: jax.random.key_data(jax.random.fold_in(k, d)) elementwise, for threefry key data
  [..., 2] (or [2]) and uint32 data [...] (broadcast)."""
  data = jnp.asarray(data).astype(jnp.uint32)
  y1, y2 = _threefry2x32(key_data[..., 0], key_data[..., 1], jnp.zeros_like(data), data)
  return jnp.stack([y1, y2], axis=-1)


def fold_in_rows(keys: jax.Array, *columns) -> jax.Array:
  """Typed keys [...]: fold_in(... fold_in(keys, columns[0]) ..., columns[-1]) elementwise, for a typed
  key (or typed keys [...]) and integer columns broadcasting to [...]. Bit-identical to vmapped
  jax.random.fold_in; straight-line threefry (above) for threefry keys, jax.random otherwise."""
  if str(jax.random.key_impl(keys)) != "threefry2x32":
    for column in columns:
      keys = jnp.vectorize(jax.random.fold_in)(keys, jnp.asarray(column).astype(jnp.uint32))
    return keys
  data = jax.random.key_data(keys)
  for column in columns:
    data = fold_in_data(data, column)
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys))


def bits_data(key_data: jax.Array, num_words: int) -> jax.Array:
  """uint32 [..., num_words]: jax.random.bits(k, (num_words,), uint32) per threefry key data [..., 2]
  (valid when fast_keys_apply)."""
  counter = jnp.arange(num_words, dtype=jnp.uint32)
  b1, b2 = _threefry2x32(key_data[..., 0, None], key_data[..., 1, None], jnp.zeros_like(counter),
                         counter)
  return b1 ^ b2
