"""The offline sources bundled with scikit-learn: digits and random crops of the sample photos."""
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits, load_sample_images

from b4b_jax.data import bundled
from b4b_jax.data import load_arrays


def test_digits_native_pixels_and_fixed_stratified_split():
  train_x, train_y = load_arrays("digits", "train")
  test_x, test_y = load_arrays("digits", "test")
  assert train_x.shape == (1347, 8, 8, 3) and test_x.shape == (450, 8, 8, 3)
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
  assert set(np.unique(train_y)) == set(range(10)) == set(np.unique(test_y))
  # Every test class holds ~25 % of its images.
  counts = np.bincount(test_y, minlength=10) / np.bincount(load_digits().target)
  assert np.all(np.abs(counts - 0.25) < 0.01)
  # The split partitions sklearn's 1,797 images: match each of ours to a sklearn image exactly.
  ref = np.round(load_digits().images * 255 / 16).astype(np.uint8)
  ref_keys = {r.tobytes(): i for i, r in enumerate(ref)}
  ours = np.concatenate([train_x, test_x])[..., 0]
  assert np.array_equal(ours, np.concatenate([train_x, test_x])[..., 2])  # gray tiled to RGB
  matched = [ref_keys[o.tobytes()] for o in ours]
  assert len(set(matched)) == 1797 - (len(ref) - len(ref_keys))  # sklearn has a few duplicate images
  np.testing.assert_array_equal(np.concatenate([train_y, test_y]), load_digits().target[matched])
  # Fixed: the experiment seed does not move it; limit takes a prefix.
  x2, y2 = load_arrays("digits", "train", seed=5, limit=100)
  np.testing.assert_array_equal(x2, train_x[:100])
  np.testing.assert_array_equal(y2, train_y[:100])


def test_digits_resized():
  x, y = load_arrays("digits", "test", image_size=32, limit=20)
  assert x.shape == (20, 32, 32, 3) and y.shape == (20,)
  native, _ = load_arrays("digits", "test", limit=20)
  ref = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in native])
  assert np.abs(x.astype(int) - ref).max() <= 1
  with pytest.raises(ValueError, match="'digits' has no split 'val'"):
    load_arrays("digits", "val")


def test_sklearn_photos_shapes_determinism_and_streams():
  x, y = load_arrays("sklearn_photos", "train", limit=24, image_size=16, seed=0)
  assert x.shape == (24, 16, 16, 3) and x.dtype == np.uint8
  assert y.dtype == np.int32 and (y == -1).all()
  again, _ = load_arrays("sklearn_photos", "train", limit=24, image_size=16, seed=0)
  np.testing.assert_array_equal(x, again)
  query, _ = load_arrays("sklearn_photos", "query", limit=24, image_size=16, seed=0)
  other_seed, _ = load_arrays("sklearn_photos", "train", limit=24, image_size=16, seed=1)
  for other in (query, other_seed):  # different crops, none identical to a train crop
    same = (other[:, None] == x[None]).all(axis=(2, 3, 4))
    assert not same.any()
  assert len({im.tobytes() for im in x}) == 24  # diverse crops
  assert x.std() > 20
  with pytest.raises(ValueError, match="'sklearn_photos' has no split 'val'"):
    load_arrays("sklearn_photos", "val")
  with pytest.raises(ValueError, match="limit"):
    load_arrays("sklearn_photos", "train", limit=-1)


def test_sklearn_photos_kept_per_process_are_what_cropping_makes(monkeypatch):
  # Crop sets up to bundled._KEPT_CROPS_BYTES are made once per process; callers get copies.
  x, _ = load_arrays("sklearn_photos", "query", limit=24, image_size=16, seed=3)
  kept = x.copy()
  x[:] = 0
  again, _ = load_arrays("sklearn_photos", "query", limit=24, image_size=16, seed=3)
  np.testing.assert_array_equal(again, kept)
  monkeypatch.setattr(bundled, "_KEPT_CROPS_BYTES", 0)
  made, _ = load_arrays("sklearn_photos", "query", limit=24, image_size=16, seed=3)
  np.testing.assert_array_equal(made, kept)
  assert kept.std() > 20


def test_sklearn_photos_whole_photo_crop_is_the_resized_photo():
  # scale 1 with the photos' own aspect ratio: the "crop" is the whole photo, alternating china/flower.
  aspect = 640 / 427
  x, _ = load_arrays("sklearn_photos", "test", limit=2, image_size=40, scale=(1.0, 1.0),
                     ratio=(aspect, aspect), flip=False)
  for got, photo in zip(x, load_sample_images().images):
    ref = np.asarray(Image.fromarray(photo).resize((40, 40), Image.BILINEAR)).astype(int)
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_bundled_sources_take_a_seeded_transform():
  x, _ = load_arrays("digits", "test", limit=4, transform={"mode": "random_resized_crop", "size": 12,
                                                           "flip": True}, seed=1)
  y, _ = load_arrays("digits", "test", limit=4, transform={"mode": "random_resized_crop", "size": 12,
                                                           "flip": True}, seed=1)
  assert x.shape == (4, 12, 12, 3)
  np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="no per_class"):
    load_arrays("digits", "test", per_class=3)
  with pytest.raises(ValueError, match="unknown options for 'digits'"):
    load_arrays("digits", "test", flip=True)


def test_get_dataset_serves_bundled_shares():
  from b4b_jax.data import get_dataset  # pylint: disable=g-import-not-at-top
  _, labels = load_arrays("digits", "test")
  shares = [[int(ex["label"]) for ex in get_dataset("digits", "test", process_index=p,
                                                      process_count=2).as_numpy_iterator()]
            for p in range(2)]
  assert [len(s) for s in shares] == [225, 225]
  np.testing.assert_array_equal(np.concatenate(shares), labels)
