"""Randomly initialised encoders, written as encoder directories so they load like any other encoder.

Used for the small CPU variants (a random tiny victim, the evaluation configs' `random:<arch>` encoder)
and for the demo's "what stealing must beat" baseline.
"""
import os
from typing import Optional

from flax import nnx

from b4b_jax.models.encoder import MANIFEST, default_preprocessing, save_encoder
from b4b_jax.models.resnet import create_resnet
from b4b_jax.models.vit import create_vit


def save_random_encoder(directory: str, arch: str, *, image_size: int, seed: int,
                        small_input: bool = True, patch_size: int = 16,
                        source: Optional[dict] = None) -> str:
  """Writes a random-init `arch` ("resnet*" or "vit_*") to `directory` unless it already holds one.

  ViTs serve the DINO representation (CLS tokens of the last 4 blocks); ResNets their pooled features.
  Returns `directory`; load it with `load_encoder`.
  """
  if os.path.exists(os.path.join(directory, MANIFEST)):
    return directory
  # One jitted initialisation instead of one small compiled kernel per parameter (same values).
  if arch.startswith("vit"):
    model = nnx.jit(lambda: create_vit(arch, rngs=nnx.Rngs(seed), patch_size=patch_size,
                                       img_size=image_size))()
    representation = {"method": "dino_representation", "n_last_blocks": 4}
  else:
    model = nnx.jit(lambda: create_resnet(arch, rngs=nnx.Rngs(seed), small_input=small_input))()
    representation = {"method": "forward"}
  manifest = {"preprocessing": default_preprocessing(image_size, resize=None),
              "representation": representation,
              "source": dict(source or {}, kind=(source or {}).get("kind", "random_init"), arch=arch,
                             seed=int(seed))}
  save_encoder(directory, model, manifest, overwrite=True)
  return directory
