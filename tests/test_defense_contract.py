"""DefendedEncoder as a service contract: results returned per call, typed errors, the encoder-directory
constructor, pre-sized capacity, journal replay, checkpoint integrity, user-name hygiene, bounded caches.
"""
import dataclasses
import glob
import json
import logging
import os
import shutil
import unicodedata

import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.defense import api as api_lib
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import state as state_lib

D = 16
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _cfg(**kw):
  kw.setdefault("num_projections", 4)
  kw.setdefault("num_hyperplanes", 5)
  return defense.defense_config("simsiam", lam=1e-2, alpha=1.0, beta=100.0, **kw)


def _reps(seed, n, d=D):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


_W3 = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)


def _pooling_encoder(images):  # any image size: global average pool, then a projection
  return jnp.tanh(images.mean(axis=(1, 2)) @ _W3)


def _arrays(api):
  return state_lib.state_to_numpy(api.state)


def _assert_same_state(a, b):
  for k, v in _arrays(a).items():
    np.testing.assert_array_equal(v, _arrays(b)[k], err_msg=k)


def _snap(api):
  return _arrays(api), api.users, api.capacity, json.dumps(api.stats(), sort_keys=True)


def _assert_unchanged(api, snap):
  arrays, users, capacity, stats = snap
  for k, v in _arrays(api).items():
    np.testing.assert_array_equal(v, arrays[k], err_msg=k)
  assert (api.users, api.capacity, json.dumps(api.stats(), sort_keys=True)) == (users, capacity, stats)


# ---------------------------------------------------------------------------- results and errors
def test_every_query_returns_its_own_result_with_coverage_sigma_and_buckets():
  cfg = _cfg()
  api = defense.DefendedEncoder(None, cfg, D)
  assert not hasattr(api, "last_info")
  reps = _reps(0, 12)
  users = ["a", "b", "a"] * 4
  result = api.query_representations(users, reps)
  assert isinstance(result, defense.QueryResult)
  with pytest.raises(dataclasses.FrozenInstanceError):
    result.reps = None  # pylint: disable=attribute-defined-outside-init
  assert result.reps.shape == (12, api.out_dim) and result.reps.dtype == np.float32
  assert result.coverage.shape == (12,) and result.sigma.shape == (12,)
  assert result.users == tuple(users)
  # Buckets against numpy: bit k of projection p's id is (x @ hyperplanes[p][:, k] > 0).
  planes = np.asarray(api.params.hyperplanes, np.float64)
  bits = np.einsum("nd,pdk->npk", reps.astype(np.float64), planes) > 0
  expected = (bits * (1 << np.arange(cfg.num_hyperplanes))).sum(-1).astype(np.int32)
  assert result.buckets.dtype == np.int32
  np.testing.assert_array_equal(result.buckets, expected)
  # Per-row coverage is the row's user's coverage after the call; sigma that coverage's noise.
  for u in ("a", "b"):
    rows = [i for i, v in enumerate(users) if v == u]
    np.testing.assert_allclose(result.coverage[rows], api.coverage(u), rtol=1e-6)
    np.testing.assert_allclose(result.sigma[rows], api.sigma(u), rtol=1e-5)
  empty = api.query_representations("a", np.zeros((0, D), np.float32))
  assert empty.reps.shape == (0, api.out_dim) and empty.buckets.shape == (0, cfg.num_projections)


def test_typed_errors_are_value_errors_and_leave_state_unchanged():
  for name in ("BadInputError", "UnknownUserError", "CorruptCheckpointError"):
    assert issubclass(getattr(defense, name), ValueError)
  assert issubclass(defense.NoCheckpointError, FileNotFoundError)
  api = defense.DefendedEncoder(None, _cfg(), D, require_registration=True)
  api.register("a")
  api.query_representations("a", _reps(1, 4))
  snap = _snap(api)
  nan = _reps(2, 4)
  nan[1, 3] = np.nan
  for call, error in [(lambda: api.query_representations("a", nan), defense.BadInputError),
                      (lambda: api.query_representations("a", _reps(1, 4, D + 1)), defense.BadInputError),
                      (lambda: api.query_representations("mallory", _reps(1, 4)),
                       defense.UnknownUserError),
                      (lambda: api.coverage("mallory"), defense.UnknownUserError),
                      (lambda: api.query("a", np.zeros((1, 4, 4, 3), np.float32)),
                       defense.BadInputError)]:
    with pytest.raises(error):
      call()
    _assert_unchanged(api, snap)


