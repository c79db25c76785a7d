"""Frozen-encoder embeddings: any encoder directory + any dataset -> representations and labels (.npz).

The replacement for the original generate_embeddings script. Images stream through tf.data (so
ImageNet-size sets never sit in memory), get the encoder's eval transform (resize / center crop from its
manifest, or a named preset), are normalised with the encoder's mean/std and embedded by one jitted call
per batch, data-parallel over all local devices (the batch padded to a multiple of the device count).

Encoder specs (`resolve_encoder`):
  <dir>                  an encoder directory (converted checkpoint, trained victim, stolen model)
  <steal workdir>        a directory holding `stolen_encoder/` (what the stealing job writes)
  random:<arch>[@<size>] a randomly initialised ResNet (e.g. "random:resnet18_w0.125@32"), saved into
                         the workdir first so it loads through the same path: a baseline, and the
                         encoder of the small CPU configs
"""
import io
import json
import math
import os
import weakref
import zipfile
from typing import Iterator, Optional, Tuple

import jax
import numpy as np

from b4b_jax import data as data_lib
from b4b_jax import models
from b4b_jax.utils import distributed
from b4b_jax.utils import files
from b4b_jax.utils import progress as progress_lib

STOLEN_SUBDIR = "stolen_encoder"
RANDOM_PREFIX = "random:"
NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y")


# ---------------------------------------------------------------- encoders


def resolve_encoder(spec: str, *, workdir: Optional[str] = None, seed: int = 0):
  """Loads the encoder a spec names (see module docstring); returns a models.Encoder."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"encoder spec must be a non-empty string, got {spec!r}")
  if spec.startswith(RANDOM_PREFIX):
    return _random_encoder(spec[len(RANDOM_PREFIX):], workdir=workdir, seed=seed)
  path = os.path.abspath(os.path.expanduser(spec))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"encoder directory {path} does not exist")
  if not os.path.exists(os.path.join(path, "manifest.json")) and os.path.isdir(
      os.path.join(path, STOLEN_SUBDIR)):
    path = os.path.join(path, STOLEN_SUBDIR)
  return models.load_encoder(path)


def _random_encoder(arch: str, *, workdir: Optional[str], seed: int):
  arch, _, size = arch.partition("@")
  size = int(size) if size else 32
  if workdir is None:
    raise ValueError("a random:<arch> encoder needs a workdir to be saved into")
  directory = os.path.join(workdir, f"random_encoder_{arch}_{size}_seed{seed}")
  distributed.written_by_process_zero(  # multi-host: one writer, then every process loads it
      lambda: models.save_random_encoder(directory, arch, image_size=size, seed=seed,
                                         small_input=size <= 64), f"random encoder {directory}")
  return models.load_encoder(directory)


class EncoderView:
  """An encoder seen with another input normalisation and/or its representations multiplied by `scale`.

  Duck-types models.Encoder (manifest, rep_dim, input_size, params, apply_fn, __call__), so it embeds
  through `embed_images` and serves through `DefendedEncoder.from_encoder`. normalization: anything
  data.normalization reads ("unit" = ToTensor only, the original stolen-model probe); scale: the
  original's representation scale (SimSiam features x1000 in its embedding experiments, reference
  §3.4), applied inside the jitted forward, so the defense hashes, noises and transforms scaled features.
  Views of one program with one scale share the compiled forward of `embed_images`; other callers
  (DefendedEncoder) compile per object, so keep one view per job.
  """

  def __init__(self, encoder, *, normalization=None, scale: float = 1.0):
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
      raise ValueError(f"representation scale must be a finite number > 0, got {scale}")
    manifest = json.loads(json.dumps(encoder.manifest))
    if normalization is not None:
      mean, std = data_lib.normalization(normalization)
      manifest["preprocessing"] = dict(manifest["preprocessing"], mean=mean.tolist(), std=std.tolist())
    self.manifest = manifest
    self.rep_dim = int(encoder.rep_dim)
    self.input_size = int(manifest["preprocessing"]["input_size"])
    self.params = encoder.params
    self.scale = scale
    base = encoder.apply_fn
    self.apply_fn = base if scale == 1.0 else (lambda params, x: base(params, x) * scale)
    program = getattr(encoder, "program_key", None)  # the normalisation is the embedder's to key
    self.program_key = program if program is None or scale == 1.0 else (program, scale)

  def __call__(self, images):
    return self.apply_fn(self.params, images)


def eval_transform(encoder, override=None):
  """The image transform before normalisation: `override` (a preset name / dict) or the manifest's."""
  pre = encoder.manifest["preprocessing"]
  size = int(pre["input_size"])
  if override:
    return data_lib.make_transform(override, size)
  method = pre.get("interpolation", "bilinear")
  if pre.get("resize") and pre.get("crop", "center") == "center":
    return data_lib.Transform("center_crop", size, resize_size=int(pre["resize"]), method=method)
  return data_lib.Transform("resize", size, method=method)


