"""Test-wide set-up. 8 virtual CPU devices so data-parallel code is tested as it runs on 8 chips.

XLA_FLAGS must be set before JAX initialises its backend; .ci/run exports the same value.
"""
import os
import sys

# PyPI's torch 2.14.1 ships triton, whose native library segfaults the process when TensorFlow was
# loaded first (tf.data, clu). torch/torchvision/timm run on CPU without it, so tests never load it.
sys.modules.setdefault("triton", None)

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Exact float32 matmuls everywhere in tests (numeric references are compared at full precision).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def fast_compiles():
  """For modules of tiny shapes, where compile time dominates: XLA's optimisation passes off for the
  module, restored afterwards (use with `pytestmark = pytest.mark.usefixtures("fast_compiles")`)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def pytest_configure(config):
  # `slow`: tests that take minutes (the README rehearsal). .ci/run runs them all; by hand,
  # `-m "not slow"` leaves them out.
  config.addinivalue_line("markers", "slow: takes minutes; .ci/run still runs it")
