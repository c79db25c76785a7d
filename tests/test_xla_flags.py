"""xla_flags: importing b4b_jax gives XLA's CPU runtime multi-threaded (Eigen) convolutions."""
import os
import subprocess
import sys
import warnings

import pytest

from b4b_jax import xla_flags

_PROBE = """
import os, warnings
warnings.simplefilter("error" if os.environ.get("PROBE_STRICT") else "default")
if os.environ.get("PROBE_START_JAX_FIRST"):
  import jax; jax.devices()
import b4b_jax, jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.ones((8, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print("FLAGS", os.environ["XLA_FLAGS"])
print("YNN_CONV", "ynn_fusion" in hlo)
"""


def _probe(xla_flags_env, **env):
  full = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  full.update(env, JAX_PLATFORMS="cpu")
  if xla_flags_env is not None:
    full["XLA_FLAGS"] = xla_flags_env
  out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True,
                       timeout=120, check=False)
  return out


def test_import_appends_the_flag_and_xla_compiles_convolutions_outside_ynnpack():
  out = _probe("--xla_force_host_platform_device_count=2", PROBE_STRICT="1")
  assert out.returncode == 0, out.stderr
  assert f"FLAGS --xla_force_host_platform_device_count=2 {xla_flags.FLAG}" in out.stdout
  assert "YNN_CONV False" in out.stdout


def test_the_users_own_setting_wins():
  mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"  # the default list again
  out = _probe(mine)
  assert out.returncode == 0, out.stderr
  assert f"FLAGS {mine}\n" in out.stdout
  assert "YNN_CONV True" in out.stdout  # the control: the probe can see YNNPACK's convolutions


def test_a_backend_started_before_the_import_is_named_in_a_warning():
  out = _probe(None, PROBE_START_JAX_FIRST="1")
  assert out.returncode == 0, out.stderr
  assert "RuntimeWarning" in out.stderr and "import b4b_jax first" in out.stderr
  assert "YNN_CONV True" in out.stdout  # and the flag indeed did not apply


def test_apply_is_idempotent(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # this process's backend may have started already
    assert xla_flags.apply() is True
    once = os.environ["XLA_FLAGS"]
    assert xla_flags.apply() is False
  assert os.environ["XLA_FLAGS"] == once and once.count(xla_flags.FLAG) == 1


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