# ---------------------------------------------------------------- embedding


def split_dataset(dataset: str, split: str, *, data_dir=None, limit: Optional[int] = None,
                  seed: int = 0, shuffle_files: bool = False):
  """The whole split (all processes' shares) as a tf.data.Dataset, first `limit` examples."""
  ds = data_lib.get_dataset(dataset, split, data_dir=data_dir, process_index=0, process_count=1,
                            seed=seed, shuffle_files=shuffle_files)
  if limit is not None:
    if int(limit) < 1:
      raise ValueError(f"limit must be >= 1, got {limit}")
    ds = ds.take(int(limit))
  return ds


def num_examples(ds) -> int:
  """Examples in a dataset if tf.data knows it cheaply, else 0 (progress then shows no percentage)."""
  n = int(ds.cardinality())
  return n if n >= 0 else 0


def image_batches(dataset: str, split: str, *, transform, batch_size: int, data_dir=None,
                  limit: Optional[int] = None, seed: int = 0, shuffle_files: bool = False
                  ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(uint8 [B, S, S, 3], int32 [B]) batches of a whole split, in order, transformed."""
  ds = split_dataset(dataset, split, data_dir=data_dir, limit=limit, seed=seed,
                     shuffle_files=shuffle_files)
  return batches_of(ds, transform=transform, batch_size=batch_size, seed=seed)


def batches_of(ds, *, transform, batch_size: int, seed: int = 0):
  """Transformed (images, labels) numpy batches of a {"image", "label"} dataset, in order."""
  tf = data_lib.preprocess.tf

  def prepare(i, ex):
    seed_i = data_lib.example_seed(seed, 0, i) if transform.is_random else None
    return transform(ex["image"], seed_i), ex["label"]

  ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for images, labels in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
    yield images, labels.astype(np.int32)


def _compiled_forward(encoder):
  """The jitted uint8 -> representation forward of `encoder`, one per program in the process where the
  encoder names its program (`program_key`: models.Encoder, EncoderView), else one per object. The
  demo's stolen copies are one architecture, and each new Encoder object had compiled the same program
  again (the full demo: 22 compiles of this forward, 6 s of its 165 s, for 4 programs)."""
  mean, std = data_lib.normalization(encoder)
  program = getattr(encoder, "program_key", None)
  key = None if program is None else (program, mean.tobytes(), std.tobytes())
  forward = _FORWARDS.get(key)
  if forward is None:
    apply_fn = encoder.apply_fn

    @jax.jit
    def embed(params, images_uint8):
      return apply_fn(params, data_lib.normalize(images_uint8, mean, std))

    forward = embed
    if key is not None:
      _FORWARDS[key] = forward
  return forward


_FORWARDS = {}  # (program_key, mean, std) -> jitted forward


class _Embedder:
  """One encoder's weights, replicated over this process's devices, and its program's compiled forward
  (sharded over those devices).

  Every process embeds whole sets by itself (evaluation sets are small next to the stealing set), so
  nothing crosses hosts.
  """

  def __init__(self, encoder):
    self.mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (distributed.DATA_AXIS,))
    self.num_devices = self.mesh.devices.size
    self.params = distributed.replicate(encoder.params, self.mesh)
    self.embed = _compiled_forward(encoder)

  def __call__(self, images: np.ndarray, params=None) -> np.ndarray:
    n = len(images)
    pad = -n % self.num_devices
    if pad:  # padded to a multiple of the devices; padded rows are dropped
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
    batch = jax.device_put(images, distributed.batch_sharded(self.mesh))
    params = self.params if params is None else distributed.replicate(params, self.mesh)
    return np.asarray(self.embed(params, batch), np.float32)[:n]


# The replicated weights of each Encoder object (dropped with it).
_EMBEDDERS = weakref.WeakKeyDictionary()


def embed_images(encoder, images: np.ndarray, *, batch_size: int = 256, params=None) -> np.ndarray:
  """Representations [N, D] float32 of uint8 [N, H, W, 3] images through `encoder` (a models.Encoder).

  The one way images are embedded: the encoder's own normalisation, inside one jitted call per batch of
  `batch_size`, data-parallel over this process's devices. `params` (same structure as
  `encoder.params`) embeds with other weights of the same architecture, e.g. a model in training.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"embed_images takes uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if len(images) == 0:
    return np.zeros((0, encoder.rep_dim), np.float32)
  embedder = _EMBEDDERS.get(encoder)
  if embedder is None:
    embedder = _EMBEDDERS[encoder] = _Embedder(encoder)
  return np.concatenate([embedder(images[i:i + batch_size], params)
                         for i in range(0, len(images), batch_size)])


