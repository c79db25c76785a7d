"""Test-wide set-up. 8 virtual CPU devices so data-parallel code is tested as it runs on 8 chips.

XLA_FLAGS must be set before JAX initialises its backend; .ci/run exports the same value.
"""
import atexit
import gc
import os
import shutil
import sys
import tempfile

# PyPI's torch 2.14.1 ships triton, whose native library segfaults the process when TensorFlow was
# loaded first (tf.data, clu). torch/torchvision/timm run on CPU without it, so tests never load it.
sys.modules.setdefault("triton", None)

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent compilation cache for the whole session, fresh each session and removed at exit (so
# every CI run still compiles every program once). Tests rebuild identical programs: the fixture below
# clears JAX's in-memory caches after each module, and several modules run the same tiny models and
# jobs. Set through the environment before JAX is imported, so child processes (the rehearsal's rows,
# the device script's smoke run) share it; a test or job that names its own cache keeps its own.
# Cached entries are the compiled programs themselves: no value changes. Fresh clone, `bash .ci/run`,
# quiet: 1232 s without it (session 27), 1093 s with it (session 28).
_COMPILED = tempfile.mkdtemp(prefix="b4b-jax-test-compiled-")
atexit.register(shutil.rmtree, _COMPILED, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILED)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Exact float32 matmuls everywhere in tests (numeric references are compared at full precision).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees every compiled XLA program after each test module. Each live CPU executable holds about
  three memory mappings (its JIT code and data), and jit caches keep them alive for the whole pytest
  process: three modules (defense core, defense API, steal) left 15,555 mappings, and a full suite
  passed Linux's vm.max_map_count (65,530), where the next compile's mmap failed and XLA segfaulted
  (CI, 2 Dec 2026: exit 139 inside backend_compile_and_load, in whichever test compiled next).
  Cleared after each module: 8,427 -> 1,874 mappings, the same three modules passing."""
  yield
  jax.clear_caches()
  gc.collect()


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
