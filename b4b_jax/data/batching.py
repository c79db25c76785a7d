"""Batches for data-parallel training and evaluation on a ("data",) device mesh, single- or multi-host.

Each process produces its local slice (global_batch_size / process_count examples) of every global batch;
with `mesh=` the slices come back as global jax.Arrays sharded over the mesh
(b4b_jax.utils.distributed.global_batch). The global batch must divide by the mesh's device count.

Two kinds of input:
  arrays   (images, labels) or {"image", "label"} numpy arrays, the whole split on every process.
           Training draws a seeded permutation per epoch and cuts the global stream into global batches;
           process p takes its slice of each, so the global batches are the same for any process count.
           Example i's augmentation in epoch e uses example_seed(seed, e, i).
  tf.data  a Dataset of {"image", "label"} that is already this process's share (get_dataset with
           process_index/process_count). Training shuffles it with a seeded buffer; the k-th example of
           this process's stream is augmented with example_seed(seed, 1_000_000 + process_index, k).

Same seed -> same batches on every run. `start_step` resumes a run at a given step without replaying the
augmentations before it. Evaluation visits each example exactly once: the last batch is padded and
carries mask=False on padding rows (label -1, image zeros).
"""
import math
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import jax
import numpy as np

from b4b_jax.data import preprocess
from b4b_jax.data._tf import tf
from b4b_jax.data.sharding import resolve_process
from b4b_jax.utils import distributed

ArrayData = Union[Tuple[np.ndarray, np.ndarray], Dict[str, np.ndarray]]


def local_batch_size(global_batch_size: int, mesh: Optional[jax.sharding.Mesh] = None,
                     process_count: Optional[int] = None) -> int:
  """global_batch_size / process_count, after checking it divides by the devices and the processes."""
  if int(global_batch_size) != global_batch_size or global_batch_size < 1:
    raise ValueError(f"global batch size must be a positive integer, got {global_batch_size!r}")
  distributed.check_global_batch(int(global_batch_size), mesh if mesh is not None else
                                 distributed.data_mesh())
  _, process_count = resolve_process(0, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} does not divide by the {process_count} "
                     "processes")
  return int(global_batch_size) // process_count


def to_global(batch, mesh: jax.sharding.Mesh):
  """This process's local batch (dict of numpy arrays) -> global jax.Arrays sharded on `mesh`."""
  return distributed.global_batch(batch, mesh)


def _as_arrays(data) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  if isinstance(data, tf.data.Dataset):
    return None
  if isinstance(data, dict):
    data = (data["image"], data["label"])
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise ValueError("data must be (images, labels), {'image', 'label'} arrays, or a tf.data.Dataset")
  images, labels = np.asarray(data[0]), np.asarray(data[1])
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  if labels.shape != (len(images),):
    raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
  if len(images) == 0:
    raise ValueError("no examples: the arrays are empty")
  return images, labels.astype(np.int32)


def _example_fn(transform):
  """(seed tensor, image, label) -> {"image", "label"} with the transform applied (uint8 RGB)."""
  def fn(seed, image, label):
    image = transform(image, seed) if transform is not None else preprocess.to_rgb(image)
    return {"image": image, "label": tf.cast(label, tf.int32)}
  return fn


def _check_fixed_size(ds: tf.data.Dataset, transform) -> None:
  if transform is None and not ds.element_spec["image"].shape.is_fully_defined():
    raise ValueError("images of this dataset differ in size: pass a transform (e.g. "
                     "Transform('resize', 224) or the preset 'steal_crop')")


def _numpy_batches(ds: tf.data.Dataset, mesh, process_count) -> Iterator[Dict[str, Any]]:
  if mesh is not None and process_count != jax.process_count():
    raise ValueError(f"mesh= assembles global arrays across the {jax.process_count()} real processes; "
                     f"process_count={process_count} differs (drop mesh= to get local batches)")
  try:
    for batch in ds.as_numpy_iterator():
      yield to_global(batch, mesh) if mesh is not None else batch
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f"reading a batch failed: {e.message}. For class folders, "
                     "b4b_jax.data.check_images(list_folder(root, split).paths) names undecodable "
                     "files.") from None


