"""Real image data that ships with scikit-learn, so the embedded default runs with no network.

digits          the 1,797 8x8 handwritten digits (10 classes), as RGB at any size; a fixed stratified
                train/test split (25 % test) that no config seed changes, so test images never leak.
sklearn_photos  random crops of the two natural photos bundled with scikit-learn (china.jpg, flower.jpg):
                random size, position and aspect (RandomResizedCrop's sampler), optional flip, resized to
                `image_size`. Unlabelled (label -1). Each split is its own seeded stream of crops:
                "train" (e.g. the victim's training data), "query" (the attackers' queries) and "test";
                crops of different splits are different draws from the same two photos, the way the
                paper's victim and thieves both draw from ImageNet.
"""
import functools
from typing import Optional, Sequence, Tuple

import numpy as np

from b4b_jax.data import preprocess
from b4b_jax.data._tf import tf

DIGITS_SPLITS = ("train", "test")
DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0  # fixed on purpose: the split must not move with experiment seeds

PHOTO_SPLITS = ("train", "query", "test")
PHOTO_DEFAULT_SIZE = 32
PHOTO_DEFAULT_COUNT = {"train": 2048, "query": 2048, "test": 512}


def _check_split(name: str, split: str, splits: Sequence[str]) -> None:
  if split not in splits:
    raise ValueError(f"dataset {name!r} has no split {split!r}; its splits are {list(splits)}")


def digits_split_indices(split: str) -> np.ndarray:
  """Indices into sklearn's digits for `split`: stratified, shuffled, fixed (seed 0)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  _check_split("digits", split, DIGITS_SPLITS)
  target = load_digits().target
  rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
  train, test = [], []
  for c in np.unique(target):
    idx = rng.permutation(np.flatnonzero(target == c))
    n_test = int(round(DIGITS_TEST_FRACTION * len(idx)))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  chosen = np.concatenate(train if split == "train" else test)
  return rng.permutation(chosen)  # mixed classes, so a prefix (`limit`) is class-balanced on average


def load_digits_arrays(split: str, *, image_size: Optional[int] = None, limit: Optional[int] = None,
                       method: str = "bilinear") -> Tuple[np.ndarray, np.ndarray]:
  """Digits as uint8 RGB [N, S, S, 3] (S = image_size, default the native 8) and int32 labels 0..9."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  idx = digits_split_indices(split)
  if limit is not None:
    idx = idx[:check_limit(limit)]
  data = load_digits()
  # Pixel values are 0..16 ink levels; spread them over 0..255.
  gray = np.round(data.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  images = np.repeat(gray, 3, axis=-1)
  if image_size is not None and tuple(preprocess.size_hw(image_size)) != images.shape[1:3]:
    images = preprocess.resize(images, image_size, method).numpy() if len(images) else np.zeros(
        (0, *preprocess.size_hw(image_size), 3), np.uint8)
  return images, data.target[idx].astype(np.int32)


def sample_photos() -> np.ndarray:
  """The two photos bundled with scikit-learn, uint8 [2, 427, 640, 3] (china, flower)."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  return np.stack(load_sample_images().images).astype(np.uint8)


def load_photo_crops(split: str, *, image_size: Optional[int] = None, limit: Optional[int] = None,
                     seed: int = 0, scale: Tuple[float, float] = (0.02, 0.5),
                     ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                     method: str = "bilinear") -> Tuple[np.ndarray, np.ndarray]:
  """`limit` crops (default PHOTO_DEFAULT_COUNT[split]) -> uint8 [N, S, S, 3] and labels all -1.

  Crop k of a split alternates between the two photos (k even: china, odd: flower) and draws its box and
  flip from example_seed(seed, split id, k): same seed and split -> the same crops; another split or
  seed -> other crops.
  """
  _check_split("sklearn_photos", split, PHOTO_SPLITS)
  n = PHOTO_DEFAULT_COUNT[split] if limit is None else check_limit(limit)
  size = PHOTO_DEFAULT_SIZE if image_size is None else image_size
  args = (split, n, size if isinstance(size, int) else tuple(size), int(seed), tuple(scale),
          tuple(ratio), bool(flip), method)
  h, w = preprocess.size_hw(size)
  labels = np.full((n,), -1, np.int32)
  if n * h * w * 3 > _KEPT_CROPS_BYTES:
    return _photo_crops(*args), labels
  return _photo_crops_kept(*args).copy(), labels


# Crop sets of at most this many bytes are made once per process: the demo's three attacks open the
# same 2048-crop pool (~1-1.5 s to crop on the 2-core CPU) and the tests draw the same sets again.
_KEPT_CROPS_BYTES = 64 << 20


def _photo_crops(split, n, size, seed, scale, ratio, flip, method) -> np.ndarray:
  transform = preprocess.Transform("random_resized_crop", size, scale=scale, ratio=ratio, flip=flip,
                                   method=method)
  photos = tf.constant(sample_photos())
  split_id = 1000 + PHOTO_SPLITS.index(split)
  ds = tf.data.Dataset.range(n).map(
      lambda k: transform(tf.gather(photos, k % 2), preprocess.example_seed(seed, split_id, k)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  chunks = list(ds.batch(256).as_numpy_iterator())
  return np.concatenate(chunks) if chunks else np.zeros((0, *preprocess.size_hw(size), 3), np.uint8)


_photo_crops_kept = functools.lru_cache(maxsize=8)(_photo_crops)  # callers get copies


def check_limit(limit) -> int:
  if int(limit) != limit or limit < 0:
    raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
  return int(limit)
