"""Streaming input for the stealing job: the pool, its views and held-out sets, read from disk by index.

  pool = open_pool(config.data, seed)                        # lists files (and checks them); no pixels
  for batch in view_batches(pool, indices, transform, seed=seed, epoch=e, batch_size=256):
    ...                                                       # uint8 [B, S, S, 3], in `indices` order

Contract:
- A `Pool` is N images addressed by index 0..N-1. Class folders (the paper's ImageNet pool) are a list of
  file paths: images are decoded when a pipeline reaches them, so host memory is bounded by the
  pipeline's buffers (parallel map + one batch + `PREFETCH` batches), never by N. Bundled and TFDS sets
  (small images: CIFAR-size or the CPU variants) are held in memory at their native size, as before.
- Image i of a pool is `pool_transform(decode(file_i), example_seed(seed, 0, i))` (the config's
  `transform` / `image_size`, e.g. Resize(256) + CenterCrop(256)); the view of image i at `epoch` is
  `view_transform(image_i, example_seed(seed, epoch, i))`. Views depend only on (seed, epoch, index):
  a resumed run, another host or another batch size sees the same pixels, and they equal what the
  old in-memory path (`load_arrays` then `apply_transform`) produced.
- Per host: `host_slice(rows)` is this process's contiguous share of a global batch's rows
  (jax.process_index()/process_count()); each host decodes only what it feeds.
- Corrupt files (present, image extension, but not decodable) are SKIPPED and COUNTED: `open_pool`
  decodes every file once before the plan is drawn (and before any query is charged), drops the bad
  ones from the index and lists them in `pool.skipped` (the steal job reports them in results.json).
  `on_corrupt="error"` refuses instead, naming the files. The check's result is cached in a JSON file
  keyed by the file list, so a resumed run does not decode the pool again and sees the same indices.
  A decode error later in a stream (a file changed on disk) is a ValueError naming the file.
"""
import collections
import dataclasses
import hashlib
import os
from typing import Iterator, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from b4b_jax.data import folders
from b4b_jax.data import preprocess
from b4b_jax.data import sources
from b4b_jax.data._tf import tf
from b4b_jax.data.sharding import shard_bounds
from b4b_jax.utils import files as files_lib

PREFETCH = 2          # batches buffered ahead of the consumer
ON_CORRUPT = ("skip", "error")


@dataclasses.dataclass(frozen=True)
class Pool:
  """N images by index: file paths read on demand (class folders) or small in-memory arrays."""
  name: str
  split: str
  labels: np.ndarray                          # int32 [N]
  paths: Optional[np.ndarray] = None          # str [N] (class folders)
  images: Optional[np.ndarray] = None         # uint8 [N, H, W, 3] (bundled / TFDS sets)
  transform: Optional[preprocess.Transform] = None  # the pool transform (applied after decoding)
  seed: int = 0
  skipped: Tuple[str, ...] = ()               # corrupt files left out (not in paths)

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def streams_from_disk(self) -> bool:
    return self.paths is not None

  def summary(self) -> dict:
    return {"name": self.name, "split": self.split, "num_images": len(self),
            "source": "files (streamed)" if self.streams_from_disk else "in memory",
            "skipped_corrupt": len(self.skipped), "skipped_files": list(self.skipped[:20])}


# ---------------------------------------------------------------------------------------------------
# Opening a pool (a config block: name, split, limit, image_size, transform, per_class, data_dir)
# ---------------------------------------------------------------------------------------------------
def _pool_transform(cfg) -> Optional[preprocess.Transform]:
  spec = cfg.get("transform")
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if spec is None and cfg.get("image_size") is not None:
    return preprocess.Transform("resize", int(cfg.image_size))
  return preprocess.make_transform(spec)