def local_examples(dataset: str, split: str, *, transform, data_dir=None, limit: Optional[int] = None,
                   seed: int = 0, shuffle_files: bool = False, epoch: int = 0):
  """This process's share of a split as a tf.data.Dataset of (global index, transformed uint8 image,
  label), and the files it reads (None for non-folder sources).

  Class folders: the process's contiguous share of the (first `limit`) files, read only by it. Other
  sources (TFDS, bundled: small sets): every process_count-th example of the stream. Example i draws its
  randomness from example_seed(seed, epoch, i) (epoch 0: as `batches_of`), whichever process embeds it.
  """
  tf = data_lib.preprocess.tf
  pi, pc = jax.process_index(), jax.process_count()
  kind, target = data_lib.sources.parse_name(dataset, data_dir)
  paths = None
  if kind == "folder":
    files = data_lib.list_folder(target, split, seed=seed)
    order = np.arange(len(files))
    if shuffle_files:
      order = np.random.default_rng(seed).permutation(len(files))
    if limit is not None:
      order = order[:_check_limit(limit)]
    ids = np.arange(len(order), dtype=np.int64)[data_lib.stream.host_slice(len(order))]
    paths, labels = files.paths[order][ids], files.labels[order][ids]
    ds = tf.data.Dataset.from_tensor_slices((ids, paths, labels)).map(
        lambda i, p, y: (i, data_lib.folders.decode_image(p), y),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    ds = split_dataset(dataset, split, data_dir=data_dir, limit=limit, seed=seed,
                       shuffle_files=shuffle_files)
    ds = ds.enumerate().map(lambda i, ex: (i, ex["image"], ex["label"]))
    if pc > 1:
      ds = ds.filter(lambda i, image, label: i % pc == pi)

  def prepare(i, image, label):
    seed_i = data_lib.example_seed(seed, epoch, i) if transform.is_random else None
    return i, transform(image, seed_i), tf.cast(label, tf.int32)

  return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), paths


def _check_limit(limit) -> int:
  if int(limit) < 1:
    raise ValueError(f"limit must be >= 1, got {limit}")
  return int(limit)


