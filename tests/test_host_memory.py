"""host_memory: with B4B_HOST_MEMORY=keep, XLA's per-execution CPU buffers stay mapped between calls."""
import json
import os
import subprocess
import sys

import pytest

from b4b_jax import host_memory

# A jitted call whose temporaries and output (128 MiB each) are far over glibc's mmap threshold, so
# without the settings every call maps one afresh and faults its pages in again. The probe prints the
# minor faults of each of calls 20-39; PRELUDE runs before b4b_jax is imported.
_PROBE = """
import resource
PRELUDE
import b4b_jax, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x)[::-1] * jnp.cos(x) + x[::-1])
x = jnp.ones((32 * 1024 * 1024,), jnp.float32)
for _ in range(20):  # keep's heap grows over the first calls
  f(x).block_until_ready()
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("FAULTS", faults)
"""
_PAGES_PER_BUFFER = 128 * 1024 * 1024 // 4096


def _clean_env(**env):
  """This environment without any malloc, dispatch or B4B_HOST_MEMORY setting, plus env, on CPU."""
  full = {k: v for k, v in os.environ.items()
          if k not in host_memory.USER_VARIABLES + ("GLIBC_TUNABLES", host_memory.ENV)}
  full.update(env, JAX_PLATFORMS="cpu")
  return full


def _run_probe(prelude="", **env):
  out = subprocess.run([sys.executable, "-c", _PROBE.replace("PRELUDE", prelude)],
                       env=_clean_env(**env), capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.split("FAULTS")[1]), out.stderr


def test_keep_keeps_buffers_mapped_default_does_not_and_the_users_own_setting_wins():
  kept, _ = _run_probe(B4B_HOST_MEMORY="keep")
  default, _ = _run_probe()  # the control: glibc's own behaviour, a buffer faulted in per call
  users_malloc, _ = _run_probe(B4B_HOST_MEMORY="keep", MALLOC_ARENA_MAX="8")
  users_dispatch, _ = _run_probe(B4B_HOST_MEMORY="keep", JAX_CPU_ENABLE_ASYNC_DISPATCH="true")
  for faults in (default, users_malloc, users_dispatch):
    assert min(faults) > _PAGES_PER_BUFFER // 2, faults
  # Every call: only the calling thread allocates from the main arena, so its heap settles early
  # (70 runs of 40-60 calls in session 20: the last fault at call 14, none in calls 20-39).
  assert max(kept) < _PAGES_PER_BUFFER // 50, (kept, default)


def test_keep_changes_nothing_and_says_so_when_jax_started_first():
  faults, stderr = _run_probe("import jax; jax.devices()", B4B_HOST_MEMORY="keep")
  assert "B4B_HOST_MEMORY=keep: JAX's backends started before b4b_jax was imported" in stderr
  assert min(faults) > _PAGES_PER_BUFFER // 2, faults


@pytest.mark.parametrize("config,env,expected", [
    ("embeddings.py:tiny", {}, "host memory: kept mapped"),
    ("embeddings.py:tiny", {"B4B_HOST_MEMORY": "default"}, "host memory: unchanged"),
    ("serve.py:tiny", {}, "host memory: unchanged"),
])
def test_the_command_line_keeps_buffers_mapped_for_every_job_but_a_server(tmp_path, config, env,
                                                                         expected):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")  # an unusable workdir: the run logs its settings, then stops with an error
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "b4b_jax.main", f"--config={root}/configs/{config}",
                        f"--workdir={not_a_dir}"], cwd=root, env=_clean_env(**env), capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 1 and "error:" in out.stderr, out.stderr[-2000:]
  assert expected in out.stderr, out.stderr[-2000:]


def test_an_unknown_value_is_an_error_naming_the_variable(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "yes")
  with pytest.raises(ValueError, match="B4B_HOST_MEMORY='yes'"):
    host_memory.requested()
  monkeypatch.setenv(host_memory.ENV, "keep")
  assert host_memory.requested()
  monkeypatch.delenv(host_memory.ENV)
  assert not host_memory.requested()


def test_settings_are_skipped_when_the_environment_tunes_malloc_or_dispatch(monkeypatch):
  for name in host_memory.USER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert host_memory.users_own_settings()
  assert host_memory.apply() is False
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=512")
  monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
  assert host_memory.apply() is False
  monkeypatch.delenv("MALLOC_MMAP_MAX_")
  assert not host_memory.users_own_settings()
  monkeypatch.setenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", "false")
  assert host_memory.apply() is False
