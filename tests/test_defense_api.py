"""DefendedEncoder: mixed == sequential, noise statistics and keys, save/restore, bad input."""
import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.defense import api as api_lib
from b4b_jax.defense import state as state_lib

D = 16


# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _cfg(preset="simsiam", **kw):
  # Few, small buckets so coverage (and with it sigma) moves quickly on tiny batches.
  kw.setdefault("num_projections", 4)
  kw.setdefault("num_hyperplanes", 5)
  return defense.defense_config(preset, **kw)


def _loud_cfg(**kw):
  # sigma in ~[0.04, 1] at coverages 30 .. 100 %, so noise is far above float32 rounding.
  return _cfg(lam=1e-2, alpha=1.0, beta=100.0, **kw)


_W = np.random.default_rng(0).standard_normal((4 * 4 * 3, D)).astype(np.float32)


def _encoder(images):  # JAX-traceable toy encoder: NHWC [N, 4, 4, 3] -> [N, D]
  return jnp.tanh(images.reshape(images.shape[0], -1) @ _W)


class _ParamEncoder:
  """The models.Encoder protocol: weights as `.params`, `.apply_fn(params, images)`."""

  def __init__(self):
    self.params = {"w": jnp.asarray(_W)}

  def apply_fn(self, params, images):
    return jnp.tanh(images.reshape(images.shape[0], -1) @ params["w"])

  def __call__(self, images):
    return self.apply_fn(self.params, images)


def _snapshot(api):
  arrays = state_lib.state_to_numpy(api.state)
  return arrays, api.users, api.capacity, json.dumps(api.stats(), sort_keys=True)


def _assert_unchanged(api, snap):
  arrays, users, capacity, stats = snap
  now = state_lib.state_to_numpy(api.state)
  for k in arrays:
    np.testing.assert_array_equal(now[k], arrays[k], err_msg=k)
  assert (api.users, api.capacity, json.dumps(api.stats(), sort_keys=True)) == (users, capacity,
                                                                                stats)


def _batches(seed, sizes, users):
  rng = np.random.default_rng(seed)
  return [([users[i] for i in rng.integers(0, len(users), n)],
           rng.standard_normal((n, D)).astype(np.float32)) for n in sizes]


# ------------------------------------------------------------------------------- mixed == sequential
@pytest.mark.parametrize("transform", ["affine_pad_shuffle", "dense_affine"])
def test_mixed_batches_equal_per_user_sequential_calls(transform):
  cfg = _loud_cfg(transform=transform, pad_dim=3)
  users = ["u0", "u1", "u2", "u3", "u4"]
  # Capacity growth (2 -> 8 slots) on one (tests/test_defense_contract.py: the bounded matrix LRU).
  mixed = defense.DefendedEncoder(None, cfg, D, capacity=2 if transform != "dense_affine" else 8)
  sequential = defense.DefendedEncoder(None, cfg, D, capacity=8)
  for batch_users, reps in _batches(1, (24, 7, 30), users):
    out_mixed = mixed.query_representations(batch_users, reps).reps
    out_seq = np.zeros_like(out_mixed)
    for u in dict.fromkeys(batch_users):
      rows = np.flatnonzero(np.asarray(batch_users) == u)
      out_seq[rows] = sequential.query_representations(u, reps[rows]).reps
    np.testing.assert_array_equal(out_mixed, out_seq)
    assert out_mixed.shape == (len(reps), mixed.out_dim)
  for u in users:
    assert mixed.coverage(u) == sequential.coverage(u) > 0
    assert mixed.num_queries(u) == sequential.num_queries(u)
    assert mixed.num_query_batches(u) == sequential.num_query_batches(u)
  assert mixed.capacity == 8  # (grew from 2 without losing anyone's state for affine_pad_shuffle)


