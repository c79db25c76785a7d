"""Streaming pool and views (b4b_jax.data.stream) on a generated class-folder tree, bad input included."""
import io
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from b4b_jax import data as data_lib
from b4b_jax.data import stream

CLASSES = ("ant", "bee", "cow")


def _jpeg(path, array, quality=95):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, "JPEG", quality=quality)


def _make_tree(root, per_class=4, sizes=((30, 40), (36, 28), (33, 33), (41, 29)), fmt="JPEG"):
  rng = np.random.default_rng(0)
  for c, name in enumerate(CLASSES):
    for i in range(per_class):
      h, w = sizes[i % len(sizes)]
      im = rng.integers(0, 256, (h, w, 3), np.uint8)
      path = os.path.join(root, "train", name, f"im{i}.{'jpg' if fmt == 'JPEG' else 'png'}")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(im).save(path, fmt)
  return root


def _cfg(root, split="train", **kw):
  c = ml_collections.ConfigDict({"name": f"folder:{root}", "split": split, "limit": None,
                                 "image_size": None, "per_class": None, "data_dir": None,
                                 "transform": {"mode": "center_crop", "size": 24, "resize_size": 24}})
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return _make_tree(str(tmp_path_factory.mktemp("pool")))


def test_centre_crop_views_equal_the_old_in_memory_pool(tree):
  """Pool transform (shorter side 24, centre crop 24) + the query view (shorter side 18, centre crop
  16): pixel-identical to load_arrays + apply_transform, the steal job's old in-memory path."""
  cfg = _cfg(tree)
  pool = stream.open_pool(cfg, seed=3)
  assert len(pool) == 12 and pool.streams_from_disk and not pool.skipped
  view = {"mode": "center_crop", "size": 16, "resize_size": 18}
  old_pool, labels = data_lib.load_arrays(cfg.name, "train", transform=cfg.transform.to_dict(), seed=3)
  old = data_lib.apply_transform(old_pool, view, seed=3, epoch=0)
  idx = np.random.default_rng(1).permutation(12)
  new = stream.views(pool, idx, view, seed=3, epoch=0, batch_size=5)
  np.testing.assert_array_equal(new, old[idx])
  np.testing.assert_array_equal(pool.labels, labels)
  # Batch size and order do not change a view.
  np.testing.assert_array_equal(stream.views(pool, idx[::-1], view, seed=3, epoch=0, batch_size=12),
                                old[idx[::-1]])


def test_centre_crop_is_pixel_exact_against_numpy(tmp_path):
  """PNG images whose shorter side is already the resize size: the pool image is a numpy slice with
  torchvision CenterCrop's offsets round((H - h) / 2)."""
  rng = np.random.default_rng(5)
  arrays = [rng.integers(0, 256, (20, 27, 3), np.uint8), rng.integers(0, 256, (25, 20, 3), np.uint8)]
  for k, a in enumerate(arrays):
    path = tmp_path / "train" / "c" / f"{k}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
  pool = stream.open_pool(_cfg(str(tmp_path), transform={"mode": "center_crop", "size": 16,
                                                         "resize_size": 20}), seed=0)
  got = stream.views(pool, [0, 1], None, seed=0, epoch=0)
  np.testing.assert_array_equal(got[0], arrays[0][2:18, 6:22])   # round(4 / 2) = 2, round(11 / 2) = 6
  np.testing.assert_array_equal(got[1], arrays[1][4:20, 2:18])   # round(9 / 2) = 4 (half to even)


def test_augmented_views_are_deterministic_per_seed_epoch_index(tree):
  pool = stream.open_pool(_cfg(tree), seed=0)
  rrc = {"mode": "random_resized_crop", "size": 16, "flip": True}
  idx = np.arange(12)
  e1 = stream.views(pool, idx, rrc, seed=0, epoch=1, batch_size=4)
  again = stream.views(pool, idx[::-1], rrc, seed=0, epoch=1, batch_size=7)[::-1]
  np.testing.assert_array_equal(e1, again)  # same (seed, epoch, index) -> same pixels, any order/batch
  e2 = stream.views(pool, idx, rrc, seed=0, epoch=2, batch_size=4)
  other_seed = stream.views(pool, idx, rrc, seed=1, epoch=1, batch_size=4)
  assert all(not np.array_equal(e1[i], e2[i]) for i in idx)  # a fresh view every epoch
  assert sum(np.array_equal(e1[i], other_seed[i]) for i in idx) == 0
  # The same draws as preprocess.apply_transform over the in-memory pool images (ids = pool indices).
  base = stream.views(pool, idx, None, seed=0, epoch=0)
  np.testing.assert_array_equal(e1, data_lib.apply_transform(base, rrc, seed=0, ids=idx, epoch=1))


