"""ImageNet-style class folders on a tiny generated tree, including broken inputs."""
import io
import os

import numpy as np
from PIL import Image
import pytest

from b4b_jax.data import check_images, get_dataset, list_folder, load_arrays

CLASSES = ("cat", "dog", "eel")  # sorted -> labels 0, 1, 2


def _write(path, array, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, fmt)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """root/{train,val}/<class>/: 5 train images per class (PNG, sizes vary), 2 val (JPEG + grayscale).
  Pixel (0, 0) red channel = a unique id; green = the class index * 50."""
  root = str(tmp_path_factory.mktemp("folders"))
  uid = 0
  for c, name in enumerate(CLASSES):
    for i in range(5):
      im = np.full((10 + i, 12, 3), c * 50, np.uint8)
      im[..., 0] = uid
      _write(os.path.join(root, "train", name, f"img{i}.png"), im, "PNG")
      uid += 1
    _write(os.path.join(root, "val", name, "a.JPEG"), np.full((9, 9, 3), c * 50, np.uint8), "JPEG")
    _write(os.path.join(root, "val", name, "b.png"), np.full((9, 9), c * 50, np.uint8), "PNG")
  with open(os.path.join(root, "train", "cat", "notes.txt"), "w") as f:
    f.write("not an image, ignored")
  return root


def test_load_arrays_labels_are_sorted_class_names(tree):
  images, labels = load_arrays(f"folder:{tree}", "train", image_size=8)
  assert images.shape == (15, 8, 8, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 5))
  np.testing.assert_array_equal(images[:, 4, 4, 1], labels * 50)  # green encodes the class
  val_x, val_y = load_arrays("folder", "val", data_dir=tree, image_size=8)
  np.testing.assert_array_equal(val_y, [0, 0, 1, 1, 2, 2])
  assert np.abs(val_x[:, 4, 4, 1].astype(int) - val_y * 50).max() <= 3  # JPEG and grayscale decoded
  with pytest.raises(ValueError, match="differ in size"):
    load_arrays(f"folder:{tree}", "train")


def test_per_class_subset_is_seeded(tree):
  a = list_folder(tree, "train", per_class=2, seed=0)
  b = list_folder(tree, "train", per_class=2, seed=0)
  assert len(a) == 6 and a.class_names == CLASSES
  np.testing.assert_array_equal(a.labels, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(a.paths, b.paths)
  others = [list_folder(tree, "train", per_class=2, seed=s).paths for s in range(1, 6)]
  assert any(not np.array_equal(a.paths, o) for o in others)
  x, y = load_arrays(f"folder:{tree}", "train", per_class=2, image_size=8, seed=0)
  assert x.shape == (6, 8, 8, 3)
  with pytest.raises(ValueError, match="per_class"):
    list_folder(tree, "train", per_class=0)


def test_process_shards_are_disjoint_and_cover_the_split(tree):
  ids = []
  for p in range(3):
    ds = get_dataset(f"folder:{tree}", "train", process_index=p, process_count=3, shuffle_files=True,
                     seed=1)
    ids.append([int(ex["image"][0, 0, 0]) for ex in ds.as_numpy_iterator()])
  assert [len(s) for s in ids] == [5, 5, 5]
  assert sorted(sum(ids, [])) == list(range(15))
  again = [int(ex["image"][0, 0, 0]) for ex in get_dataset(
      f"folder:{tree}", "train", process_index=0, process_count=3, shuffle_files=True,
      seed=1).as_numpy_iterator()]
  assert again == ids[0]
  assert len({i // 5 for i in ids[0]}) > 1  # shuffled before sharding: a share mixes classes


def test_bad_inputs_name_the_path(tmp_path, tree):
  with pytest.raises(FileNotFoundError, match="does not exist: .*nowhere"):
    load_arrays(f"folder:{tmp_path}/nowhere", "train")
  with pytest.raises(ValueError, match="no split 'test'.*\\['train', 'val'\\]"):
    load_arrays(f"folder:{tree}", "test")
  root = str(tmp_path / "broken")
  good = np.zeros((8, 8, 3), np.uint8)
  _write(os.path.join(root, "train", "a", "ok.png"), good, "PNG")
  os.makedirs(os.path.join(root, "train", "b"))
  with pytest.raises(ValueError, match="empty class folder.*" + os.path.join("train", "b")):
    list_folder(root, "train")
  _write(os.path.join(root, "train", "b", "ok.png"), good, "PNG")
  bad = os.path.join(root, "train", "b", "bad.jpg")
  with open(bad, "wb") as f:
    f.write(b"this is not a jpeg")
  with pytest.raises(ValueError, match="undecodable file.*bad.jpg"):
    load_arrays(f"folder:{root}", "train", image_size=8)
  # A JPEG cut in half passes the signature check; decoding finds it and names it.
  buf = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  Image.fromarray(noise).save(buf, "JPEG")
  with open(bad, "wb") as f:
    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
  with pytest.raises(ValueError, match="undecodable image file.*bad.jpg"):
    load_arrays(f"folder:{root}", "train", image_size=8)
  with pytest.raises(ValueError, match="bad.jpg"):
    check_images(list_folder(root, "train").paths)
  os.remove(bad)
  _write(os.path.join(root, "val", "zebra", "z.png"), good, "PNG")
  with pytest.raises(ValueError, match="class folders that .* lacks: \\['zebra'\\]"):
    list_folder(root, "val")
  with pytest.raises(ValueError, match="needs a root"):
    load_arrays("folder:", "train")


def test_make_subset_links_the_same_images_as_per_class(tree, tmp_path):
  from b4b_jax.data.make_subset import make_subset  # pylint: disable=g-import-not-at-top
  dst = str(tmp_path / "subset")
  assert make_subset(tree, dst, per_class=2, splits=["train"], full_splits=["val"], seed=4) == 12
  sub = list_folder(dst, "train")
  picked = list_folder(tree, "train", per_class=2, seed=4)
  assert [os.path.realpath(p) for p in sub.paths] == [os.path.realpath(p) for p in picked.paths]
  assert len(list_folder(dst, "val")) == 6 and sub.class_names == CLASSES
  with pytest.raises(FileExistsError, match="refusing"):
    make_subset(tree, dst, per_class=2)


def test_make_subset_removes_only_its_own_leftovers(tree, tmp_path):
  from b4b_jax.data import make_subset as make_subset_lib  # pylint: disable=g-import-not-at-top
  dst = str(tmp_path / "subset")
  # A directory of the user's under the work name is refused and kept.
  users = tmp_path / "subset.incomplete"
  users.mkdir()
  (users / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not left by make_subset"):
    make_subset_lib.make_subset(tree, dst, per_class=1)
  assert (users / "keep.txt").read_text() == "mine" and not os.path.exists(dst)
  # A crashed run's leftover (marker inside) is replaced; the finished subset has no marker.
  (users / "keep.txt").unlink()
  (users / make_subset_lib._MARKER).write_text("")  # pylint: disable=protected-access
  assert make_subset_lib.make_subset(tree, dst, per_class=1) == 3
  assert not users.exists() and sorted(os.listdir(dst)) == ["train"]