def train_batches(data, *, global_batch_size: int, seed: int = 0, transform: Any = None,
                  mesh: Optional[jax.sharding.Mesh] = None, num_epochs: Optional[int] = None,
                  start_step: int = 0, shuffle_buffer: int = 10_000,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  prefetch: int = 2) -> Iterator[Dict[str, Any]]:
  """Shuffled, augmented training batches: {"image": uint8 [B, S, S, 3], "label": int32 [B]}.

  B = global_batch_size / process_count (local numpy arrays), or global jax.Arrays with `mesh`.
  num_epochs: None repeats forever (steps-based training, the safe choice for multi-host tf.data input
  whose shares can differ by one example); arrays end after the last full global batch.
  """
  process_index, process_count = resolve_process(process_index, process_count)
  local_bs = local_batch_size(global_batch_size, mesh, process_count)
  transform = preprocess.make_transform(transform)
  if int(start_step) != start_step or start_step < 0:
    raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
  if num_epochs is not None and (int(num_epochs) != num_epochs or num_epochs < 1):
    raise ValueError(f"num_epochs must be None or a positive integer, got {num_epochs!r}")
  arrays = _as_arrays(data)
  example = _example_fn(transform)
  if arrays is not None:
    images, labels = arrays
    n, g = len(images), int(global_batch_size)

    def epoch_order(epoch):  # a seeded permutation of 0..n-1 (64-bit keys: ties are negligible)
      keys = tf.random.stateless_uniform([n], preprocess.example_seed(seed, epoch, -1), minval=None,
                                         maxval=None, dtype=tf.int64)
      order = tf.argsort(keys, stable=True)
      return tf.data.Dataset.from_tensor_slices(
          (tf.fill([n], epoch), tf.cast(order, tf.int64)))

    epochs = (tf.data.Dataset.counter() if num_epochs is None
              else tf.data.Dataset.range(int(num_epochs)))
    stream = epochs.flat_map(epoch_order)  # (epoch, index) of the global stream, in order
    if num_epochs is not None:
      stream = stream.take((n * int(num_epochs) // g) * g)  # whole global batches only
    lo, hi = process_index * local_bs, (process_index + 1) * local_bs
    stream = stream.skip(int(start_step) * g).enumerate().filter(
        lambda k, ei: tf.logical_and(k % g >= lo, k % g < hi))
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    ds = stream.map(
        lambda k, ei: example(preprocess.example_seed(seed, ei[0], ei[1]),
                              tf.gather(images_t, ei[1]), tf.gather(labels_t, ei[1])),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    _check_fixed_size(data, transform)
    ds = data.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs).skip(int(start_step) * local_bs).enumerate(int(start_step) * local_bs)
    stream_id = 1_000_000 + process_index
    ds = ds.map(lambda k, ex: example(preprocess.example_seed(seed, stream_id, k), ex["image"],
                                      ex["label"]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_bs, drop_remainder=True).prefetch(prefetch)
  return _numpy_batches(ds, mesh, process_count)


def eval_batches(data, *, global_batch_size: int, transform: Any = None,
                 mesh: Optional[jax.sharding.Mesh] = None, seed: int = 0,
                 num_batches: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[Dict[str, Any]]:
  """Every example exactly once, in order, in padded batches {"image", "label", "mask"} (+ "index", the
  example's position, for array input; -1 on padding).

  Arrays: global batch b holds examples [b*G, (b+1)*G), so concatenating the global batches (mask
  applied) gives the split in its original order; all processes yield ceil(N / G) batches.
  tf.data (this process's share): ceil(local count / B) batches; with several processes pass
  num_batches (the same on all processes, >= the largest share / B) or let it be agreed across the real
  JAX processes.
  """
  process_index, process_count = resolve_process(process_index, process_count)
  local_bs = local_batch_size(global_batch_size, mesh, process_count)
  transform = preprocess.make_transform(transform)
  example = _example_fn(transform)
  arrays = _as_arrays(data)
  if arrays is not None:
    images, labels = arrays
    n, g = len(images), int(global_batch_size)
    nb = math.ceil(n / g) if num_batches is None else int(num_batches)
    if nb * g < n:
      raise ValueError(f"num_batches={nb} of {g} cannot hold the {n} examples")
    pos = (np.arange(nb)[:, None] * g + process_index * local_bs + np.arange(local_bs)[None]).reshape(-1)
    mask = pos < n
    images_t, labels_t = tf.constant(images), tf.constant(labels)

    def fn(p, m):
      i = tf.where(m, p, 0)
      ex = example(preprocess.example_seed(seed, 0, i), tf.gather(images_t, i), tf.gather(labels_t, i))
      return _pad_row(ex, m, index=tf.where(m, tf.cast(p, tf.int32), -1))
    ds = tf.data.Dataset.from_tensor_slices((pos.astype(np.int64), mask)).map(
        fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    _check_fixed_size(data, transform)
    count = int(data.cardinality())
    if count < 0:
      raise ValueError("the dataset's size is unknown (cardinality); pass num_batches")
    nb = num_batches
    if nb is None:
      nb = math.ceil(count / local_bs)
      if process_count > 1:
        if process_count != jax.process_count():
          raise ValueError(f"process_count={process_count} is simulated: pass num_batches, the same "
                           "for every process")
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        nb = int(np.max(multihost_utils.process_allgather(np.asarray(nb))))
    if count > nb * local_bs:
      raise ValueError(f"num_batches={nb} of {local_bs} cannot hold this process's {count} examples")
    real = data.enumerate().map(
        lambda k, ex: _pad_row(example(preprocess.example_seed(seed, 0, k), ex["image"], ex["label"]),
                               tf.constant(True)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    blank = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), real.element_spec)
    blank["label"] = tf.constant(-1, tf.int32)
    blank["mask"] = tf.constant(False)
    ds = real.concatenate(tf.data.Dataset.from_tensors(blank).repeat()).take(nb * local_bs)
  ds = ds.batch(local_bs, drop_remainder=True).prefetch(2)
  return _numpy_batches(ds, mesh, process_count)


def _pad_row(ex, mask, index=None):
  ex = dict(ex)
  ex["image"] = tf.where(mask, ex["image"], tf.zeros_like(ex["image"]))
  ex["label"] = tf.where(mask, ex["label"], -1)
  ex["mask"] = mask
  if index is not None:
    ex["index"] = index
  return ex