def test_in_memory_views_equal_the_streamed_ones_and_trace_once():
  """views() of an in-memory pool maps the per-image function over the rows in one call; view_batches
  streams it through tf.data: the same pixels, and neither traces it again for new rows or epochs."""
  images = np.random.default_rng(1).integers(0, 256, (40, 20, 18, 3), np.uint8)
  pool = stream.Pool("arrays", "train", np.zeros(40, np.int32), images=images)
  for spec in ({"mode": "random_resized_crop", "size": 16, "flip": True}, None):
    for epoch, idx in ((1, np.arange(9)), (2, np.random.default_rng(2).permutation(40)[:13])):
      got = stream.views(pool, idx, spec, seed=5, epoch=epoch)
      streamed = np.concatenate(list(stream.view_batches(pool, idx, spec, seed=5, epoch=epoch,
                                                          batch_size=4)))
      np.testing.assert_array_equal(got, streamed)
      np.testing.assert_array_equal(got, data_lib.apply_transform(images[idx], spec, seed=5, ids=idx,
                                                                  epoch=epoch) if spec else images[idx])
    entry = stream._view_function(pool, data_lib.make_transform(spec), 5)
    assert entry["fn"].experimental_get_tracing_count() == 1
    assert entry["batch"].experimental_get_tracing_count() == 1
  with pytest.raises(IndexError, match="out of range"):
    stream.views(pool, np.array([3, 40]), None, seed=5, epoch=0)


def test_host_shares_are_disjoint_and_cover(tree):
  pool = stream.open_pool(_cfg(tree), seed=0)
  rrc = {"mode": "random_resized_crop", "size": 16, "flip": True}
  everything = stream.views(pool, np.arange(12), rrc, seed=0, epoch=4)
  for n in (12, 7, 3):
    for count in (1, 2, 3, 5):
      shares = [np.arange(n)[stream.host_slice(n, p, count)] for p in range(count)]
      np.testing.assert_array_equal(np.concatenate(shares), np.arange(n))  # disjoint, in order, all
  parts = [stream.views(pool, np.arange(12)[stream.host_slice(12, p, 3)], rrc, seed=0, epoch=4)
           for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), everything)
  ids = np.array([5, 0, 3])
  (rows,) = stream.gather_rows(ids, np.array([[50], [0], [30]]))
  np.testing.assert_array_equal(rows[:, 0], [0, 30, 50])