# ----------------------------------------------------------------------- the encoder-dir constructor
def test_from_encoder_dir_takes_uint8_and_normalises_inside_the_jit(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(0), small_input=True)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  models.save_encoder(str(tmp_path / "enc"), model, {"preprocessing": models.default_preprocessing(
      8, resize=None, mean=mean, std=std)})
  cfg = _cfg(transform="diag_affine")
  api = defense.DefendedEncoder.from_encoder_dir(str(tmp_path / "enc"), cfg, capacity=4)
  assert api.capacity == 4 and api.input_shape == (8, 8, 3)
  images = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  out = api.query("alice", images)
  # Reference: the same encoder on images normalised in numpy, through a float-input API.
  encoder = models.load_encoder(str(tmp_path / "enc"))
  ref_api = defense.DefendedEncoder(encoder, cfg, encoder.rep_dim)
  normalised = ((images / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
  ref = ref_api.query("alice", normalised)
  np.testing.assert_allclose(out.reps, ref.reps, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(out.buckets, ref.buckets)
  # The weights are jit arguments, not compiled-in constants.
  assert api_lib._encoder_parts(api._encoder_fn)[1] is not None  # pylint: disable=protected-access
  api.save(str(tmp_path / "api"))
  restored = defense.DefendedEncoder.restore(str(tmp_path / "api"), str(tmp_path / "enc"))
  again = images[::-1].copy()
  np.testing.assert_array_equal(restored.query("alice", again).reps, api.query("alice", again).reps)
  snap = _snap(api)
  for bad in (normalised, images[:, :6], images[..., :1]):
    with pytest.raises(defense.BadInputError):
      api.query("alice", bad)
    _assert_unchanged(api, snap)


# ---------------------------------------------------------------------------- capacity and restore
def test_presized_capacity_never_recompiles_and_restore_registers_in_one_call(tmp_path, monkeypatch):
  api = defense.DefendedEncoder(None, _cfg(transform="diag_affine"), D, capacity=32)
  api.query_representations("u0", _reps(0, 8))
  compiled = api_lib.step_lib.defense_step._cache_size()  # pylint: disable=protected-access
  for i in range(1, 20):
    api.query_representations(f"u{i}", _reps(i, 8))
  assert api.capacity == 32
  assert api_lib.step_lib.defense_step._cache_size() == compiled  # pylint: disable=protected-access
  api.save(str(tmp_path / "ckpt"))
  assert not hasattr(api_lib, "_set_uid")
  calls = []
  real = state_lib.set_uid
  monkeypatch.setattr(state_lib, "set_uid", lambda *a: calls.append(1) or real(*a))
  restored = defense.DefendedEncoder.restore(str(tmp_path / "ckpt"), None)
  assert len(calls) <= 1 and restored.users == api.users
  _assert_same_state(restored, api)
  x = _reps(99, 6)
  np.testing.assert_array_equal(restored.query_representations(["u3", "u7"] * 3, x).reps,
                                api.query_representations(["u3", "u7"] * 3, x).reps)


# ------------------------------------------------------------------------------------------- replay
@pytest.mark.parametrize("transform", ["identity", "dense_affine"])
def test_snapshot_plus_replayed_buckets_equals_the_uninterrupted_state(tmp_path, transform):
  cfg = _cfg(transform=transform)
  live = defense.DefendedEncoder(None, cfg, D, capacity=2)
  rng = np.random.default_rng(5)
  journal = []
  for i in range(7):
    if i == 3:
      live.save(str(tmp_path / "snap"))
      journal.clear()
    users = [f"u{j}" for j in rng.integers(0, 4, 5 + i)]
    result = live.query_representations(users, _reps(10 + i, len(users)))
    journal.append((list(result.users), result.buckets.copy()))
  revived = defense.DefendedEncoder.restore(str(tmp_path / "snap"), None)
  for users, buckets in journal:
    revived.replay(users, buckets)
  assert revived.users == live.users
  _assert_same_state(revived, live)
  x = _reps(77, 9)
  users = ["u0", "u3", "u1"] * 3
  a, b = live.query_representations(users, x), revived.query_representations(users, x)
  np.testing.assert_array_equal(a.reps, b.reps)
  np.testing.assert_array_equal(a.sigma, b.sigma)
  # Bad journal entries are refused with the state unchanged.
  snap = _snap(revived)
  for users, buckets in [(["u0"], np.full((1, 4), 1 << 5, np.int32)),
                         (["u0"], np.zeros((1, 3), np.int32)),
                         (["u0", "u1"], np.zeros((1, 4), np.int32)),
                         (["u0"], np.zeros((1, 4), np.float32))]:
    with pytest.raises(defense.BadInputError):
      revived.replay(users, buckets)
    _assert_unchanged(revived, snap)


# --------------------------------------------------------------------------- checkpoint integrity
def _meta_file(path, step=0):
  return glob.glob(os.path.join(path, str(step), "meta", "*"))[0]


def _edit_meta(path, fn, step=0):
  with open(_meta_file(path, step)) as f:
    meta = json.load(f)
  fn(meta)
  with open(_meta_file(path, step), "w") as f:
    json.dump(meta, f)


@pytest.mark.parametrize("edit", [
    lambda m: m["config"].update(alpha=2.0), lambda m: m["config"].update(lam=2e-2),
    lambda m: m["config"].update(beta=90.0), lambda m: m["config"].update(transform="diag_affine"),
    lambda m: m["config"].update(enabled=False), lambda m: m["config"].update(seed=1),
    lambda m: m.update(require_registration=True), lambda m: m.update(input_shape=[2, 2, 3])],
    ids=["alpha", "lam", "beta", "transform", "enabled", "seed", "require_registration",
         "input_shape"])
def test_edited_checkpoint_metadata_is_corruption(tmp_path, edit):
  api = defense.DefendedEncoder(None, _cfg(transform="identity"), D)
  api.query_representations(["a", "b"], _reps(0, 2))
  path = str(tmp_path / "ckpt")
  api.save(path)
  _edit_meta(path, edit)
  with pytest.raises(defense.CorruptCheckpointError, match="integrity"):
    defense.DefendedEncoder.restore(path, None)


@pytest.mark.parametrize("damage", ["meta/metadata", "state/_METADATA"])
def test_a_damaged_latest_step_is_corruption_naming_the_older_step(tmp_path, damage):
  api = defense.DefendedEncoder(None, _cfg(), D)
  path = str(tmp_path / "ckpt")
  api.query_representations("a", _reps(0, 4))
  api.save(path)
  api.query_representations("a", _reps(1, 4))
  api.save(path)
  os.remove(os.path.join(path, "1", damage))
  with pytest.raises(defense.CorruptCheckpointError, match=r"step 1.*step=0"):
    defense.DefendedEncoder.restore(path, None)
  older = defense.DefendedEncoder.restore(path, None, step=0)
  assert older.num_queries("a") == 4
  # A lone damaged step is corruption too, never "no checkpoint".
  lone = str(tmp_path / "lone")
  api.save(lone)
  os.remove(os.path.join(lone, "0", damage))
  with pytest.raises(defense.CorruptCheckpointError):
    defense.DefendedEncoder.restore(lone, None)
  with pytest.raises(defense.NoCheckpointError):
    defense.DefendedEncoder.restore(str(tmp_path / "nothing"), None)
  os.makedirs(str(tmp_path / "empty"))
  with pytest.raises(defense.NoCheckpointError):
    defense.DefendedEncoder.restore(str(tmp_path / "empty"), None)


def test_an_interrupted_save_restores_the_previous_step_and_says_so(tmp_path, caplog):
  api = defense.DefendedEncoder(None, _cfg(), D)
  path = str(tmp_path / "ckpt")
  api.query_representations("a", _reps(0, 4))
  api.save(path)
  # What a kill during the next save leaves: an uncommitted temporary step directory.
  shutil.copytree(os.path.join(path, "0"), os.path.join(path, "1.orbax-checkpoint-tmp-123"))
  with caplog.at_level(logging.WARNING):
    restored = defense.DefendedEncoder.restore(path, None)
  assert restored.num_queries("a") == 4
  assert "step 1" in caplog.text and "restoring step 0" in caplog.text


# ------------------------------------------------------------------------------ input shape, users
def test_a_rejected_first_query_does_not_fix_the_input_shape():
  api = defense.DefendedEncoder(_pooling_encoder, _cfg(), D)
  bad = np.full((2, 4, 4, 3), np.nan, np.float32)
  with pytest.raises(defense.BadInputError):
    api.query("a", bad)
  assert api.input_shape is None
  out = api.query("a", np.ones((3, 5, 5, 3), np.float32))
  assert out.reps.shape == (3, D) and api.input_shape == (5, 5, 3)


def test_bad_user_arguments_are_bad_input_and_names_are_nfc_normalised():
  api = defense.DefendedEncoder(None, _cfg(), D)
  api.query_representations("a", _reps(0, 4))
  snap = _snap(api)
  x = _reps(1, 4)
  for call, match in [(lambda: api.query_representations(123, x), "user"),
                      (lambda: api.query_representations([["a"]] * 4, x), "user"),
                      (lambda: api.query_representations("\ud800", x), "Unicode"),
                      (lambda: api.query_representations(["a", "b", "\ud800", "c"], x), "Unicode"),
                      (lambda: api.register(None), "user"),
                      (lambda: api.register(b"a"), "user")]:
    with pytest.raises(defense.BadInputError, match=match):
      call()
    _assert_unchanged(api, snap)
  nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
  assert nfc != nfd
  api.query_representations(nfc, x)
  api.query_representations(nfd, x)
  assert api.num_queries(nfc) == api.num_queries(nfd) == 8 and len(api.users) == 2


def test_registration_is_all_or_nothing(monkeypatch):
  api = defense.DefendedEncoder(None, _cfg(transform="diag_affine"), D, capacity=2)
  api.query_representations("a", _reps(0, 4))
  snap = _snap(api)
  real = keys_lib.uid_from_name
  # "evil" collides with "a" (64-bit ids): its registration fails after new1..new3 were accepted.
  monkeypatch.setattr(keys_lib, "uid_from_name", lambda n: real("a") if n == "evil" else real(n))
  with pytest.raises(ValueError, match="same 64-bit id"):
    api.query_representations(["new1", "new2", "new3", "evil"], _reps(1, 4))
  _assert_unchanged(api, snap)
  monkeypatch.setattr(keys_lib, "uid_from_name", real)
  out = api.query_representations(["new1", "a"], _reps(2, 2))
  assert api.users == ["a", "new1"] and out.reps.shape == (2, D)


# -------------------------------------------------------------------------------- transform cache
def test_matrix_transform_cache_is_bounded_and_eviction_changes_nothing():
  # 16 x 16 float32 matrix + bias = 1088 bytes per user; 0.003 MiB holds 2 users.
  cfg = _cfg(transform="dense_affine", transform_cache_mib=0.003)
  api = defense.DefendedEncoder(None, cfg, D, capacity=8)
  fresh = {}
  assert api.max_users_per_call == 2
  for i, users in enumerate([["u0", "u1"], ["u2"], ["u3", "u0"], ["u1", "u4"], ["u5", "u2"]] * 2):
    x = _reps(i, 2 * len(users))
    rows_users = users * 2
    out = api.query_representations(rows_users, x)
    assert api._tables.entries() <= 2  # pylint: disable=protected-access
    for u in users:  # a fresh single-user API per user gives the same rows
      ref = fresh.setdefault(u, defense.DefendedEncoder(None, _cfg(transform="dense_affine"), D))
      rows = [r for r, v in enumerate(rows_users) if v == u]
      np.testing.assert_array_equal(out.reps[rows], ref.query_representations(u, x[rows]).reps)
  snap = _snap(api)
  with pytest.raises(defense.BadInputError, match="transform_cache_mib"):
    api.query_representations(["u0", "u1", "u2"], _reps(0, 3))
  _assert_unchanged(api, snap)
  assert api._tables.entries() <= 2  # pylint: disable=protected-access
