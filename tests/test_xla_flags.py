"""xla_flags: importing b4b_jax gives XLA's CPU runtime multi-threaded (Eigen) convolutions; a serving
process also gets interleaved vector loops (the defense noise's inverse CDF, four iterations per trip)
as wide as the CPU's registers (16 lanes with AVX-512), and answers exactly what any other process
computes."""
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


# The noise's inverse-CDF kernel, compiled with XLA's dumps on: how many vector square roots its
# optimised LLVM IR calls (one per iteration in the loop body; 4 when interleaved 4 times) and how many
# lanes each has (8 at XLA's default 256-bit width; 16 at 512 bits, on a CPU with AVX-512).
_NOISE_PROBE = """
import glob, os, re
import b4b_jax, jax, jax.numpy as jnp
from b4b_jax import xla_flags
from b4b_jax.defense import noise
if os.environ.get("PROBE_SERVING"):
  xla_flags.apply(serving=True)
print("FLAGS", os.environ["XLA_FLAGS"])
jax.jit(noise._normal_from_packed)(jnp.ones((64, 2048), jnp.uint32)).block_until_ready()
ir = "".join(open(p).read() for p in glob.glob(os.environ["DUMP"] + "/*normal_from_packed*with-opt.ll"))
lanes = re.findall(r"call <(\\d+) x float> @llvm\\.sqrt\\.v\\d+f32\\(", ir)
print("SQRT_CALLS", len(lanes))
print("LANES", ",".join(sorted(set(lanes))))
"""

# What the served API answers, as a digest: the noise and three calls of the served default (hardened,
# diag_affine transforms) for 5 accounts mixed in one batch.
_SERVED_PROBE = """
import hashlib, os
import numpy as np
import b4b_jax, jax
from b4b_jax import defense, xla_flags
from b4b_jax.defense import keys, noise
if os.environ.get("PROBE_SERVING"):
  xla_flags.apply(serving=True)
print("FLAGS", os.environ["XLA_FLAGS"])
digest = hashlib.sha256()
row_keys = keys.fold_in_rows(jax.random.key_data(jax.random.key(3)), np.arange(256, dtype=np.uint32))
digest.update(np.asarray(noise.standard_normal(row_keys, 512)).tobytes())
api = defense.DefendedEncoder(None, defense.defense_config("simsiam", hardened=True,
                                                           transform="diag_affine"), 512)
reps = np.random.default_rng(0).normal(size=(64, 512)).astype(np.float32)
users = [f"user{i % 5}" for i in range(64)]
for call in range(3):
  result = api.query_representations(users, reps + call)
  for array in (result.reps, result.sigma, result.coverage, result.buckets):
    digest.update(np.ascontiguousarray(array).tobytes())
print("DIGEST", digest.hexdigest())
"""


def _avx512() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return " avx512f" in f.read()
  except OSError:
    return False


def _probe(xla_flags_env, script=_PROBE, **env):
  full = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  full.update(env, JAX_PLATFORMS="cpu")
  if xla_flags_env is not None:
    full["XLA_FLAGS"] = xla_flags_env
  out = subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True,
                       timeout=120, check=False)
  return out


def test_import_appends_the_flags_and_xla_compiles_convolutions_outside_ynnpack():
  out = _probe("--xla_force_host_platform_device_count=2", PROBE_STRICT="1")
  assert out.returncode == 0, out.stderr
  assert f"FLAGS --xla_force_host_platform_device_count=2 {' '.join(xla_flags.FLAGS)}\n" in out.stdout
  assert not set(xla_flags.SERVING_FLAGS) & set(xla_flags.FLAGS)
  assert "YNN_CONV False" in out.stdout


