"""Encoder directories: a frozen encoder on disk, loaded as a jitted callable.

Layout of DIR:
  manifest.json   architecture (name + kwargs), representation (which forward), rep_dim, preprocessing
                  (input_size, resize, interpolation, mean, std), source (file, sha256, ...), and the
                  sha256 of the parameters (checked on load, so corruption is caught).
  params/         orbax checkpoint (utils.checkpoint) of {"params": ..., "batch_stats": ...}

The same path serves converted PyTorch checkpoints (weight_conversion) and encoders trained here (the
demo's small victim): `save_encoder` writes, `load_encoder` reads. Directories are written to a
temporary sibling and renamed into place, so a crash never leaves half an encoder, and an existing
directory is only replaced with overwrite=True.
"""
import copy
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from b4b_jax.models import functional
from b4b_jax.models.normalization import RESIZE_METHODS
from b4b_jax.models import resnet as resnet_lib
from b4b_jax.models import vit as vit_lib
from b4b_jax.utils import checkpoint
from b4b_jax.utils import files

FORMAT = "b4b_jax.encoder/v1"
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
MAX_INPUT_SIZE = 4096                     # bound on a manifest's input_size and resize (pixels)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPRESENTATIONS = ("forward", "dino_representation")


def build_model(architecture: Dict[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """The module an architecture record ({"name": ..., "kwargs": {...}}) describes."""
  if not isinstance(architecture, dict) or "name" not in architecture:
    raise ValueError(f"architecture must be a dict with 'name' and 'kwargs', got {architecture!r}")
  name = architecture["name"]
  kwargs = dict(architecture.get("kwargs") or {})
  if name.startswith("resnet"):
    allowed = {"out_dim", "small_input"}
    build = resnet_lib.create_resnet
  elif name.startswith("vit"):
    allowed = {"patch_size", "img_size"}
    build = vit_lib.create_vit
  else:
    raise ValueError(f"unknown architecture {name!r} (expected resnet* or vit_*)")
  unknown = set(kwargs) - allowed
  if unknown:
    raise ValueError(f"architecture {name!r} got unknown kwargs {sorted(unknown)}; allowed "
                     f"{sorted(allowed)}")
  return build(name, rngs=rngs, **kwargs)


def default_preprocessing(input_size: int = 224, *, resize: Optional[int] = 256,
                          interpolation: str = "bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """The eval transform images must go through before the encoder: resize, center crop, normalise."""
  return {"input_size": int(input_size), "resize": None if resize is None else int(resize),
          "interpolation": interpolation, "crop": "center",
          "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _check_preprocessing(pre) -> None:
  if not isinstance(pre, dict):
    raise ValueError(f"manifest['preprocessing'] must be a dict, got {pre!r}")
  for key in ("input_size", "mean", "std"):
    if key not in pre:
      raise ValueError(f"manifest['preprocessing'] lacks {key!r} (has {sorted(pre)})")
  if len(pre["mean"]) != 3 or len(pre["std"]) != 3 or min(pre["std"]) <= 0:
    raise ValueError(f"preprocessing mean/std must be 3 values with std > 0, got {pre['mean']}, "
                     f"{pre['std']}")
  # Bounded, so an edited or hostile manifest is refused here instead of allocating gigabytes per
  # image in the first resize (the largest released encoders take 518 px).
  if not 1 <= int(pre["input_size"]) <= MAX_INPUT_SIZE:
    raise ValueError(f"preprocessing input_size must be in [1, {MAX_INPUT_SIZE}], got "
                     f"{pre['input_size']}")
  resize = pre.get("resize")
  if resize is not None and not int(pre["input_size"]) <= int(resize) <= MAX_INPUT_SIZE:
    raise ValueError(f"preprocessing resize must be None or in [input_size, {MAX_INPUT_SIZE}] (the "
                     f"centre crop is taken from the resized image), got {resize}")
  if pre.get("interpolation", "bilinear") not in RESIZE_METHODS:
    raise ValueError(f"preprocessing interpolation must be one of {RESIZE_METHODS}, got "
                     f"{pre['interpolation']!r}")


def _representation_fn(representation: Dict[str, Any]) -> Callable[[nnx.Module, jax.Array], jax.Array]:
  method = representation.get("method")
  if method == "forward":
    return lambda model, x: model(x, train=False)
  if method == "dino_representation":
    n = int(representation.get("n_last_blocks", 4))
    return lambda model, x: model.dino_representation(x, n_last_blocks=n)
  raise ValueError(f"unknown representation method {method!r}; expected one of {REPRESENTATIONS}")


def params_digest(params: nnx.State, batch_stats: nnx.State) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes, in sorted order (deterministic)."""
  h = hashlib.sha256()
  for group, state in (("params", params), ("batch_stats", batch_stats)):
    for key, value in sorted(functional.flatten_state(state).items()):
      arr = np.ascontiguousarray(np.asarray(value))
      h.update(f"{group}/{key}|{arr.dtype.str}|{arr.shape}|".encode())
      h.update(arr.tobytes())
  return h.hexdigest()


def _checkpoint_tree(params, batch_stats):
  tree = {"params": functional.state_to_nested(params)}
  if jax.tree.leaves(batch_stats):  # orbax does not store empty subtrees (ViTs have no batch stats).
    tree["batch_stats"] = functional.state_to_nested(batch_stats)
  return jax.tree.map(np.asarray, tree)


ModelOrState = Union[nnx.Module, Tuple[nnx.GraphDef, nnx.State, nnx.State]]


def save_encoder(directory: str, model_or_state: ModelOrState, manifest: Dict[str, Any], *,
                 overwrite: bool = False) -> Dict[str, Any]:
  """Writes an encoder directory and returns the full manifest written.

  `manifest` needs "preprocessing" (see default_preprocessing); optional "representation" (default
  {"method": "forward"}), "source" (where the weights came from) and anything else JSON-serialisable.
  Architecture, rep_dim, format and the parameter digest are filled in from the model.
  """
  directory = os.path.abspath(directory)
  check_replaceable(directory, overwrite=overwrite)  # before any work
  if isinstance(model_or_state, nnx.Module):
    graphdef, params, batch_stats = functional.split_model(model_or_state)
  elif isinstance(model_or_state, tuple) and len(model_or_state) == 3:
    graphdef, params, batch_stats = model_or_state
  else:
    raise ValueError("save_encoder needs an nnx.Module or a (graphdef, params, batch_stats) tuple, got "
                     f"{type(model_or_state).__name__}")
  model = nnx.merge(graphdef, params, batch_stats)
  if not hasattr(model, "architecture"):
    raise ValueError(f"{type(model).__name__} does not describe its architecture; save models made by "
                     f"create_resnet or create_vit")
  manifest = copy.deepcopy(dict(manifest))
  arch = model.architecture()
  if "architecture" in manifest and manifest["architecture"] != arch:
    raise ValueError(f"manifest architecture {manifest['architecture']} differs from the model's {arch}")
  manifest["architecture"] = arch
  manifest.setdefault("representation", {"method": "forward"})
  _check_preprocessing(manifest.get("preprocessing"))
  rep_fn = _representation_fn(manifest["representation"])
  size = int(manifest["preprocessing"]["input_size"])
  out = jax.eval_shape(lambda: rep_fn(nnx.merge(graphdef, params, batch_stats),
                                      jnp.zeros((1, size, size, 3), jnp.float32)))
  if out.ndim != 2:
    raise ValueError(f"representation {manifest['representation']} gives shape {out.shape}, not [N, D]")
  if "rep_dim" in manifest and int(manifest["rep_dim"]) != out.shape[1]:
    raise ValueError(f"manifest rep_dim {manifest['rep_dim']} differs from the model's {out.shape[1]}")
  manifest["rep_dim"] = int(out.shape[1])
  manifest["format"] = FORMAT
  manifest["params_sha256"] = params_digest(params, batch_stats)
  tree = _checkpoint_tree(params, batch_stats)

  check_replaceable(directory, overwrite=overwrite)  # again: the directory may have appeared meanwhile
  parent = os.path.dirname(directory)
  files.make_dir(parent)
  staging = files.staging_dir(parent, prefix=f".{os.path.basename(directory)}.tmp-")
  try:
    checkpoint.save_pytree(os.path.join(staging, PARAMS_DIR), tree, {"format": FORMAT})
    files.atomic_write_json(os.path.join(staging, MANIFEST), manifest)
    files.replace_dir(staging, directory)  # one atomic swap: the old or the new encoder, never neither
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def is_encoder_dir(directory: str) -> bool:
  """True if `directory` holds a manifest this module wrote (so overwriting it loses no foreign data)."""
  try:
    manifest = files.read_json(os.path.join(directory, MANIFEST))
  except (OSError, ValueError):
    return False
  return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_replaceable(directory: str, *, overwrite: bool) -> None:
  """Raises ValueError (files.PathError for path problems) unless an encoder can be written to
  `directory`: it must not exist, or (with overwrite) be an encoder directory save_encoder wrote.
  Anything else (a dataset, a home directory, a regular file) is never deleted."""
  if os.path.lexists(directory):
    if not overwrite:
      raise ValueError(f"{directory} already exists; choose a new directory or pass overwrite=True")
    if os.path.isdir(directory) and not os.path.islink(directory):
      if not is_encoder_dir(directory):
        raise files.PathError(f"output {directory} is not an encoder directory (no {MANIFEST} of "
                              f"format {FORMAT}); overwrite only replaces encoder directories, so it "
                              f"is left untouched")
      # The new encoder is staged next to it and swapped in: the parent must be writable.
      files.check_writable(os.path.dirname(directory), f"parent of output {directory}:")
      return
    kind = ("symbolic link" if os.path.islink(directory) else
            "regular file" if os.path.isfile(directory) else "special file")
    raise files.PathError(f"output {directory} is a {kind}, not an encoder directory; refusing to "
                          f"overwrite it")
  files.check_output_dir(directory, "output")


def read_manifest(directory: str) -> Dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not an encoder directory: no {MANIFEST}")
  manifest = files.read_json(path)
  if not isinstance(manifest, dict):
    raise ValueError(f"{path}: a manifest is a JSON object, got {type(manifest).__name__}")
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  for key in ("architecture", "representation", "rep_dim", "preprocessing", "params_sha256"):
    if key not in manifest:
      raise ValueError(f"{path} lacks {key!r}")
  _check_preprocessing(manifest["preprocessing"])
  return manifest


class Encoder:
  """A frozen encoder: `encoder(images)` maps NHWC float32 images, already normalised as
  `manifest["preprocessing"]` says, to representations [N, rep_dim] (a jax.Array).

  For fusing the forward into a bigger jitted function use the pure `apply_fn(params, images)` with
  `params` (a pytree holding the weights and BatchNorm statistics).
  """

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State,
               manifest: Dict[str, Any], *, precision: Optional[str] = None,
               compute_dtype: Optional[str] = None):
    self.manifest = manifest
    self.rep_dim = int(manifest["rep_dim"])
    self.input_size = int(manifest["preprocessing"]["input_size"])
    self.graphdef = graphdef
    self.params = {"params": params, "batch_stats": batch_stats}
    self.compute_dtype = jnp.dtype(compute_dtype or jnp.float32)
    if self.compute_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ValueError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype!r}")
    rep_fn = _representation_fn(manifest["representation"])
    dtype = self.compute_dtype

    def forward(variables, images):
      weights = variables["params"]
      if dtype != jnp.float32:  # mixed precision: bf16 weights and activations, BatchNorm stats in f32
        weights = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                               else a, weights)
      model = nnx.merge(graphdef, weights, variables["batch_stats"], copy=True)
      return rep_fn(model, images.astype(jnp.float32).astype(dtype)).astype(jnp.float32)

    def apply_fn(variables, images):
      if precision is None:
        return forward(variables, images)
      with jax.default_matmul_precision(precision):  # applies while tracing, also inside callers' jits
        return forward(variables, images)

    self.apply_fn = apply_fn
    self._jitted = jax.jit(apply_fn)
    # What apply_fn computes is fixed by these alone (the weights are its argument): encoders with equal
    # keys have interchangeable apply_fns, so callers may share one compiled program between them.
    self.program_key = (graphdef, json.dumps(manifest["representation"], sort_keys=True),
                        self.compute_dtype.name, precision)

  def __call__(self, images) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"encoder expects NHWC images with 3 channels, got shape {images.shape}")
    if isinstance(images, np.ndarray):
      if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"encoder expects normalised float images, got dtype {images.dtype}")
      if not np.all(np.isfinite(images)):
        raise ValueError("encoder input contains NaN or Inf")
    return self._jitted(self.params, images)

  def __repr__(self):
    return (f"Encoder({self.manifest['architecture']['name']}, rep_dim={self.rep_dim}, "
            f"input_size={self.input_size})")


