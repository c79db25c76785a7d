"""Sybil protocol (b4b_jax/attacks/protocol.py): the stolen model trains on account k's responses
carried through account k's own mapper, and on account 1's responses as returned.

A real DefendedEncoder (per-user dense affine transforms and B4B noise, so every account answers in its
own space) behind a recording proxy: the test sees exactly what each account received and checks the
training targets row by row against `attacker.mappers[k].apply(received by k)`.

Written against today's Attacker (query-once `collect_training_targets`, re-query `query_rows`); the
stealing trainer's rewrite should keep the same property at whatever its boundary becomes.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.attacks import protocol
from b4b_jax.attacks import queries

pytestmark = pytest.mark.usefixtures("fast_compiles")

D = 8
_W = np.random.default_rng(0).standard_normal((2 * 2 * 3, D)).astype(np.float32)
_POOL = np.random.default_rng(1).standard_normal((400, 2, 2, 3)).astype(np.float32)
MAPPER = dict(kind="linear", epochs=3, learning_rate=1e-2, batch_size=8, val_fraction=0.25, seed=0)
# Query batches of 32 only (96 queries per account: 32 mapping + 64 new): one compilation of the API.


def _encoder(images):
  return jnp.tanh(images.reshape(images.shape[0], -1) @ _W)


class _RecordingAPI:
  """Delegates to the real API and keeps every response each user received, in order."""

  def __init__(self, api):
    self._api = api
    self.received = {}

  def __getattr__(self, name):
    return getattr(self._api, name)

  def query(self, user, images):
    result = self._api.query(user, images)
    self.received.setdefault(user, []).append(np.array(result.reps, copy=True))
    return result

  def query_mixed(self, users, images):
    result = self._api.query_mixed(users, images)
    for u in set(users):
      rows = [i for i, v in enumerate(users) if v == u]
      self.received.setdefault(u, []).append(np.array(result.reps[rows], copy=True))
    return result


def _attacker(num_accounts=3):
  cfg = defense.defense_config("simsiam", transform="dense_affine", num_projections=2,
                               num_hyperplanes=4, lam=1e-3, alpha=0.05, beta=50.0)
  api = _RecordingAPI(defense.DefendedEncoder(_encoder, cfg, D))
  plan = queries.plan_queries(len(_POOL), 288, num_accounts=num_accounts, num_queries_mapping=32,
                              seed=0)
  views = lambda idx, epoch: _POOL[idx] + 0.01 * epoch  # noqa: E731
  return protocol.Attacker(api, plan, views, batch_size=32), api, plan


def test_query_once_targets_are_each_accounts_responses_through_its_own_mapper():
  attacker, api, plan = _attacker()
  targets = attacker.collect_training_targets(**MAPPER)
  rows_of = protocol.accounts_of_rows(plan)
  assert targets.shape == (len(plan.train_indices), D)
  assert sorted(attacker.mappers) == [1, 2]
  for a in plan.accounts:
    user = attacker.users[a.index]
    # What this account received for its new images: its last len(new_indices) response rows (the
    # mapping-phase batches come first).
    received = np.concatenate(api.received[user])[-len(a.new_indices):]
    mine = targets[rows_of == a.index]
    if a.index == 0:
      np.testing.assert_array_equal(mine, received)  # account 1's space: used as returned
    else:
      expected = attacker.mappers[a.index].apply(received)
      np.testing.assert_allclose(mine, expected, rtol=1e-6, atol=1e-6)
      # The mapping matters here (another account's transform), so unmapped rows would be caught.
      assert np.abs(received - expected).mean() > 0.1
      other = attacker.mappers[3 - a.index].apply(received)  # the other sybil's mapper
      assert np.abs(other - expected).mean() > 0.05


def test_requery_batches_map_each_row_with_its_accounts_mapper():
  attacker, api, plan = _attacker()
  attacker.mapping_phase_only(**MAPPER)
  rows_of = protocol.accounts_of_rows(plan)
  pick = np.random.default_rng(2).permutation(len(rows_of))[:32]  # a mixed batch, as in training
  for user in api.received:
    api.received[user] = []
  out = attacker.query_rows(rows_of[pick], plan.train_indices[pick], epoch=1)
  for k in range(len(plan.accounts)):
    user = attacker.users[k]
    (received,) = api.received[user]
    mine = out[rows_of[pick] == k]
    if k == 0:
      np.testing.assert_array_equal(mine, received)
    else:
      np.testing.assert_allclose(mine, attacker.mappers[k].apply(received), rtol=1e-6, atol=1e-6)
      assert np.abs(mine - received).mean() > 0.1