def test_a_serving_process_interleaves_the_noise_loop_unless_the_user_sets_backend_options(tmp_path):
  def sqrt_calls(name, xla_flags_env="", **env):
    dump = tmp_path / name
    out = _probe(f"--xla_dump_to={dump} {xla_flags_env}".strip(), _NOISE_PROBE, DUMP=str(dump), **env)
    assert out.returncode == 0, out.stderr
    return out.stdout

  wide = "LANES 16\n" if _avx512() else "LANES 8\n"  # without AVX-512 the width flag changes nothing
  out = sqrt_calls("serving", PROBE_SERVING="1")
  assert all(flag in out for flag in xla_flags.SERVING_FLAGS) and "SQRT_CALLS 4\n" in out, out
  assert wide in out, out
  out = sqrt_calls("import_only")  # importing b4b_jax alone leaves LLVM's own choice: one per trip
  assert not any(flag in out for flag in xla_flags.SERVING_FLAGS) and "SQRT_CALLS 1\n" in out, out
  assert "LANES 8\n" in out, out
  mine = "--xla_backend_extra_options=-force-vector-interleave=1"
  out = sqrt_calls("mine", mine, PROBE_SERVING="1")
  assert "force-vector-interleave=4" not in out and "SQRT_CALLS 1\n" in out and wide in out, out
  mine = "--xla_cpu_prefer_vector_width=256"  # XLA's default width, kept: interleaved, 8 lanes
  out = sqrt_calls("mine_width", mine, PROBE_SERVING="1")
  assert "prefer_vector_width=512" not in out and "SQRT_CALLS 4\n" in out and "LANES 8\n" in out, out


def test_the_serving_flags_change_no_value_the_api_answers():
  digests = []
  for serving in ("1", ""):
    out = _probe("", _SERVED_PROBE, PROBE_SERVING=serving)
    assert out.returncode == 0, out.stderr
    assert all((flag in out.stdout) == bool(serving) for flag in xla_flags.SERVING_FLAGS), out.stdout
    digests.append(next(line for line in out.stdout.splitlines() if line.startswith("DIGEST ")))
  assert digests[0] == digests[1]


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
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # this process's backend may have started already
    assert xla_flags.apply() is True
    once = os.environ["XLA_FLAGS"]
    assert xla_flags.apply() is False
    assert os.environ["XLA_FLAGS"] == once
    assert xla_flags.apply(serving=True) is True
    twice = os.environ["XLA_FLAGS"]
    assert xla_flags.apply(serving=True) is False and xla_flags.apply() is False
  assert os.environ["XLA_FLAGS"] == twice
  assert all(twice.count(flag) == 1 for flag in xla_flags.FLAGS + xla_flags.SERVING_FLAGS)


@pytest.mark.parametrize("platforms,cpu_only", [("cpu", True), ("cuda", False), ("cpu,tpu", False),
                                                (" cpu ", True)])
def test_the_serving_flags_are_left_out_where_an_accelerator_may_compile(monkeypatch, platforms,
                                                                         cpu_only):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert xla_flags.cpu_only() is cpu_only
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert xla_flags.apply(serving=True) is True
  expected = xla_flags.FLAGS + (xla_flags.SERVING_FLAGS if cpu_only else ())
  assert os.environ["XLA_FLAGS"].split() == list(expected)


@pytest.mark.parametrize("platform,user_flags,expected", [
    ("cpu", "", xla_flags.TRAINING_OPTIONS),
    ("cpu", "--xla_force_host_platform_device_count=8", xla_flags.TRAINING_OPTIONS),
    ("gpu", "", {}),
    ("tpu", "", {}),
    ("cpu", "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT", {}),
    ("cpu", "--xla_cpu_enable_concurrency_optimized_scheduler=true", {}),
])
def test_training_options_on_cpu_only_and_never_over_the_users_choice(monkeypatch, platform, user_flags,
                                                                      expected):
  monkeypatch.setenv("XLA_FLAGS", user_flags)
  assert xla_flags.training_options(platform) == expected
  assert xla_flags.TRAINING_OPTIONS == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