def embed_split(encoder, dataset: str, split: str, *, transform, batch_size: int = 256,
                data_dir=None, limit: Optional[int] = None, seed: int = 0, shuffle_files: bool = False,
                progress: Optional[str] = None, epoch: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """Representations [N, D] float32 and labels [N] int32 of one split; `progress` names a progress
  line ("embed/<name>") reporting images done; `epoch` selects the random views of a random transform.

  Streams: host memory holds the pipeline's buffers and the representations, never the images. Each
  process embeds its share (`local_examples`) data-parallel on its local devices; the shares are
  gathered, so every process returns the whole split in order.
  """
  ds, paths = local_examples(dataset, split, transform=transform, data_dir=data_dir, limit=limit,
                             seed=seed, shuffle_files=shuffle_files, epoch=epoch)
  prog = progress_lib.Progress(f"embed/{progress}", num_examples(ds), unit="image") if progress else None
  ds = ds.batch(batch_size).prefetch(2)
  ids, reps, labels = [], [], []
  batches = (data_lib.folders.iterate_named(ds, paths) if paths is not None
             else ds.as_numpy_iterator())
  for i, images, y in batches:
    ids.append(i)
    reps.append(embed_images(encoder, images, batch_size=batch_size))
    labels.append(y)
    if prog is not None:
      prog.update(sum(len(r) for r in reps))
  empty = (np.zeros((0,), np.int64), np.zeros((0, encoder.rep_dim), np.float32), np.zeros((0,), np.int32))
  ids, reps, labels = [np.concatenate(a) if a else e for a, e in zip((ids, reps, labels), empty)]
  reps, labels = data_lib.stream.gather_rows(ids, reps, labels)
  if not len(reps):
    raise ValueError(f"dataset {dataset!r} split {split!r} is empty")
  return reps, labels.astype(np.int32)


# ---------------------------------------------------------------- .npz files


def save_npz(path: str, *, meta: Optional[dict] = None, **arrays) -> str:
  """Writes arrays (+ a JSON meta string) to `path` atomically; on process 0 only (multi-host runs:
  every process holds the same arrays, one writes)."""
  if not distributed.is_writer():
    return path
  buf = io.BytesIO()
  np.savez(buf, **arrays, meta=np.asarray(json.dumps(meta or {}, sort_keys=True, default=str)))
  files.atomic_write_bytes(path, buf.getvalue())
  return path


def load_npz(path: str) -> dict:
  """Reads what save_npz / the embeddings job wrote: {"train_x", ..., "meta": dict}."""
  arrays = _read_npz(path, "embeddings")
  try:
    meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
  except ValueError as e:
    raise ValueError(f"{path}: its meta entry is not JSON ({e})") from e
  out = arrays
  missing = [k for k in NPZ_KEYS if k not in out]
  if missing:
    raise ValueError(f"{path} lacks arrays {missing} (has {sorted(out)})")
  for split in ("train", "test"):
    x, y = out[f"{split}_x"], out[f"{split}_y"]
    if x.ndim != 2 or y.shape != (len(x),):
      raise ValueError(f"{path}: {split}_x {x.shape} / {split}_y {y.shape} are not [N, D] / [N]")
  out["meta"] = meta
  return out


def embed_dataset(encoder, dataset: str, *, train_split: str = "train", test_split: str = "test",
                  data_dir=None, train_limit=None, test_limit=None, batch_size: int = 256,
                  transform_override=None, seed: int = 0) -> dict:
  """{"train_x", "train_y", "test_x", "test_y", "meta"} for one dataset through one encoder."""
  transform = eval_transform(encoder, transform_override)
  out = {"meta": {"dataset": dataset, "train_split": train_split, "test_split": test_split,
                  "encoder": encoder.manifest.get("architecture"), "rep_dim": encoder.rep_dim,
                  "transform": repr(transform), "train_limit": train_limit, "test_limit": test_limit}}
  for key, split, limit in (("train", train_split, train_limit), ("test", test_split, test_limit)):
    out[f"{key}_x"], out[f"{key}_y"] = embed_split(
        encoder, dataset, split, transform=transform, batch_size=batch_size, data_dir=data_dir,
        limit=limit, seed=seed, progress=f"{dataset}/{key}")
  return out


# ---------------------------------------------------------------- what the evaluation jobs call


def safe_name(name: str) -> str:
  """A dataset / query-set name as a file name."""
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def check_source(source) -> None:
  """Raises ValueError naming the first invalid field of a `source` block (configs/common.py)."""
  if not source.encoder and not source.npz_dir:
    raise ValueError("config.source needs an encoder (an encoder directory, a stealing workdir or "
                     "random:<arch>@<size>) or an npz_dir of precomputed embeddings")
  for name in ("train_limit", "test_limit"):
    if source[name] is not None and source[name] < 1:
      raise ValueError(f"source.{name} must be >= 1 or None (all), got {source[name]}")
  if source.batch_size < 1:
    raise ValueError(f"source.batch_size must be >= 1, got {source.batch_size}")


class EmbeddingSource:
  """Representations per dataset for a job, from a config `source` block (configs/common.py).

  Precomputed files (source.npz_dir/<dataset>.npz) are read as they are; otherwise the encoder embeds
  the dataset once and the result is cached in workdir/embeddings/, so a resumed job does not re-embed.
  """

  def __init__(self, source, workdir: str, *, seed: int = 0):
    self.source = source
    self.workdir = workdir
    self.seed = int(seed)
    self._encoder = None

  @property
  def encoder(self):
    if self._encoder is None:
      if not self.source.encoder:
        raise ValueError("config.source.encoder is not set (an encoder directory, a stealing workdir "
                         "or random:<arch>@<size>), and source.npz_dir does not hold every dataset")
      self._encoder = resolve_encoder(self.source.encoder, workdir=self.workdir, seed=self.seed)
    return self._encoder

  def cache_path(self, dataset: str) -> str:
    return os.path.join(self.workdir, "embeddings", f"{safe_name(dataset)}.npz")

  def get(self, dataset: str) -> dict:
    if self.source.npz_dir:
      given = os.path.join(self.source.npz_dir, f"{safe_name(dataset)}.npz")
      if os.path.exists(given):
        return load_npz(given)
    path = self.cache_path(dataset)
    # Every process takes process 0's branch: embedding is collective (the shares are gathered).
    if distributed.agree(os.path.exists(path)):
      return load_npz(path)
    out = embed_dataset(self.encoder, dataset, train_split=self.source.train_split,
                        test_split=self.source.test_split, data_dir=self.source.data_dir,
                        train_limit=self.source.train_limit, test_limit=self.source.test_limit,
                        batch_size=self.source.batch_size, transform_override=self.source.transform,
                        seed=self.seed)
    meta = dict(out["meta"], encoder_spec=self.source.encoder)
    save_npz(path, meta=meta, **{k: out[k] for k in NPZ_KEYS})
    out["meta"] = meta
    return out


def save_array(path: str, reps: np.ndarray, *, meta: Optional[dict] = None) -> str:
  """One representation array (e.g. a query set) as .npz, atomically."""
  return save_npz(path, meta=meta, reps=np.asarray(reps, np.float32))


def load_array(path: str) -> np.ndarray:
  arrays = _read_npz(path, "representation")
  if "reps" not in arrays:
    raise ValueError(f"{path} has no 'reps' array (has {sorted(arrays)})")
  return arrays["reps"]


def _read_npz(path: str, what: str) -> dict:
  """Every array of an .npz file; a missing, truncated or foreign file is one clear error naming it
  (np.load raises OSError, ValueError, EOFError or zipfile.BadZipFile by the kind of damage)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file {path} does not exist")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable {what} .npz ({type(e).__name__}: {e})") from e
