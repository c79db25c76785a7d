"""The paper protocol's per-epoch answers: the OFFLINE SIMULATION the original code ran. Not the API.

The original code (reference section 5.1-5.2) charged one pass over the stealing pool (coverage, hence
sigma, per batch position) and then, every epoch, sent fresh RandomResizedCrop + flip views of every
pool image to the victim and added noise at the sigma of the image's batch position. Those per-epoch
answers were never charged. The `paper` stealing protocol reproduces that regime. The charged pass goes
through `DefendedEncoder` (every query counted, like any other). The per-epoch answers are computed
here, inside the stealing job, from the defense's pure functions:

  answer = T_account( f_victim(view) + sigma_row * z ),   z ~ N(0, I) from defense.noise.standard_normal

sigma_row is the sigma the charged pass answered that row's batch with. T_account is the account's
per-user transform: the parameters the API draws for that account name (`defense.user_transform_params`),
applied with the defense's own `transforms.apply`. The noise uses the defense's generator with keys from
a stream of their own: fold(master key of defense.seed, OFFLINE_STREAM), then the account, the epoch and
the pool index of the row. So every epoch's noise is fresh, and a row's answer depends only on (seed,
account, epoch, pool index, its view). It never depends on batch composition or on which process
computes it, so kill-and-resume and multi-host runs are bit-identical.

This is deliberately NOT a method of DefendedEncoder. The served or public API has no uncharged path,
and this module never touches an API's state. A run that uses it says so in its results
("protocol": "paper", with charged queries and offline views reported separately).
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.defense import config as defense_config_lib
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import noise as noise_lib
from b4b_jax.defense import transforms as transforms_lib

# A stream of the defense's master key that none of the API's streams uses (defense/keys.py: 0..4).
OFFLINE_STREAM = 0x0FF1


class OfflineAnswers:
  """The per-epoch answers of the paper protocol for the accounts `users` (index = account, 0-based).

  `answer(images, sigma, accounts, pool_indices, epoch)`: uint8 views [N, H, W, 3] at the victim's
  input size. Returns float32 [N, out_dim]: each row in the space of its own account, not mapped.
  """

  def __init__(self, victim, defense_config, users: Sequence[str]):
    s = defense_config_lib.settings(defense_config, victim.rep_dim)
    if s.noise_keying != "per_query":
      raise ValueError("the paper protocol simulates the paper's B4B (noise_keying='per_query'); the "
                       f"hardened defense (noise_keying={s.noise_keying!r}) is only reachable through "
                       "the API: use attack.protocol=query_once or requery_each_epoch")
    self.settings = s
    self.out_dim = s.out_dim
    self._victim_params = victim.params
    pre = victim.manifest["preprocessing"]
    mean = np.asarray(pre["mean"], np.float32)
    std = np.asarray(pre["std"], np.float32)
    per_user = [transforms_lib.user_transform_params(defense_config, victim.rep_dim, u) for u in users]
    self._table = ({k: jnp.asarray(np.stack([p[k] for p in per_user])) for k in per_user[0]}
                   if per_user and per_user[0] else {})
    self._base = jax.random.fold_in(keys_lib.master_key(s.seed), OFFLINE_STREAM)
    self._fn = _make_answer_fn(victim.apply_fn, s, tuple(mean.tolist()), tuple(std.tolist()))

  def answer(self, images: np.ndarray, sigma: np.ndarray, accounts: np.ndarray,
             pool_indices: np.ndarray, epoch: int) -> np.ndarray:
    images = np.asarray(images)
    n = len(images)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"offline answers take uint8 NHWC views, got {images.dtype} {images.shape}")
    for name, a in (("sigma", sigma), ("accounts", accounts), ("pool_indices", pool_indices)):
      if np.shape(a) != (n,):
        raise ValueError(f"{name} must have one entry per image ({n}), got shape {np.shape(a)}")
    out = self._fn(self._victim_params, self._table, self._base, jnp.asarray(images),
                   jnp.asarray(sigma, jnp.float32), jnp.asarray(accounts, jnp.int32),
                   jnp.asarray(pool_indices, jnp.int32), jnp.int32(epoch))
    return np.asarray(out, np.float32)


def row_keys(base: jax.Array, accounts: jax.Array, pool_indices: jax.Array, epoch) -> jax.Array:
  """The key of each row: fold(fold(fold(base, account), epoch), pool index)."""
  fold = jax.random.fold_in
  return jax.vmap(lambda a, r: fold(fold(fold(base, a), epoch), r))(accounts, pool_indices)


@functools.lru_cache(maxsize=8)
def _make_answer_fn(apply_fn, s, mean, std):
  @jax.jit
  def answer(victim_params, table, base, images, sigma, accounts, pool_indices, epoch):
    # The API's arithmetic (defense/api.py _NormalisingEncoder): uint8 -> [0, 1] -> manifest mean/std.
    x = (images.astype(jnp.float32) / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32)
    clean = apply_fn(victim_params, x).astype(jnp.float32)
    if not s.enabled:  # an undefended API returns the clean representation
      return clean
    keys = row_keys(base, accounts, pool_indices, epoch)
    z = noise_lib.standard_normal(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), clean.shape[1])
    noised = clean + sigma[:, None] * z
    debinarize = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return transforms_lib.apply(s, table, accounts, noised, debinarize)
  return answer