# --------------------------------------------------------------------------------------------- noise
def test_noise_std_matches_sigma_and_is_fresh_per_query():
  api = defense.DefendedEncoder(None, _loud_cfg(), D)
  reps = np.random.default_rng(2).standard_normal((512, D)).astype(np.float32)
  result = api.query_representations("alice", reps)
  first, sigma = result.reps, result.sigma
  assert np.all(sigma == sigma[0]) and 0.05 < sigma[0] < 5
  assert sigma[0] == pytest.approx(api.sigma("alice"), rel=1e-5)  # "after": coverage incl. batch
  z = (first - reps) / sigma[0]
  assert abs(z.std() - 1.0) < 0.05 and abs(z.mean()) < 0.05
  # Same inputs again: fresh noise (new batch counter); another user: different noise.
  again = api.query_representations("alice", reps).reps
  other = api.query_representations("bob", reps).reps
  assert not np.any(again == first) and not np.any(other == first)
  # Rows of one batch get independent noise (rank in batch is part of the key).
  same_rows = api.query_representations("carol", np.repeat(reps[:1], 4, axis=0)).reps
  assert len({tuple(r) for r in same_rows}) == 4


def test_static_sigma_and_sigma_from_before_and_disabled():
  reps = np.random.default_rng(3).standard_normal((256, D)).astype(np.float32)
  static = defense.DefendedEncoder(None, _cfg(static_sigma=0.3), D)
  result = static.query_representations("a", reps)
  out = result.reps
  assert np.all(result.sigma == np.float32(0.3))
  assert abs((out - reps).std() / 0.3 - 1.0) < 0.05
  assert static.coverage("a") > 0  # still counted, for plots

  before = defense.DefendedEncoder(None, _loud_cfg(sigma_from="before"), D)
  result = before.query_representations("a", reps[:64])
  np.testing.assert_array_equal(result.reps, reps[:64])
  assert np.all(result.sigma == 0)
  coverage_before = before.coverage("a")
  result = before.query_representations("a", reps[64:128])
  assert result.sigma[0] == pytest.approx(
      defense.noise_std(coverage_before, 1e-2, 1.0, 100.0), rel=1e-5)

  off = defense.DefendedEncoder(None, _cfg("none", transform="binary"), D)
  result = off.query_representations("a", reps)
  np.testing.assert_array_equal(result.reps, reps)
  assert off.out_dim == D and off.coverage("a") > 0 and np.all(result.sigma == 0)


def test_min_batch_rows_pads_short_calls_to_one_shape_with_the_same_answers(monkeypatch):
  sizes = []
  step = api_lib.step_lib.defense_step
  monkeypatch.setattr(api_lib.step_lib, "defense_step",
                      lambda *a, **k: sizes.append(a[3].shape[0]) or step(*a, **k))
  reps = np.random.default_rng(5).standard_normal((37, D)).astype(np.float32)
  cfg = _loud_cfg(transform="diag_affine")
  answers = {}
  for min_rows in (0, 32):
    api = defense.DefendedEncoder(None, cfg, D, min_batch_rows=min_rows)
    answers[min_rows] = [api.query_representations(u, r).reps
                         for u, r in (("a", reps[:32]), ("a", reps[32:]), ("b", reps[:3]))]
  assert sizes == [32, 8, 8, 32, 32, 32]  # min_batch_rows 32: one shape for the calls of 32, 5, 3
  for plain, padded in zip(answers[0], answers[32]):
    np.testing.assert_array_equal(plain, padded)
  for bad in (-1, 2.5, True, "8"):
    with pytest.raises(ValueError, match="min_batch_rows"):
      defense.DefendedEncoder(None, cfg, D, min_batch_rows=bad)


