"""An encoder's input normalisation and resize filters: what a manifest's "preprocessing" may say.

`normalize(uint8 images, spec=...)` gives the encoder's float input, (x / 255 - mean) / std as
torchvision's ToTensor + Normalize, on numpy arrays, JAX arrays (inside jit too) and TF tensors alike.
One implementation for every path: the data pipelines (b4b_jax.data re-exports it), the defended API's
uint8 entry and the service. This module never imports TensorFlow (a server start would pay seconds
for it); TF tensors are handled when TF is already loaded.
"""
import sys
from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Per-dataset normalisation constants (mean, std) of the original code (reference file, section 7.2).
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "svhn": ((0.4300, 0.4284, 0.4427), (0.1963, 0.1979, 0.1995)),
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),  # DINO's MNIST embeddings (grayscale tiled to 3 channels)
    "unit": ((0.0,) * 3, (1.0,) * 3),  # plain x / 255
}

# The resize filters a manifest may name: those b4b_jax.data.preprocess and serve.images implement.
RESIZE_METHODS = ("bilinear", "bicubic")


def normalization(spec: Any) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, std) float32 [3] from a name, a (mean, std) pair, a dict, an encoder manifest or an Encoder.

  Accepted: "imagenet" | "cifar" | "svhn" | "mnist" | "unit"; `(mean, std)`; `{"mean": ..., "std": ...}`;
  a manifest holding such a dict under "preprocessing" or "normalization" (or a name there); any object
  with a `.manifest` attribute (a loaded encoder).
  """
  if hasattr(spec, "manifest"):
    return normalization(spec.manifest)
  if isinstance(spec, str):
    if spec not in NORMALIZATION:
      raise ValueError(f"unknown normalisation {spec!r}; known: {sorted(NORMALIZATION)}")
    mean, std = NORMALIZATION[spec]
  elif isinstance(spec, Mapping):
    if "mean" in spec and "std" in spec:
      mean, std = spec["mean"], spec["std"]
    else:
      for key in ("preprocessing", "normalization"):
        if key in spec and spec[key] is not None:
          return normalization(spec[key])
      raise ValueError(f"no normalisation in {sorted(spec)}: expected 'mean' and 'std' keys, or a "
                       "'preprocessing' / 'normalization' entry holding them")
  elif isinstance(spec, (tuple, list)) and len(spec) == 2:
    mean, std = spec
  else:
    raise ValueError(f"cannot read a normalisation from {spec!r}")
  mean = np.broadcast_to(np.asarray(mean, np.float32).reshape(-1), (3,)).copy()
  std = np.broadcast_to(np.asarray(std, np.float32).reshape(-1), (3,)).copy()
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
    raise ValueError(f"normalisation needs finite mean and positive std, got mean={mean} std={std}")
  return mean, std


def normalize(images, mean=None, std=None, *, spec: Any = None):
  """uint8 [..., 3] in [0, 255] -> float32 (x / 255 - mean) / std, as ToTensor + Normalize.

  Works on numpy arrays (returns numpy), JAX arrays (also inside jit) and TF tensors. Give either
  mean and std, or `spec` (anything `normalization` reads).
  """
  if spec is not None:
    mean, std = normalization(spec)
  elif mean is None or std is None:
    raise ValueError("normalize needs mean and std, or spec=")
  else:
    mean, std = normalization((mean, std))
  tf = sys.modules.get("tensorflow")  # a TF tensor exists only where TF is loaded: never import it
  if tf is not None and isinstance(images, (tf.Tensor, tf.Variable)):
    x = tf.cast(images, tf.float32)
  elif isinstance(images, jax.Array):  # also tracers inside jit
    x = images.astype(jnp.float32)
  else:
    x = np.asarray(images).astype(np.float32)
  if x.shape[-1] != 3:
    raise ValueError(f"normalize expects RGB images [..., 3], got shape {tuple(x.shape)}")
  return (x / np.float32(255.0) - mean) / std
