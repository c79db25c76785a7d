"""TensorFlow for the input pipeline only: it must never take accelerator memory from JAX."""
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (e.g. an entry point did this first).
  pass

__all__ = ["tf"]
