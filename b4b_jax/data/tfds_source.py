"""TFDS image-classification datasets by name (cifar10, stl10, svhn_cropped, fashion_mnist, any other).

Never downloads: the data must already be prepared in `data_dir` (or TFDS's default directory), e.g. by
`tfds build cifar10 --data_dir DIR` on a machine with network (docs/data.md). Each process reads its own
even share of the split (tfds.split_for_jax_process). Split sizes are never read from `info.splits`
(unavailable under tfds.testing.mock_data); the split names are checked against it when it has them.
"""
import os
import re
from typing import Optional, Tuple

from b4b_jax.data import preprocess
from b4b_jax.data._tf import tf

# Convenience spellings -> TFDS names and split names.
NAME_ALIASES = {"svhn": "svhn_cropped", "fmnist": "fashion_mnist", "fashion-mnist": "fashion_mnist"}
SPLIT_ALIASES = {"stl10": {"unlabeled": "unlabelled"}}


def _tfds():
  # Imported on first use: the bundled sources and folders do not pay TFDS's import time.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def builder(name: str, data_dir: Optional[str] = None):
  """The TFDS builder of `name` reading from data_dir (None: TFDS's default); never downloads."""
  tfds = _tfds()
  name = NAME_ALIASES.get(name, name)
  if data_dir is not None and not os.path.isdir(os.fspath(data_dir)):
    raise FileNotFoundError(f"TFDS data_dir does not exist: {data_dir} (dataset {name!r})")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown dataset {name!r}: not a bundled source (digits, sklearn_photos), not "
                     "'folder:<root>', and not a TFDS dataset name") from None


def image_label_keys(info) -> Tuple[str, Optional[str]]:
  """The image feature and the label feature (None if the dataset has no labels)."""
  tfds = _tfds()
  image_key, label_key = "image", "label"
  if info.supervised_keys and len(info.supervised_keys) == 2 and all(
      isinstance(k, str) for k in info.supervised_keys):
    image_key, label_key = info.supervised_keys
  features = info.features
  if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
    raise ValueError(f"dataset {info.name!r} is not an image classification dataset: no image feature "
                     f"{image_key!r} (features: {sorted(features.keys())})")
  return image_key, (label_key if label_key in features else None)


def _split_names(split: str):
  # "train[:10%]+test" -> ["train", "test"]
  return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


def tfds_dataset(name: str, split: str, *, data_dir: Optional[str] = None, process_index: int = 0,
                 process_count: int = 1, shuffle_files: bool = False, seed: int = 0
                 ) -> tf.data.Dataset:
  """{"image": uint8 [H, W, 3], "label": int32 (-1 if unlabelled)} for this process's share."""
  tfds = _tfds()
  b = builder(name, data_dir)
  split = SPLIT_ALIASES.get(b.name, {}).get(split, split)
  known = list(b.info.splits.keys())  # empty when the data is mocked or not prepared
  if known:
    missing = [s for s in _split_names(split) if s not in known]
    if missing:
      raise ValueError(f"dataset {b.name!r} has no split {missing[0]!r}; its splits are {known}")
  image_key, label_key = image_label_keys(b.info)
  if process_count > 1:
    split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
  read_config = tfds.ReadConfig(shuffle_seed=seed)
  try:
    ds = b.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
  except AssertionError as e:  # TFDS's "could not find data in ..." for an unprepared dataset
    raise FileNotFoundError(
        f"TFDS dataset {b.name!r} is not prepared in data_dir {b.data_dir_root}: build it on a machine "
        f"with network (`tfds build {b.name} --data_dir DIR`, see docs/data.md) and pass that DIR as "
        f"data_dir. ({e})") from None
  except ValueError as e:
    if "split" in str(e).lower():
      raise ValueError(f"dataset {b.name!r}: bad split {split!r}: {e}") from None
    raise

  def to_example(ex):
    label = tf.cast(ex[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
    return {"image": preprocess.to_rgb(ex[image_key]), "label": label}

  return ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
