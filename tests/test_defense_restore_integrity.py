"""Each integrity check of DefendedEncoder.restore fires on a checkpoint that breaks only it.

The broken states are saved through `save()` itself (so their array and metadata checksums are right
and only the consistency check under test can object); the hyperplane check is met by a restoring
process that derives other hyperplanes from the saved seed. test_defense_api.py covers the checksum, shape, registry and unreadable-file checks.
Written against today's restore (ValueError with a message); a typed error should keep these cases.
"""
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.defense import state as state_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")

D = 16


def _api():
  cfg = defense.defense_config("simsiam", num_projections=4, num_hyperplanes=5, lam=1e-2, alpha=1.0,
                               beta=100.0)
  api = defense.DefendedEncoder(None, cfg, D, capacity=4)
  reps = np.random.default_rng(0).standard_normal((12, D)).astype(np.float32)
  api.query_representations(["ann", "bob"] * 6, reps)
  api.query_representations("ann", reps[:5])
  return api


def _save_with(tmp_path, name, edit):
  """Saves an API whose host state arrays were changed by `edit(arrays)`; returns the path."""
  api = _api()
  arrays = state_lib.state_to_numpy(api.state)
  arrays = {k: v.copy() for k, v in arrays.items()}
  edit(arrays)
  api._state = state_lib.state_from_numpy(arrays)  # pylint: disable=protected-access
  path = str(tmp_path / name)
  api.save(path)
  return path


def _set_bit(arrays, slot):
  arrays["occupancy"][slot, 0, 0] |= np.uint32(1 << 7)
  arrays["counts"][slot, 0] = np.bitwise_count(arrays["occupancy"][slot, 0]).sum()


def test_an_untouched_checkpoint_restores(tmp_path):
  path = _save_with(tmp_path, "ok", lambda a: None)
  restored = defense.DefendedEncoder.restore(path, None)
  assert restored.users == ["ann", "bob"] and restored.num_queries("ann") == 11


def _bump_count(a):
  a["counts"][0, 1] += 1


def _clear_bit(a):
  a["occupancy"][1] = 0  # bob's buckets gone, his counts kept


def _negative_queries(a):
  a["num_queries"][1] = -1
  a["num_batches"][1] = -2


def _more_batches_than_queries(a):
  a["num_batches"][0] = a["num_queries"][0] + 1


@pytest.mark.parametrize("edit,match", [
    (_bump_count, "bucket counts disagree with the occupancy bits"),
    (_clear_bit, "bucket counts disagree with the occupancy bits"),
    (_negative_queries, "inconsistent query counters"),
    (_more_batches_than_queries, "inconsistent query counters"),
    (lambda a: _set_bit(a, 3), "unregistered slots hold state"),   # occupancy (counts consistent)
    (lambda a: a["num_queries"].__setitem__(2, 4), "unregistered slots hold state"),
    (lambda a: a["uids"].__setitem__(3, [5, 6]), "unregistered slots hold state"),
])
def test_each_state_consistency_check_fires(tmp_path, edit, match):
  path = _save_with(tmp_path, "bad", edit)
  with pytest.raises(ValueError, match=match):
    defense.DefendedEncoder.restore(path, None)


def test_hyperplane_checksum_mismatch_is_refused(tmp_path, monkeypatch):
  """A restoring process whose PRNG derives other hyperplanes from the saved seed (simulated by
  perturbing the derivation at restore time) must refuse: coverage could not continue exactly."""
  path = _save_with(tmp_path, "planes", lambda a: None)
  derive = state_lib._derive  # pylint: disable=protected-access

  def other_prng(*args):
    hyperplanes, *rest = derive(*args)
    return (hyperplanes + 1e-3, *rest)

  monkeypatch.setattr(state_lib, "_derive", other_prng)
  with pytest.raises(ValueError, match="hyperplanes"):
    defense.DefendedEncoder.restore(path, None)
