"""ImageNet-style class folders: `root/<split>/<class>/<image>` (e.g. ImageNet-100 with train/ and val/).

Labels are the indices of the sorted class names of `root/train` (or of the split itself when there is
no train/), so train and val agree on labels even when a val class is missing (the original code listed
each split separately and could mismatch them). `per_class=N` keeps a seeded choice of N images per
class, like the paper's 100-images-per-class ImageNet subset.

Files are checked when listed (non-empty, an image signature), so a stray or broken file is reported by
path before any training starts; images whose body is corrupt are found by `check_images`.
"""
import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from b4b_jax.data._tf import tf
from b4b_jax.data.sharding import shard_bounds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """The files of one split: paths[i] has label labels[i] (an index into class_names)."""
  root: str
  split: str
  paths: np.ndarray  # str [N]
  labels: np.ndarray  # int32 [N]
  class_names: Tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)


def _subdirs(path: str) -> List[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def class_names(root: str, split: str = "train") -> Tuple[str, ...]:
  """Sorted class folder names of root/train (or of root/<split> if there is no train/)."""
  base = os.path.join(root, "train")
  if not os.path.isdir(base):
    base = os.path.join(root, split)
  if not os.path.isdir(base):
    raise FileNotFoundError(f"no class folders: neither {os.path.join(root, 'train')} nor {base} exists")
  names = _subdirs(base)
  if not names:
    raise ValueError(f"no class folders in {base} (expected {base}/<class>/<images>)")
  return tuple(names)


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _check_signature(path: str) -> None:
  with open(path, "rb") as f:
    head = f.read(12)
  if not head:
    raise ValueError(f"empty image file: {path}")
  if not (head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
    raise ValueError(f"not a JPEG/PNG/GIF/BMP/WebP image (undecodable file): {path}")


def list_folder(root: str, split: str, *, per_class: Optional[int] = None, seed: int = 0,
                check_files: bool = True) -> FolderSplit:
  """Lists root/<split>/<class>/* (sorted), optionally N seeded images per class."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder root does not exist: {root}")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise ValueError(f"image folder {root} has no split {split!r} (no directory {split_dir}); "
                     f"its splits are {_subdirs(root)}")
  names = class_names(root, split)
  present = _subdirs(split_dir)
  loose = sorted(f for f in os.listdir(split_dir)
                 if _is_image_name(f) and os.path.isfile(os.path.join(split_dir, f)))
  if loose:
    # E.g. ImageNet's val/ as distributed: 50k files in one folder. Their labels are unknown here.
    raise ValueError(f"split {split!r} is not sorted into class folders: {split_dir} holds {len(loose)} "
                     f"image file(s) directly (e.g. {os.path.join(split_dir, loose[0])}); move each "
                     f"image into {split_dir}/<class>/ (for ImageNet's val/, with the labels of its "
                     "devkit), with the class folder names of "
                     f"{os.path.join(root, 'train') if os.path.isdir(os.path.join(root, 'train')) else split_dir}")
  extra = sorted(set(present) - set(names))
  if extra:
    raise ValueError(f"{split_dir} has class folders that {os.path.join(root, 'train')} lacks: {extra}")
  if per_class is not None and (int(per_class) != per_class or per_class < 1):
    raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
  paths, labels = [], []
  for label, name in enumerate(names):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      logging.warning("class %r has no folder in split %r (%s)", name, split, class_dir)
      continue
    files = sorted(f for f in os.listdir(class_dir)
                   if _is_image_name(f) and os.path.isfile(os.path.join(class_dir, f)))
    if not files:
      raise ValueError(f"empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files): {class_dir}")
    if per_class is not None:
      if len(files) < per_class:
        logging.warning("class folder %s has %d images < per_class=%d: taking all", class_dir,
                        len(files), per_class)
      else:
        rng = np.random.default_rng([seed, label])
        files = [files[i] for i in sorted(rng.choice(len(files), int(per_class), replace=False))]
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([label] * len(files))
  if check_files:
    for p in paths:
      _check_signature(p)
  return FolderSplit(root, split, np.asarray(paths, dtype=str), np.asarray(labels, np.int32), names)


def check_images(paths: Sequence[str]) -> None:
  """Decodes every file fully (PIL); raises ValueError naming the undecodable ones."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  bad = []
  for p in paths:
    try:
      with Image.open(p) as im:
        im.load()
    except Exception as e:  # pylint: disable=broad-except  (any decoder failure means a bad file)
      bad.append(f"{p} ({type(e).__name__}: {e})")
  if bad:
    raise ValueError(f"{len(bad)} undecodable image file(s): " + "; ".join(bad[:10]))


def decode_image(path: tf.Tensor) -> tf.Tensor:
  """File -> uint8 [H, W, 3] (grayscale and RGBA converted; first frame of a GIF).

  TensorFlow's decode errors do not say which file failed: consumers iterate with `iterate_named`."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def folder_dataset(files: FolderSplit, *, process_index: int = 0, process_count: int = 1,
                   shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
  """{"image": uint8 [H, W, 3], "label": int32} for this process's contiguous share of the files.

  shuffle_files permutes the file list (seeded, identically on every process) before it is split, so
  each process's share mixes all classes.
  """
  order = np.arange(len(files))
  if shuffle_files:
    order = np.random.default_rng(seed).permutation(len(files))
  start, stop = shard_bounds(len(files), process_index, process_count)
  order = order[start:stop]
  ds = tf.data.Dataset.from_tensor_slices((files.paths[order], files.labels[order]))
  return ds.map(lambda p, y: {"image": decode_image(p), "label": y},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)



def iterate_checked(ds: tf.data.Dataset, on_error):
  """Iterates ds.as_numpy_iterator(); a TensorFlow error while producing item k is replaced by the
  exception `on_error(error, k)` returns (TF's decode errors do not name the file)."""
  it = ds.as_numpy_iterator()
  done = 0
  while True:
    try:
      item = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise on_error(e, done) from None
    done += 1
    yield item


def iterate_named(ds: tf.data.Dataset, paths: Sequence[str]):
  """iterate_checked whose errors name the undecodable file(s) among `paths` (the files the dataset
  reads), found by decoding them with PIL."""

  def named(error, _):
    check_images(paths)  # raises, naming the files
    return ValueError(f"reading image files failed ({error.message}); every file decodes with PIL, so "
                      "the failure is elsewhere in the pipeline")
  return iterate_checked(ds, named)