def test_corrupt_files_are_skipped_counted_and_cached(tmp_path):
  root = _make_tree(str(tmp_path / "pool"), per_class=3)
  good = os.path.join(root, "train", "bee", "im1.jpg")
  with open(good, "rb") as f:
    body = f.read()
  truncated = os.path.join(root, "train", "bee", "im0.jpg")
  with open(truncated, "wb") as f:
    f.write(body[:len(body) // 3])          # a JPEG cut short
  garbage = os.path.join(root, "train", "cow", "zz.jpg")
  with open(garbage, "wb") as f:
    f.write(b"\xff\xd8\xff" + os.urandom(200))  # a JPEG signature, then noise
  cache = str(tmp_path / "check.json")
  pool = stream.open_pool(_cfg(root), seed=0, check_cache=cache)
  assert set(pool.skipped) == {truncated, garbage}
  assert len(pool) == 9 - 1 and pool.summary()["skipped_corrupt"] == 2
  assert truncated not in pool.paths and garbage not in pool.paths
  assert os.path.exists(cache)
  # The cache is used while the file list is the same (no second decode pass).
  os.remove(garbage)
  with open(garbage, "wb") as f:
    f.write(b"\xff\xd8\xff" + os.urandom(200))
  assert set(stream.open_pool(_cfg(root), seed=0, check_cache=cache).skipped) == {truncated, garbage}
  with pytest.raises(ValueError, match="undecodable.*zz.jpg"):
    stream.open_pool(_cfg(root), seed=0, on_corrupt="error")
  # A file that breaks after the check is named when a stream reaches it.
  victim = pool.paths[3]
  with open(victim, "wb") as f:
    f.write(b"\xff\xd8\xff" + b"\x00" * 50)
  with pytest.raises(ValueError, match=os.path.basename(victim)):
    list(stream.view_batches(pool, np.arange(len(pool)), None, seed=0, epoch=0, batch_size=4))


def test_bad_folders_are_named(tmp_path):
  root = _make_tree(str(tmp_path / "a"), per_class=2)
  os.makedirs(os.path.join(root, "train", "dog"))  # an empty class folder
  with pytest.raises(ValueError, match="empty class folder.*dog"):
    stream.open_pool(_cfg(root), seed=0)
  root = _make_tree(str(tmp_path / "b"), per_class=2)
  _jpeg(os.path.join(root, "val", "ILSVRC2012_val_00000001.JPEG"), np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="not sorted into class folders.*val"):
    stream.open_pool(_cfg(root, split="val"), seed=0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    stream.open_pool(_cfg(str(tmp_path / "missing")), seed=0)


def test_steal_refuses_a_missing_victim_directory(tmp_path):
  from b4b_jax.jobs import steal
  from configs import steal_simsiam
  c = steal_simsiam.get_config("tiny")
  c.victim.build_tiny = ""
  c.victim.encoder_dir = str(tmp_path / "no_such_encoder")
  with pytest.raises(FileNotFoundError, match="no_such_encoder"):
    steal.validate_config(c)
  c.victim.encoder_dir = ""
  c.victim.build_tiny = "resnet18_w0.125"
  c.data.on_corrupt = "ignore"
  with pytest.raises(ValueError, match="on_corrupt"):
    steal.validate_config(c)


def test_folder_decode_errors_name_the_file(tmp_path):
  root = _make_tree(str(tmp_path), per_class=1)
  bad = os.path.join(root, "train", "ant", "im0.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff" + b"\x01" * 64)
  files = data_lib.list_folder(root, "train")
  ds = data_lib.folders.folder_dataset(files)
  with pytest.raises(ValueError, match="im0.jpg"):
    list(data_lib.folders.iterate_named(ds, files.paths))
  from b4b_jax.evaluation import embeddings
  with pytest.raises(ValueError, match="im0.jpg"):
    embeddings.embed_split(None, f"folder:{root}", "train",
                           transform=data_lib.Transform("resize", 8), batch_size=2)


_DATA_PARALLEL_RUN = r"""
import sys
import numpy as np
import jax
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates
from b4b_jax import data as data_lib, models
from b4b_jax.evaluation import embeddings
from b4b_jax.jobs import steal
from b4b_jax.utils import distributed
from configs import steal_simsiam

root, victim_dir, out = sys.argv[1:4]
assert jax.local_device_count() == int(sys.argv[4]), jax.devices()
config = steal_simsiam.get_config("tiny,defended=1,protocol=query_once")  # epoch 0: centre crops
config.defense.num_hyperplanes, config.defense.num_projections, config.defense.lam = 6, 4, 1e-3
config.defense.alpha, config.defense.beta = 0.2, 20.0
victim = models.load_encoder(victim_dir)
import ml_collections
cfg = ml_collections.ConfigDict({"name": "folder:" + root, "split": "train", "limit": None,
                                 "image_size": None, "per_class": None, "data_dir": None,
                                 "transform": {"mode": "center_crop", "size": 24, "resize_size": 24}})
pool = data_lib.stream.open_pool(cfg, 0)
views = steal.Views(pool, config, 16, distributed.data_mesh())
api = steal.new_api(victim, config)
api.register("a")
api.register("b")
idx = np.random.default_rng(0).permutation(len(pool))
reps, buckets, sigma = [], [], []
for epoch in (0, 1):   # the charged pass (centre crops), then a re-query epoch (RandomResizedCrop+flip)
  for batch in views.batches(idx, epoch, 4):   # 12 images: batches of 4 (sharded on 2 devices)
    users = ["a", "b", "a", "b"][:len(batch)]
    r = api.query_mixed(users, batch)
    reps.append(r.reps); buckets.append(r.buckets); sigma.append(r.sigma)
emb, labels = embeddings.embed_split(victim, "folder:" + root, "train",
                                     transform=data_lib.Transform("center_crop", 16), batch_size=6)
held_out = steal.EvalSet(pool, views.query_transform, 0, 6).embed(victim)
np.savez(out, reps=np.concatenate(reps), buckets=np.concatenate(buckets), sigma=np.concatenate(sigma),
         emb=emb, labels=labels, held_out=held_out, coverage=np.asarray([api.coverage("a"),
                                                                          api.coverage("b")]))
"""


def test_query_phase_and_embedding_data_parallel_equal_one_device(tree, tmp_path):
  """The API's query batches (sharded over the local devices) and the evaluation embeddings, on 2
  virtual devices in a subprocess, against the same on 1 device."""
  import subprocess
  import sys
  from flax import nnx
  from b4b_jax import models
  victim_dir = str(tmp_path / "victim")
  models.save_encoder(victim_dir, models.create_resnet("resnet18_w0.125", rngs=nnx.Rngs(7),
                                                       small_input=True),
                      {"preprocessing": models.default_preprocessing(16, resize=None)})
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = {}
  for n in (1, 2):  # both at once
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="2")
    out = str(tmp_path / f"run{n}.npz")
    procs[n] = (out, subprocess.Popen(
        [sys.executable, "-c", _DATA_PARALLEL_RUN, tree, victim_dir, out, str(n)], cwd=repo, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = {}
  for n, (out, proc) in procs.items():
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-3000:]
    outs[n] = dict(np.load(out))
  one, two = outs[1], outs[2]
  np.testing.assert_array_equal(one["buckets"], two["buckets"])
  np.testing.assert_array_equal(one["coverage"], two["coverage"])
  np.testing.assert_allclose(one["sigma"], two["sigma"], rtol=1e-6)
  np.testing.assert_allclose(one["reps"], two["reps"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(one["emb"], two["emb"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(one["labels"], two["labels"])
  np.testing.assert_allclose(one["held_out"], two["held_out"], rtol=1e-5, atol=1e-6)
  assert one["coverage"].min() > 0 and len(one["reps"]) == 24