def open_pool(cfg, seed: int, *, on_corrupt: str = "skip", check_cache: Optional[str] = None,
              check_files: bool = True) -> Pool:
  """The pool a config block names. Class folders are listed (and, with check_files, every file
  decoded once: see the module docstring); other sources are loaded into memory as before."""
  if on_corrupt not in ON_CORRUPT:
    raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
  kind, target = sources.parse_name(cfg.name, cfg.get("data_dir"))
  limit = cfg.get("limit")
  if kind != "folder":
    kwargs = {"data_dir": cfg.get("data_dir"), "limit": limit, "seed": seed}
    if kind == "bundled":
      kwargs["image_size"] = cfg.get("image_size")
    else:
      kwargs["transform"] = _pool_transform(cfg)
      kwargs["per_class"] = cfg.get("per_class")
    images, labels = sources.load_arrays(cfg.name, cfg.split, **kwargs)
    if len(images) == 0:
      raise ValueError(f"dataset {cfg.name!r} split {cfg.split!r} gave no images")
    return Pool(cfg.name, cfg.split, labels, images=images, seed=seed)

  listed = folders.list_folder(target, cfg.split, per_class=cfg.get("per_class"), seed=seed,
                               check_files=False)
  paths, labels = listed.paths, listed.labels
  if limit is not None:
    paths, labels = paths[:int(limit)], labels[:int(limit)]
  if len(paths) == 0:
    raise ValueError(f"dataset {cfg.name!r} split {cfg.split!r} gave no images")
  bad = ()
  if check_files:
    bad = _cached_check(paths, check_cache)
  if bad:
    listing = "; ".join(bad[:10]) + (f"; ... ({len(bad)} in all)" if len(bad) > 10 else "")
    if on_corrupt == "error":
      raise ValueError(f"{len(bad)} undecodable image file(s) in {cfg.name!r} split {cfg.split!r}: "
                       f"{listing}")
    logging.warning("skipping %d undecodable image file(s) of %d in %s/%s: %s", len(bad), len(paths),
                    cfg.name, cfg.split, listing)
    keep = ~np.isin(paths, np.asarray(bad, dtype=str))
    paths, labels = paths[keep], labels[keep]
    if len(paths) == 0:
      raise ValueError(f"every image file of {cfg.name!r} split {cfg.split!r} is undecodable")
  return Pool(cfg.name, cfg.split, np.asarray(labels, np.int32), paths=np.asarray(paths, dtype=str),
              transform=_pool_transform(cfg), seed=seed, skipped=tuple(bad))


