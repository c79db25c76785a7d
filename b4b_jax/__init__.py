"""b4b-jax: B4B (Bucks for Buckets) active defense against encoder stealing, in JAX/Flax.

Subpackages, each with one job:
  defense     coverage (LSH), cost (noise), per-user transforms, per-user state, DefendedEncoder API
  models      Flax ResNet / ViT encoders and `load_encoder` for converted checkpoints
  data        TFDS, ImageNet-style folders, bundled offline data, preprocessing
  attacks     stealing attacks: query protocol, losses, mappers, the stolen model's train step
  evaluation  linear probes, legit users, remapping, coverage curves, reports
  jobs        one module per `config.job`, run by `python -m b4b_jax.main` (jobs/steal.py: the attack)
  utils       metrics/progress/checkpoint/workdir/distributed helpers shared by all jobs
"""
__version__ = "0.1.0"

from b4b_jax import host_memory as _host_memory
from b4b_jax import xla_flags as _xla_flags

# Both before JAX starts its backend: multi-threaded CPU convolutions (xla_flags.py; a server adds
# its serving flags in b4b_jax.main), and, when B4B_HOST_MEMORY=keep asks for it, XLA's per-step
# buffers kept mapped (host_memory.py; b4b_jax.main does that for its jobs unless told not to).
_xla_flags.apply()
if _host_memory.requested():
  _host_memory.apply()