# ------------------------------------------------------------------------------------- images path
def test_fused_encoder_equals_embedding_path_and_non_traceable_encoder_works():
  images = np.random.default_rng(4).uniform(size=(10, 4, 4, 3)).astype(np.float32)
  cfg = _loud_cfg(transform="diag_affine")
  fused = defense.DefendedEncoder(_encoder, cfg, D)
  out = fused.query("alice", images).reps
  assert fused._fuse is True  # pylint: disable=protected-access
  emb = defense.DefendedEncoder(None, cfg, D)
  ref = emb.query_representations("alice", np.asarray(_encoder(images))).reps
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert fused.coverage("alice") == emb.coverage("alice")

  host = defense.DefendedEncoder(lambda x: np.tanh(np.asarray(x).reshape(len(x), -1) @ _W), cfg, D)
  np.testing.assert_allclose(host.query("alice", images).reps, out, rtol=1e-5, atol=1e-6)
  assert host._fuse is False  # pylint: disable=protected-access
  with_params = defense.DefendedEncoder(_ParamEncoder(), cfg, D)
  np.testing.assert_array_equal(with_params.query("alice", images).reps, out)
  mixed = fused.query_mixed(["bob", "alice"] * 5, images).reps
  assert mixed.shape == (10, D) and fused.num_queries("bob") == 5


# -------------------------------------------------------------------------------------- save/restore
def test_save_restore_continues_every_users_coverage_exactly(tmp_path):
  cfg = _loud_cfg(transform="pad_shuffle", pad_dim=2)
  users = ["ann", "bob", "cy"]
  batches = _batches(5, (20, 30, 25, 9), users)
  original = defense.DefendedEncoder(_encoder, cfg, D, capacity=2)
  uninterrupted = defense.DefendedEncoder(_encoder, cfg, D, capacity=2)
  for batch_users, reps in batches[:2]:
    original.query_representations(batch_users, reps)
    uninterrupted.query_representations(batch_users, reps)
  path = str(tmp_path / "api")
  assert original.save(path) == 0
  restored = defense.DefendedEncoder.restore(path, _encoder)
  assert restored.users == original.users and restored.capacity == original.capacity
  assert json.dumps(restored.stats(), sort_keys=True) == json.dumps(original.stats(), sort_keys=True)
  for batch_users, reps in batches[2:]:
    a = restored.query_representations(batch_users, reps).reps
    b = uninterrupted.query_representations(batch_users, reps).reps
    np.testing.assert_array_equal(a, b)
  for u in users:
    assert restored.coverage(u) == uninterrupted.coverage(u)
  assert restored.save(path) == 1  # a new step; the older one is kept


# ---------------------------------------------------------------------------------------- bad input
def test_bad_representations_leave_state_unchanged():
  api = defense.DefendedEncoder(None, _loud_cfg(), D, capacity=2)
  good = np.random.default_rng(6).standard_normal((8, D)).astype(np.float32)
  api.query_representations(["a", "b"] * 4, good)
  snap = _snapshot(api)
  nan = good.copy()
  nan[3, 2] = np.nan
  inf = good.copy()
  inf[0, 0] = np.inf
  cases = [
      (lambda: api.query_representations("a", good[0]), "shape"),
      (lambda: api.query_representations("a", good[:, :5]), "shape"),
      (lambda: api.query_representations("a", good.astype(np.int32)), "floating"),
      (lambda: api.query_representations("a", nan), r"non-finite.*rows \[3\]"),
      # A new user in a rejected batch must not stay registered (nor grow the capacity).
      (lambda: api.query_representations(["a", "new1", "new2", "a"] * 2, inf), "non-finite"),
      (lambda: api.query_representations(["a"] * 3, good), "3 names for 8 rows"),
      (lambda: api.query_representations("", good), "non-empty"),
      (lambda: api.coverage("nobody"), "unknown user"),
  ]
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()
    _assert_unchanged(api, snap)
  api.query_representations("a", good)  # still serving
  assert api.num_queries("a") == 12


