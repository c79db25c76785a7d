"""Sharded, seeded batching: reproducible order, process shards, resume, eval padding, global arrays."""
import jax
import numpy as np
import pytest

from b4b_jax.data import Transform, eval_batches, train_batches
from b4b_jax.data._tf import tf
from b4b_jax.utils import distributed


def _arrays(n, size=6):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256  # identify examples from the pixels too
  return images, np.arange(n, dtype=np.int32)


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_train_order_is_seeded_and_epochs_are_permutations():
  data = _arrays(40)
  a = _take(train_batches(data, global_batch_size=8, seed=3), 10)
  b = _take(train_batches(data, global_batch_size=8, seed=3), 10)
  c = _take(train_batches(data, global_batch_size=8, seed=4), 10)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])
  labels = np.concatenate([x["label"] for x in a])
  assert not np.array_equal(labels, np.concatenate([x["label"] for x in c]))
  # Each epoch (5 batches of 8) is a permutation of the 40 examples, reshuffled between epochs.
  assert sorted(labels[:40]) == list(range(40)) == sorted(labels[40:])
  assert not np.array_equal(labels[:40], labels[40:])
  np.testing.assert_array_equal(a[0]["image"], data[0][a[0]["label"]])  # images follow their labels
  assert a[0]["image"].dtype == np.uint8 and a[0]["label"].dtype == np.int32


def test_finite_epochs_end_after_whole_global_batches():
  batches = list(train_batches(_arrays(21), global_batch_size=8, seed=0, num_epochs=2))
  assert len(batches) == 5  # 42 examples -> 5 full batches of 8


def test_process_shards_form_the_single_process_global_batches():
  data = _arrays(32)  # two global batches per epoch: a step never mixes epochs
  single = _take(train_batches(data, global_batch_size=16, seed=1), 4)
  parts = [_take(train_batches(data, global_batch_size=16, seed=1, process_index=p, process_count=2), 4)
           for p in range(2)]
  for step in range(4):
    l0, l1 = parts[0][step]["label"], parts[1][step]["label"]
    assert len(l0) == len(l1) == 8 and not set(l0) & set(l1)
    np.testing.assert_array_equal(np.concatenate([l0, l1]), single[step]["label"])


def test_start_step_resumes_with_the_same_augmentations():
  data = _arrays(24, size=10)
  t = Transform("random_resized_crop", 6, flip=True)
  full = _take(train_batches(data, global_batch_size=8, seed=2, transform=t), 5)
  resumed = _take(train_batches(data, global_batch_size=8, seed=2, transform=t, start_step=3), 2)
  for x, y in zip(full[3:], resumed):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])
  assert full[0]["image"].shape == (8, 6, 6, 3)


def test_global_batch_must_divide_by_devices_and_processes():
  data = _arrays(16)
  assert jax.device_count() == 8
  with pytest.raises(ValueError, match="does not divide by the 8 devices"):
    train_batches(data, global_batch_size=12)
  with pytest.raises(ValueError, match="does not divide by the 3 processes"):
    eval_batches(data, global_batch_size=8, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="positive integer"):
    train_batches(data, global_batch_size=0)
  with pytest.raises(ValueError, match="process_index"):
    train_batches(data, global_batch_size=8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="uint8"):
    train_batches((data[0].astype(np.float32), data[1]), global_batch_size=8)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_exactly_once(process_count):
  data = _arrays(21)
  per_process = [list(eval_batches(data, global_batch_size=8, process_index=p,
                                   process_count=process_count)) for p in range(process_count)]
  assert {len(b) for b in per_process} == {3}  # ceil(21 / 8) batches on every process
  seen = []
  for step in range(3):  # global batch = the processes' local batches side by side
    batch = {k: np.concatenate([per_process[p][step][k] for p in range(process_count)])
             for k in ("label", "mask", "index", "image")}
    assert batch["image"].shape == (8, 6, 6, 3)
    seen.extend(batch["label"][batch["mask"]])
    assert (batch["label"][~batch["mask"]] == -1).all() and (batch["image"][~batch["mask"]] == 0).all()
    np.testing.assert_array_equal(batch["index"][batch["mask"]], batch["label"][batch["mask"]])
  assert seen == list(range(21))  # each once, in the original order


def test_eval_on_a_dataset_pads_and_masks():
  images, labels = _arrays(13)
  ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  batches = list(eval_batches(ds, global_batch_size=8, transform=Transform("resize", 4)))
  assert len(batches) == 2
  mask = np.concatenate([b["mask"] for b in batches])
  got = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(got, labels)
  assert mask.sum() == 13 and batches[0]["image"].shape == (8, 4, 4, 3)
  with pytest.raises(ValueError, match="pass num_batches"):
    eval_batches(ds, global_batch_size=8, process_index=0, process_count=2)


def test_train_on_a_dataset_is_seeded():
  images, labels = _arrays(20)
  ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  t = Transform("random_resized_crop", 4, flip=True)
  a = _take(train_batches(ds, global_batch_size=8, seed=5, transform=t, shuffle_buffer=20), 5)
  b = _take(train_batches(ds, global_batch_size=8, seed=5, transform=t, shuffle_buffer=20), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])
  labels_seen = np.concatenate([x["label"] for x in a])
  assert sorted(labels_seen[:20]) == list(range(20))  # first epoch: each example once
  assert not np.array_equal(labels_seen[:20], np.arange(20))  # shuffled
  resumed = next(train_batches(ds, global_batch_size=8, seed=5, transform=t, shuffle_buffer=20,
                               start_step=3))
  np.testing.assert_array_equal(resumed["image"], a[3]["image"])
  ragged = tf.data.Dataset.from_generator(
      lambda: iter([{"image": np.zeros((4, 5, 3), np.uint8), "label": 0}]),
      output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8),
                        "label": tf.TensorSpec([], tf.int32)})
  with pytest.raises(ValueError, match="differ in size: pass a transform"):
    train_batches(ragged, global_batch_size=8)


def test_mesh_gives_global_sharded_arrays():
  mesh = distributed.data_mesh()
  data = _arrays(16)
  batch = next(train_batches(data, global_batch_size=16, seed=0, mesh=mesh))
  assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (16, 6, 6, 3)
  assert len(batch["image"].sharding.device_set) == 8
  ev = list(eval_batches(data, global_batch_size=16, mesh=mesh))
  assert len(ev) == 1 and bool(ev[0]["mask"].all())
  with pytest.raises(ValueError, match="simulated|real processes"):
    next(train_batches(data, global_batch_size=16, mesh=mesh, process_index=0, process_count=2))
