r"""Materialises an N-images-per-class subset of a class-folder dataset (e.g. ImageNet-100 per class).

  python -m b4b_jax.data.make_subset --src=/data/imagenet --dst=/data/imagenet_100pc \
      --per_class=100 --splits=train --seed=0 [--copy]

Writes dst/<split>/<class>/<file> as symlinks (or copies with --copy) to the files that
`load_arrays("folder:SRC", split, per_class=N, seed=S)` would pick, so both ways give the same images.
Splits not subsampled (e.g. val) are linked whole with --full_splits=val. An existing dst is refused.
"""
import os
import shutil
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from b4b_jax.data import folders
from b4b_jax.utils.progress import Progress

_MARKER = ".make_subset_in_progress"


def make_subset(src: str, dst: str, *, per_class: int, splits: Sequence[str] = ("train",),
                full_splits: Sequence[str] = (), seed: int = 0, copy: bool = False) -> int:
  """Returns the number of files written. Refuses to write into an existing dst."""
  if os.path.exists(dst):
    raise FileExistsError(f"destination already exists, refusing to overwrite: {dst}")
  jobs = [(s, per_class) for s in splits] + [(s, None) for s in full_splits]
  listed = [(s, folders.list_folder(src, s, per_class=n, seed=seed)) for s, n in jobs]
  tmp = dst + ".incomplete"
  if os.path.lexists(tmp):
    # A crashed earlier run's leftover is ours to remove (it carries the marker); anything else under
    # that name is the user's and is never deleted.
    if not os.path.isfile(os.path.join(tmp, _MARKER)):
      raise FileExistsError(f"{tmp} exists and was not left by make_subset; move it away first")
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  open(os.path.join(tmp, _MARKER), "w").close()
  total = sum(len(f) for _, f in listed)
  progress = Progress("make_subset", total, unit="file")
  written = 0
  for split, files in listed:
    for path, label in zip(files.paths, files.labels):
      out_dir = os.path.join(tmp, split, files.class_names[label])
      os.makedirs(out_dir, exist_ok=True)
      out = os.path.join(out_dir, os.path.basename(path))
      if copy:
        shutil.copy2(path, out)
      else:
        os.symlink(os.path.abspath(path), out)
      written += 1
      progress.update(written)
  os.remove(os.path.join(tmp, _MARKER))
  os.rename(tmp, dst)  # the subset appears whole or not at all
  logging.info("wrote %d files to %s", written, dst)
  return written


def main(argv: Optional[Sequence[str]] = None) -> None:
  del argv
  f = flags.FLAGS
  make_subset(f.src, f.dst, per_class=f.per_class, splits=f.splits, full_splits=f.full_splits,
              seed=f.seed, copy=f.copy)


if __name__ == "__main__":
  flags.DEFINE_string("src", None, "root of the class folders (src/<split>/<class>/*)", required=True)
  flags.DEFINE_string("dst", None, "where to write the subset (must not exist)", required=True)
  flags.DEFINE_integer("per_class", 100, "images per class")
  flags.DEFINE_list("splits", ["train"], "splits to subsample")
  flags.DEFINE_list("full_splits", [], "splits to link whole (e.g. val)")
  flags.DEFINE_integer("seed", 0, "seed of the per-class choice")
  flags.DEFINE_bool("copy", False, "copy files instead of symlinking them")
  app.run(main)
