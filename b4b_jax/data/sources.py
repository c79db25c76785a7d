"""Datasets by name: `load_arrays` (small/medium sets in memory) and `get_dataset` (tf.data streams).

Names:
  "digits", "sklearn_photos"   bundled with scikit-learn (offline; see bundled.py)
  "folder:<root>"              ImageNet-style class folders root/<split>/<class>/* (or name "folder"
                               with data_dir=<root>); option per_class=N
  anything else                a TFDS image-classification dataset ("cifar10", "stl10", "svhn_cropped",
                               "fashion_mnist", ...), read from data_dir without downloading
Every example is {"image": uint8 [H, W, 3], "label": int32}; grayscale is tiled to RGB, unlabelled
examples have label -1.
"""
from typing import Any, Optional, Tuple

import numpy as np

from b4b_jax.data import bundled
from b4b_jax.data import folders
from b4b_jax.data import preprocess
from b4b_jax.data import tfds_source
from b4b_jax.data._tf import tf
from b4b_jax.data.sharding import resolve_process, shard_bounds
from b4b_jax.utils.progress import Progress

BUNDLED = ("digits", "sklearn_photos")
FOLDER_PREFIX = "folder:"


def parse_name(name: str, data_dir: Optional[str] = None) -> Tuple[str, str]:
  """-> (kind, target): ("bundled", name) | ("folder", root) | ("tfds", tfds_name)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
  if name in BUNDLED:
    return "bundled", name
  if name.startswith(FOLDER_PREFIX):
    root = name[len(FOLDER_PREFIX):]
    if not root:
      raise ValueError("'folder:' needs a root directory, e.g. 'folder:/data/imagenet100'")
    return "folder", root
  if name == "folder":
    if data_dir is None:
      raise ValueError("dataset 'folder' needs data_dir=<root of the class folders>")
    return "folder", data_dir
  if name.startswith("tfds:"):
    name = name[len("tfds:"):]
  return "tfds", name


def load_arrays(name: str, split: str, *, data_dir: Optional[str] = None, limit: Optional[int] = None,
                image_size: Optional[int] = None, seed: int = 0, transform: Any = None,
                method: str = "bilinear", per_class: Optional[int] = None, **source_options
                ) -> Tuple[np.ndarray, np.ndarray]:
  """A whole split in memory: (uint8 images [N, H, W, 3], int32 labels [N]), in a fixed order.

  limit: keep the first `limit` examples (sklearn_photos: the number of crops to draw).
  image_size: resize every image to image_size x image_size (bilinear+antialias, or `method`); needed
    for sources whose images differ in size unless `transform` (a preprocess.Transform / preset / dict)
    is given. Random transforms draw from example_seed(seed, 0, i) for example i.
  seed: drives the source's own random choices (sklearn_photos crops, folder per_class subsets); the
    digits split is fixed and ignores it.
  source_options: sklearn_photos' scale, ratio, flip.
  """
  kind, target = parse_name(name, data_dir)
  if kind == "bundled":
    if per_class is not None:
      raise ValueError(f"{name!r} has no per_class option (it is for class folders)")
    if target == "digits":
      if source_options:
        raise ValueError(f"unknown options for 'digits': {sorted(source_options)}")
      images, labels = bundled.load_digits_arrays(split, image_size=image_size, limit=limit,
                                                  method=method)
    else:
      images, labels = bundled.load_photo_crops(split, image_size=image_size, limit=limit, seed=seed,
                                                method=method, **source_options)
    if transform is not None:
      images = preprocess.apply_transform(images, transform, seed=seed)
    return images, labels
  if source_options:
    raise ValueError(f"unknown options for {name!r}: {sorted(source_options)}")
  if transform is None and image_size is not None:
    transform = preprocess.Transform("resize", image_size, method=method)
  transform = preprocess.make_transform(transform)
  files = None
  if kind == "folder":
    files = folders.list_folder(target, split, per_class=per_class, seed=seed)
    ds = folders.folder_dataset(files)
  else:
    if per_class is not None:
      raise ValueError("per_class is only supported for class folders")
    ds = tfds_source.tfds_dataset(target, split, data_dir=data_dir)
  if limit is not None:
    ds = ds.take(bundled.check_limit(limit))
  if transform is not None:
    ds = ds.enumerate().map(
        lambda i, ex: {"image": transform(ex["image"], preprocess.example_seed(seed, 0, i)),
                       "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  count = int(ds.cardinality())
  progress = Progress(f"load {name}/{split}", max(count, 0), unit="image")
  try:
    images, labels = [], []
    for batch in ds.batch(256).as_numpy_iterator():
      images.append(batch["image"])
      labels.append(batch["label"])
      progress.update(sum(len(x) for x in labels))
  except tf.errors.InvalidArgumentError as e:
    if files is not None:  # name the undecodable file(s)
      folders.check_images(files.paths if limit is None else files.paths[:limit])
    if "same size" in str(e) or "Cannot batch" in str(e) or "Cannot add tensor" in str(e):
      raise ValueError(f"images of {name!r} differ in size: pass image_size= or transform=") from None
    raise ValueError(f"reading {name!r} split {split!r} failed: {e.message}") from None
  if not images:
    first = transform.output_size if transform is not None else (0, 0)
    return np.zeros((0, *first, 3), np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def get_dataset(name: str, split: str, *, data_dir: Optional[str] = None,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                shuffle_files: bool = False, seed: int = 0, per_class: Optional[int] = None,
                **array_options) -> tf.data.Dataset:
  """tf.data.Dataset of {"image": uint8 [H, W, 3], "label": int32}: this process's share of the split.

  Processes get disjoint contiguous shares that together cover the split (process_index/process_count
  default to JAX's). shuffle_files: TFDS file order / the folder file list, seeded; example order within
  a share is otherwise fixed. Bundled sources are loaded with load_arrays
  (array_options: image_size, limit, ...) and served from memory.
  """
  process_index, process_count = resolve_process(process_index, process_count)
  kind, target = parse_name(name, data_dir)
  if kind == "bundled":
    images, labels = load_arrays(name, split, seed=seed, **array_options)
    start, stop = shard_bounds(len(images), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({"image": images[start:stop], "label": labels[start:stop]})
  if array_options:
    raise ValueError(f"unknown options for {name!r}: {sorted(array_options)}")
  if kind == "folder":
    files = folders.list_folder(target, split, per_class=per_class, seed=seed)
    return folders.folder_dataset(files, process_index=process_index, process_count=process_count,
                                  shuffle_files=shuffle_files, seed=seed)
  if per_class is not None:
    raise ValueError("per_class is only supported for class folders")
  return tfds_source.tfds_dataset(target, split, data_dir=data_dir, process_index=process_index,
                                  process_count=process_count, shuffle_files=shuffle_files, seed=seed)