def undecodable(paths: Sequence[str], *, process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> Tuple[str, ...]:
  """The files among `paths` that fail to read or decode (tf.io.decode_image), in order.

  Each process decodes its contiguous share in parallel and the shares are combined, so every
  process returns the same list."""
  paths = np.asarray(paths, dtype=str)
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  start, stop = shard_bounds(len(paths), pi, pc)
  bad = np.zeros((len(paths),), np.int32)
  if stop > start:
    ds = tf.data.Dataset.from_tensor_slices((np.arange(start, stop, dtype=np.int64), paths[start:stop]))
    ds = ds.map(lambda i, p: (i, tf.shape(folders.decode_image(p))[0]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors()
    ok = np.zeros((stop - start,), bool)
    for i, _ in ds.as_numpy_iterator():
      ok[i - start] = True
    bad[start:stop] = ~ok
  if pc > 1 and jax.process_count() > 1:  # the shares of all processes
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    bad = np.asarray(multihost_utils.process_allgather(bad)).max(axis=0)
  return tuple(str(p) for p in paths[bad.astype(bool)])


def _cached_check(paths: np.ndarray, cache: Optional[str]) -> Tuple[str, ...]:
  """undecodable(paths), or what an earlier run saved in `cache` for the same file list. Process 0's
  cache decides for every process (a collective call: the processes must agree on whether the decode
  pass, itself collective, runs)."""
  digest = hashlib.sha256("\n".join(paths.tolist()).encode()).hexdigest()
  saved = None
  if cache and os.path.exists(cache):
    saved = files_lib.read_json(cache)
    if saved.get("paths_sha256") != digest:
      logging.warning("%s was written for another file list: checking the pool again", cache)
      saved = None
  mask = np.zeros((len(paths),), bool)
  if saved is not None:
    mask = np.isin(paths, np.asarray(saved["undecodable"], dtype=str))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    cached, mask = multihost_utils.broadcast_one_to_all((np.asarray(saved is not None), mask))
    saved = {} if bool(cached) else None
  if saved is not None:
    return tuple(str(p) for p in paths[np.asarray(mask, bool)])
  bad = undecodable(paths)
  if cache and jax.process_index() == 0:
    files_lib.atomic_write_json(cache, {"paths_sha256": digest, "num_files": len(paths),
                                        "undecodable": list(bad)})
  return bad


# ---------------------------------------------------------------------------------------------------
# Views: pipelines over a sequence of pool indices
# ---------------------------------------------------------------------------------------------------
# View functions traced so far: (id(pool), view transform, seed) -> {"pool", "fn", "batch"}; the pool is
# held so that its id is not reused while its entry lives. Least recently used first; a few at most.
_VIEW_FUNCTIONS: "collections.OrderedDict" = collections.OrderedDict()
_MAX_VIEW_FUNCTIONS = 8


def _view_function(pool: Pool, transform: Optional[preprocess.Transform], seed: int):
  """The cache entry of (pool, view transform, seed): "fn", the view of one pool image as a tf.function
  of (index, path or image, epoch), traced once; "batch", _in_memory_views' function, once made. Every
  view_dataset used to trace its map functions afresh (autograph over the transform: ~0.1 s a dataset
  on the 2-core CPU), and the steal job builds one per query batch and per epoch: 5 of the 7.4 s
  query phase of a demo attack."""
  key = (id(pool), transform, int(seed))
  if key in _VIEW_FUNCTIONS:
    _VIEW_FUNCTIONS.move_to_end(key)
    return _VIEW_FUNCTIONS[key]

  def view(i, image, epoch):
    if transform is None:
      return image
    return transform(image, preprocess.example_seed(seed, epoch, i))

  scalar = tf.TensorSpec([], tf.int64)
  if pool.streams_from_disk:
    @tf.function(input_signature=[scalar, tf.TensorSpec([], tf.string), scalar])
    def fn(i, path, epoch):
      image = folders.decode_image(path)
      if pool.transform is not None:
        image = pool.transform(image, preprocess.example_seed(pool.seed, 0, i))
      return view(i, image, epoch)
  else:
    @tf.function(input_signature=[scalar, tf.TensorSpec(pool.images.shape[1:], tf.uint8), scalar])
    def fn(i, image, epoch):
      return view(i, image, epoch)
  _VIEW_FUNCTIONS[key] = {"pool": pool, "fn": fn, "batch": None}
  while len(_VIEW_FUNCTIONS) > _MAX_VIEW_FUNCTIONS:
    _VIEW_FUNCTIONS.popitem(last=False)
  return _VIEW_FUNCTIONS[key]


def _in_memory_views(pool: Pool, indices: np.ndarray, transform, seed: int, epoch: int
                     ) -> np.ndarray:
  """views() of an in-memory pool: the same per-image function as view_dataset, mapped over the rows
  in one traced call. Creating a tf.data iterator costs 40-60 ms on the 2-core CPU (its functions are
  instantiated and optimised anew each time), all of the work of a 64-image query batch; this takes
  ~8 ms. The pixels are view_dataset's (tests/test_data_stream.py)."""
  entry = _view_function(pool, transform, seed)
  if entry["batch"] is None:
    fn = entry["fn"]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64),
                                  tf.TensorSpec([None, *pool.images.shape[1:]], tf.uint8),
                                  tf.TensorSpec([], tf.int64)])
    def batch(ids, images, epoch_):
      return tf.map_fn(lambda row: fn(row[0], row[1], epoch_), (ids, images),
                       fn_output_signature=tf.uint8, parallel_iterations=16)
    entry["batch"] = batch
  return entry["batch"](indices, pool.images[indices], np.int64(epoch)).numpy()


