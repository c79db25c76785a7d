"""Library versions recorded next to every result, so a number can be traced to its stack."""
import importlib.metadata
import platform
import sys

_PACKAGES = ("b4b-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "clu",
             "ml-collections", "numpy", "tensorflow-cpu", "tensorflow", "tensorflow-datasets",
             "scikit-learn", "torch")


def library_versions() -> dict:
  versions = {"python": sys.version.split()[0], "platform": platform.platform()}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    import jax
    versions["jax_backend"] = jax.default_backend()
    versions["jax_devices"] = jax.device_count()
    versions["jax_processes"] = jax.process_count()
  except Exception:  # pylint: disable=broad-except
    pass
  return versions
