"""TensorFlow for the input pipeline only: it must never take accelerator memory from JAX."""
import sys

# Loading triton's native library after TensorFlow's segfaults the process (triton 3.8, TF 2.21), and
# torchvision imports triton. Nothing in b4b-jax needs triton (torch is only a CPU reference in tests
# and benchmarks), so unless triton is already loaded it is marked unavailable; torch runs without it.
if "triton" not in sys.modules:
  sys.modules["triton"] = None

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (e.g. an entry point did this first).
  pass

__all__ = ["tf"]
