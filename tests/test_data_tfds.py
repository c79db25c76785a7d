"""TFDS sources offline: tfds.testing.mock_data, and a tiny really-prepared dataset in a tmp data_dir
read through the same code path as real CIFAR10."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from b4b_jax.data import get_dataset, load_arrays
from b4b_jax.data import make_transform
from b4b_jax.data._tf import tf
from b4b_jax.evaluation.embeddings import batches_of


@pytest.mark.parametrize("name,split", [("cifar10", "train"), ("stl10", "unlabelled"),
                                        ("stl10", "unlabeled"), ("svhn_cropped", "extra"),
                                        ("svhn", "test"), ("fashion_mnist", "test")])
def test_mock_datasets_give_rgb_uint8_and_int32_labels(name, split):
  with tfds.testing.mock_data(num_examples=6):
    images, labels = load_arrays(name, split, limit=5)
  assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == 5 and images.shape[-1] == 3
  assert labels.dtype == np.int32 and labels.shape == (5,)
  if name == "fashion_mnist":  # grayscale tiled to 3 channels
    assert images.shape[1:] == (28, 28, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_mock_dataset_resized_and_batched():
  with tfds.testing.mock_data(num_examples=16):
    images, _ = load_arrays("stl10", "train", image_size=32, limit=3)
    assert images.shape == (3, 32, 32, 3)
    ds = get_dataset("cifar10", "train", shuffle_files=True, seed=0)
    crop = make_transform({"mode": "random_resized_crop", "size": 32, "flip": True})
    images, labels = next(batches_of(ds, transform=crop, batch_size=8))
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (8,)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A real prepared `cifar10` (12 train / 5 test images) in a tmp data_dir; pixel (0, 0, 0) = id."""
  root = str(tmp_path_factory.mktemp("tfds"))
  features = tfds.builder("cifar10").info.features

  def split(n, offset):
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(offset, offset + n)
    return tf.data.Dataset.from_tensor_slices(
        {"id": [f"x{i}" for i in range(n)], "image": images, "label": np.arange(n) % 10})
  builder = tfds.dataset_builders.TfDataBuilder(
      name="cifar10", version=tfds.builder("cifar10").version, features=features,
      split_datasets={"train": split(12, 0), "test": split(5, 100)}, data_dir=root)
  builder.download_and_prepare()
  return root


def test_prepared_dataset_reads_offline_with_disjoint_process_shares(data_dir):
  images, labels = load_arrays("cifar10", "test", data_dir=data_dir)
  assert sorted(images[:, 0, 0, 0]) == list(range(100, 105))
  assert labels.dtype == np.int32
  shares = [[int(ex["image"][0, 0, 0]) for ex in get_dataset(
      "cifar10", "train", data_dir=data_dir, process_index=p, process_count=3).as_numpy_iterator()]
            for p in range(3)]
  assert [len(s) for s in shares] == [4, 4, 4]
  assert sorted(sum(shares, [])) == list(range(12))
  order = [int(ex["image"][0, 0, 0]) for ex in get_dataset(
      "cifar10", "train", data_dir=data_dir, shuffle_files=True, seed=3).as_numpy_iterator()]
  assert sorted(order) == list(range(12))


def test_missing_data_unknown_names_and_splits(data_dir, tmp_path):
  with pytest.raises(ValueError, match="dataset 'cifar10' has no split 'validation'.*'train'"):
    load_arrays("cifar10", "validation", data_dir=data_dir)
  with pytest.raises(ValueError, match="no split 'bogus'"):
    get_dataset("cifar10", "train[:50%]+bogus", data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match=f"'svhn_cropped' is not prepared in data_dir {tmp_path}"):
    load_arrays("svhn_cropped", "train", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="data_dir does not exist: .*nowhere"):
    get_dataset("cifar10", "train", data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
    load_arrays("cifar11", "train", data_dir=data_dir)
  with pytest.raises(ValueError, match="not an image classification dataset"):
    get_dataset("imdb_reviews", "train", data_dir=str(tmp_path))
