"""b4b-jax: B4B (Bucks for Buckets) active defense against encoder stealing, in JAX/Flax.

Subpackages, each with one job:
  defense     coverage (LSH), cost (noise), per-user transforms, per-user state, DefendedEncoder API
  models      Flax ResNet / ViT encoders and `load_encoder` for converted checkpoints
  data        TFDS, ImageNet-style folders, bundled offline data, preprocessing, sharded batching
  attacks     stealing attacks (undefended, defended, sybil) and their training loop
  evaluation  linear probes, legit users, remapping, coverage curves, reports
  jobs        one module per `config.job`, run by `python -m b4b_jax.main`
  utils       metrics/progress/checkpoint/workdir/distributed helpers shared by all jobs
"""
import jax

# Random draws must not depend on how arrays are sharded (same result on 1 CPU or a TPU pod).
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"