def load_encoder(directory: str, *, verify: bool = True, precision: Optional[str] = None,
                 compute_dtype: Optional[str] = None) -> Encoder:
  """Loads what save_encoder (or `python -m weight_conversion.convert`) wrote.

  precision: matmul/conv precision of the forward ("highest" for float32-exact results on GPUs/TPUs,
  whose defaults use TF32/bfloat16 passes); None follows jax_default_matmul_precision. On CPU the
  default is already float32.
  compute_dtype: "bfloat16" runs the forward in mixed precision (weights and activations cast to bf16,
  BatchNorm statistics and the returned representations float32), for throughput on GPUs/TPUs; None /
  "float32" is the converted model as is. The default stays float32 everywhere: a victim's answers and
  their LSH buckets are the model's own, and bf16 moves them (tests/test_models_resnet.py bounds how
  far).
  """
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  abstract = nnx.eval_shape(lambda: build_model(manifest["architecture"], rngs=nnx.Rngs(0)))
  graphdef, abs_params, abs_stats = functional.split_model(abstract)
  params_dir = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{directory} has a manifest but no {PARAMS_DIR}/ checkpoint")
  tree, _ = checkpoint.load_pytree(params_dir)
  tree = jax.tree.map(np.asarray, dict(tree))
  if set(tree) - {"params", "batch_stats"}:
    raise ValueError(f"{params_dir}: unexpected entries {sorted(set(tree) - {'params', 'batch_stats'})}")
  where = f"{params_dir} ({manifest['architecture']['name']})"
  params = functional.state_from_flat(abs_params, functional.nested_to_flat(tree.get("params", {})),
                                      what=where)
  batch_stats = functional.state_from_flat(
      abs_stats, functional.nested_to_flat(tree.get("batch_stats", {})), what=where)
  if verify:
    digest = params_digest(params, batch_stats)
    if digest != manifest["params_sha256"]:
      raise ValueError(f"{params_dir}: parameter digest {digest[:12]}... does not match the manifest's "
                       f"{manifest['params_sha256'][:12]}...; the directory is corrupt or was edited")
  params = jax.tree.map(jnp.asarray, params)
  batch_stats = jax.tree.map(jnp.asarray, batch_stats)
  return Encoder(graphdef, params, batch_stats, manifest, precision=precision,
                 compute_dtype=compute_dtype)