def test_bad_images_and_unregistered_users_leave_state_unchanged():
  api = defense.DefendedEncoder(_encoder, _loud_cfg(), D, require_registration=True)
  images = np.random.default_rng(7).uniform(size=(6, 4, 4, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="unknown user 'alice'"):
    api.query("alice", images)
  api.register("alice")
  api.query("alice", images)
  snap = _snapshot(api)
  nan = images.copy()
  nan[2, 0, 0, 0] = np.nan
  cases = [
      (lambda: api.query("alice", images[0]), "rank 4"),
      (lambda: api.query("alice", images[:, :3]), r"\(3, 4, 3\) per image"),
      (lambda: api.query("alice", (images * 255).astype(np.uint8)), "floating point"),
      (lambda: api.query("alice", nan), r"non-finite.*rows \[2\]"),
      (lambda: api.query_mixed(["alice", "mallory"] * 3, images), "unknown user 'mallory'"),
      (lambda: api.query_mixed("alice", images), "sequence of user names"),
  ]
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()
    _assert_unchanged(api, snap)
  # An encoder that itself produces NaN (finite images) is caught inside the jitted step.
  bad_encoder = defense.DefendedEncoder(lambda x: _encoder(x) / 0.0 * 0.0, _loud_cfg(), D)
  with pytest.raises(ValueError, match="encoder produced them"):
    bad_encoder.query("alice", images)
  assert bad_encoder.users == [] and int(bad_encoder.state.num_queries.sum()) == 0


def test_corrupted_or_mismatched_checkpoints_raise(tmp_path):
  api = defense.DefendedEncoder(None, _loud_cfg(), D)
  api.query_representations(["a", "b"], np.ones((2, D), np.float32))
  with pytest.raises(FileNotFoundError):
    defense.DefendedEncoder.restore(str(tmp_path / "missing"), None)

  def saved(name):
    path = str(tmp_path / name)
    api.save(path)
    return path

  def meta_file(path):
    return glob.glob(os.path.join(path, "0", "meta", "*"))[0]

  def edit_meta(path, fn, resign=True):
    with open(meta_file(path)) as f:
      meta = json.load(f)
    fn(meta)
    if resign:  # a consistent digest, so the checks behind the integrity envelope are reached
      meta["integrity_sha256"] = api_lib._meta_digest(meta)  # pylint: disable=protected-access
    with open(meta_file(path), "w") as f:
      json.dump(meta, f)

  renamed = saved("renamed")
  edit_meta(renamed, lambda m: m.update(users=["a", "eve"]))
  other_k = saved("other_k")
  edit_meta(other_k, lambda m: m["config"].update(num_hyperplanes=6))
  bad_lam = saved("bad_lam")
  edit_meta(bad_lam, lambda m: m["config"].update(lam=0.0))
  tampered = saved("tampered")
  edit_meta(tampered, lambda m: m["arrays_sha256"].update(counts="0" * 64))
  unsigned = saved("unsigned")
  edit_meta(unsigned, lambda m: m["config"].update(lam=2e-2), resign=False)
  garbled = saved("garbled")
  for f in glob.glob(os.path.join(garbled, "0", "state", "**", "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as out:
        out.write(b"\x00garbage" * 3)
  for path, match in [(renamed, "does not hold the id of user 'eve'"), (other_k, "shape"),
                      (bad_lam, "lam must be > 0"), (tampered, "checksum"),
                      (unsigned, "integrity check"), (garbled, "damaged or unreadable")]:
    with pytest.raises(defense.CorruptCheckpointError, match=match):
      defense.DefendedEncoder.restore(path, None)


def test_a_models_encoder_runs_fused_with_its_weights_as_jit_arguments(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(0), small_input=True)
  models.save_encoder(str(tmp_path / "enc"), model,
                      {"preprocessing": models.default_preprocessing(16, resize=None)})
  encoder = models.load_encoder(str(tmp_path / "enc"))
  assert api_lib._encoder_parts(encoder)[1] is encoder.params  # pylint: disable=protected-access
  cfg = _loud_cfg(transform="diag_affine")
  api = defense.DefendedEncoder(encoder, cfg, encoder.rep_dim)
  images = np.random.default_rng(8).uniform(size=(5, 16, 16, 3)).astype(np.float32)
  out = api.query("alice", images).reps
  assert api._fuse is True  # pylint: disable=protected-access
  # (Fused == eager equality is checked with the toy encoders above; here the real model's protocol.)
  assert out.shape == (5, encoder.rep_dim) and np.isfinite(out).all()
  assert api.coverage("alice") > 0 and api.num_queries("alice") == 5