def _checked_indices(pool: Pool, indices) -> np.ndarray:
  """int64 [n] indices into the pool; an IndexError names any out of range."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  if len(indices) and (indices.min() < 0 or indices.max() >= len(pool)):
    raise IndexError(f"pool indices out of range [0, {len(pool)}): {indices.min()}..{indices.max()}")
  return indices


def view_dataset(pool: Pool, indices, transform, *, seed: int, epoch: int,
                 batch_size: Optional[int] = None) -> tf.data.Dataset:
  """uint8 views of pool[indices] (batched when batch_size is given; the last batch may be short)."""
  indices = _checked_indices(pool, indices)
  fn = _view_function(pool, preprocess.make_transform(transform), seed)["fn"]
  epochs = np.full(indices.shape, int(epoch), np.int64)  # an element field: map takes fn as it is
  if pool.streams_from_disk:
    ds = tf.data.Dataset.from_tensor_slices((indices, pool.paths[indices], epochs))
  else:
    # In-memory pools are small (bundled sets, CIFAR-size TFDS splits): the rows are sliced here (a
    # numpy_function call per image cost ~10 ms more a 64-image batch).
    ds = tf.data.Dataset.from_tensor_slices((indices, pool.images[indices], epochs))
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if batch_size is not None:
    ds = ds.batch(int(batch_size)).prefetch(PREFETCH)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def view_batches(pool: Pool, indices, transform, *, seed: int, epoch: int, batch_size: int
                 ) -> Iterator[np.ndarray]:
  """Numpy uint8 batches of view_dataset; a file that fails to decode is named in a ValueError."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = view_dataset(pool, indices, transform, seed=seed, epoch=epoch, batch_size=batch_size)
  return folders.iterate_checked(
      ds, lambda error, batches_done: _named_error(pool, indices[batches_done * batch_size:], error))


def views(pool: Pool, indices, transform, *, seed: int, epoch: int, batch_size: int = 256
          ) -> np.ndarray:
  """All views of pool[indices] as one array (for a batch or a small set)."""
  indices = _checked_indices(pool, indices)
  if not pool.streams_from_disk and len(indices):
    return _in_memory_views(pool, indices, preprocess.make_transform(transform), seed, epoch)
  batches = list(view_batches(pool, indices, transform, seed=seed, epoch=epoch, batch_size=batch_size))
  if batches:
    return np.concatenate(batches) if len(batches) > 1 else batches[0]
  transform = preprocess.make_transform(transform)
  size = transform.output_size if transform is not None and transform.output_size else (0, 0)
  return np.zeros((0, *size, 3), np.uint8)


def _named_error(pool: Pool, remaining: np.ndarray, error: Exception) -> Exception:
  message = getattr(error, "message", str(error))
  if pool.streams_from_disk:
    bad = undecodable(pool.paths[remaining], process_index=0, process_count=1)
    if bad:
      return ValueError(f"undecodable image file(s) in {pool.name!r}/{pool.split!r} (changed since the "
                        f"pool was checked?): {'; '.join(bad[:10])}")
  if "same size" in message or "Cannot batch" in message or "Cannot add tensor" in message:
    return ValueError(f"images of {pool.name!r} differ in size: give the pool a transform or "
                      f"image_size")
  return ValueError(f"reading {pool.name!r} split {pool.split!r} failed: {message}")


# ---------------------------------------------------------------------------------------------------
# Per host
# ---------------------------------------------------------------------------------------------------
def host_slice(n: int, process_index: Optional[int] = None, process_count: Optional[int] = None
               ) -> slice:
  """This process's contiguous share of n rows (a global batch, or a set to embed)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  start, stop = shard_bounds(n, pi, pc)
  return slice(start, stop)


def gather_hosts(local: np.ndarray, n: int) -> np.ndarray:
  """The rows every process computed for its host_slice(n), concatenated in process order."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  per = -(-n // jax.process_count())
  padded = np.zeros((per,) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  everything = np.asarray(multihost_utils.process_allgather(padded))  # [process_count, per, ...]
  parts = [everything[p][:len(range(*host_slice(n, p, jax.process_count()).indices(n)))]
           for p in range(jax.process_count())]
  return np.concatenate(parts)



def gather_rows(ids: np.ndarray, *arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
  """Rows computed on several processes, keyed by their global ids -> every array over all ids in id
  order, on every process. (One process: the arrays sorted by id.)"""
  ids = np.asarray(ids, np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(ids)], np.int64))).reshape(-1)
    per = int(counts.max())

    def pad(a):
      out = np.zeros((per,) + a.shape[1:], a.dtype)
      out[:len(a)] = a
      return out
    gathered = [np.asarray(multihost_utils.process_allgather(pad(a))) for a in (ids, *arrays)]
    keep = [np.arange(c) for c in counts]
    ids, *arrays = [np.concatenate([g[p][keep[p]] for p in range(len(counts))]) for g in gathered]
  order = np.argsort(ids, kind="stable")
  return tuple(np.asarray(a)[order] for a in arrays)
