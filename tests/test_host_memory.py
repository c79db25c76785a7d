"""host_memory: with B4B_HOST_MEMORY=keep, XLA's per-execution CPU buffers stay mapped between calls;
with the serving settings, a thread's malloc heaps stay mapped once grown."""
import json
import os
import subprocess
import sys

import pytest

from b4b_jax import host_memory

# A jitted call whose temporaries and output (128 MiB each) are far over glibc's mmap threshold, so
# without the settings every call maps one afresh and faults its pages in again. The probe prints the
# minor faults of each of calls 30-49; PRELUDE runs before b4b_jax is imported.
_PROBE = """
import resource
PRELUDE
import b4b_jax, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x)[::-1] * jnp.cos(x) + x[::-1])
x = jnp.ones((32 * 1024 * 1024,), jnp.float32)
for _ in range(30):  # keep's heap grows over the first calls
  f(x).block_until_ready()
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("FAULTS", faults)
"""
_PAGES_PER_BUFFER = 128 * 1024 * 1024 // 4096

# One thread's arena set up as the defense step's worker thread found it (session 34): what it holds
# leaves its first 64 MiB heap too little room for a 9 MiB buffer, so glibc maps a new heap for each
# one and, by default, unmaps it when the buffer is freed. Plain malloc and free through ctypes, so
# that nothing else allocates there between calls, and without transparent huge pages (prctl
# PR_SET_THP_DISABLE), so that a page is 4 KiB whatever the host's THP mode. Prints the worker
# thread's minor faults per call.
_HEAP_PROBE = """
import ctypes, resource, threading
PRELUDE
libc = ctypes.CDLL(None)
assert libc.prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
MiB = 1 << 20
faults = []

def filled(n):
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  return p

def worker():
  libc.free(filled(16 * MiB))  # a freed mapped chunk: glibc's dynamic mmap threshold rises to 16 MiB
  held = [filled(7 * MiB) for _ in range(8)]  # 56 MiB of the thread's first heap
  for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    libc.free(filled(9 * MiB))
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
  for p in held:
    libc.free(p)

thread = threading.Thread(target=worker)
thread.start()
thread.join()
print("FAULTS", faults[5:])
"""
_PAGES_PER_HEAP_BUFFER = 9 * 1024 * 1024 // 4096


def _clean_env(**env):
  """This environment without any malloc, dispatch or B4B_HOST_MEMORY setting, plus env, on CPU."""
  full = {k: v for k, v in os.environ.items()
          if k not in host_memory.USER_VARIABLES + ("GLIBC_TUNABLES", host_memory.ENV)}
  full.update(env, JAX_PLATFORMS="cpu")
  return full


def _run_probe(prelude="", probe=_PROBE, **env):
  out = subprocess.run([sys.executable, "-c", probe.replace("PRELUDE", prelude)],
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
  # Only the calling thread allocates XLA's buffers from the main arena, so its heap settles early,
  # but not always for good: small allocations landing between the big buffers can make it grow by
  # one buffer late (CI's environment, 8 virtual devices, session 39: in 25 runs of 60 calls the last
  # growth came by call 9 in 21, at calls 14 and 15, 18 and 32 in the others; CI's stop 51 saw one
  # in calls 20-39). So a few calls of 20 may fault a buffer in; by default every call does.
  faulting = [f for f in kept if f > _PAGES_PER_BUFFER // 50]
  assert len(faulting) <= 3, (kept, default)


def test_keep_changes_nothing_and_says_so_when_jax_started_first():
  faults, stderr = _run_probe("import jax; jax.devices()", B4B_HOST_MEMORY="keep")
  assert "B4B_HOST_MEMORY=keep: JAX's backends started before b4b_jax was imported" in stderr
  assert min(faults) > _PAGES_PER_BUFFER // 2, faults


def test_serving_keeps_a_threads_heap_that_a_buffer_did_not_fit_beside():
  default, _ = _run_probe(probe=_HEAP_PROBE)  # the control: a heap mapped and faulted in per call
  serving, _ = _run_probe("from b4b_jax import host_memory\nassert host_memory.apply_serving()",
                          probe=_HEAP_PROBE)
  assert min(default) > _PAGES_PER_HEAP_BUFFER // 2, default
  assert max(serving) < _PAGES_PER_HEAP_BUFFER // 50, (serving, default)


def test_serving_settings_give_way_to_keep_and_to_the_users_own(monkeypatch):
  for name in host_memory.USER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host_memory, "_applied", True)  # keep's settings already hold
  assert host_memory.apply_serving() is False
  monkeypatch.setattr(host_memory, "_applied", False)
  monkeypatch.setenv(host_memory.ENV, "default")  # the user chose glibc's own behaviour
  assert host_memory.apply_serving() is False
  monkeypatch.delenv(host_memory.ENV)
  monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
  assert host_memory.apply_serving() is False
  assert "heaps kept" not in host_memory.describe()


@pytest.mark.parametrize("config,env,expected", [
    ("embeddings.py:tiny", {}, "host memory: kept mapped"),
    ("embeddings.py:tiny", {"B4B_HOST_MEMORY": "default"}, "host memory: unchanged"),
    ("serve.py:tiny", {}, "host memory: heaps kept"),
    ("serve.py:tiny", {"B4B_HOST_MEMORY": "default"}, "host memory: unchanged"),
])
def test_the_command_line_keeps_buffers_mapped_for_every_job_and_a_servers_heaps(tmp_path, config, env,
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
