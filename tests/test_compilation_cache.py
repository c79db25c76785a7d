"""The jobs' persistent compilation cache (b4b_jax/compilation_cache.py): where it lives, who wins, and
that a second process loads what the first compiled, to the same bits, and compiles afresh past a
damaged entry."""
import json
import os
import stat
import subprocess
import sys

from b4b_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw
"""


def test_host_key_names_the_cpu_model_and_its_instruction_set():
  key = compilation_cache.host_key(_ZEN4)
  assert key == compilation_cache.host_key(_ZEN4.replace("avx512f avx512bw", "avx512bw avx512f"))
  without_avx512 = _ZEN4.replace(" avx512f avx512bw", "")
  assert compilation_cache.host_key(without_avx512) != key  # another vector width: another directory
  assert compilation_cache.host_key(_ZEN4.replace("9B14", "7B13")) != key
  assert key.split("-")[0] and len(key.split("-")[1]) == 12
  assert compilation_cache.host_key("") == compilation_cache.host_key("garbage without fields")


def test_the_users_jax_directory_wins_then_ours_then_the_default(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.delenv(compilation_cache.JAX_ENV, raising=False)
  assert compilation_cache.requested_directory() == os.path.join(
      str(tmp_path / "xdg"), "b4b_jax", "xla", compilation_cache.host_key())
  monkeypatch.setenv(compilation_cache.ENV, "relative/dir")
  assert compilation_cache.requested_directory() == os.path.join(os.path.abspath("relative/dir"),
                                                                 compilation_cache.host_key())
  for off in ("none", "OFF", ""):
    monkeypatch.setenv(compilation_cache.ENV, off)
    assert compilation_cache.requested_directory() is None
  monkeypatch.setenv(compilation_cache.JAX_ENV, str(tmp_path / "jax"))
  assert compilation_cache.requested_directory() == str(tmp_path / "jax")
  assert compilation_cache.apply().startswith(str(tmp_path / "jax"))


def test_a_directory_that_cannot_be_made_turns_the_cache_off_without_failing(monkeypatch, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  (tmp_path / "a_file").write_text("not a directory")
  monkeypatch.delenv(compilation_cache.JAX_ENV, raising=False)
  monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "a_file" / "cache"))
  before = jax.config.jax_compilation_cache_dir
  line = compilation_cache.apply()
  assert line.startswith("off (") and "a_file" in line
  assert jax.config.jax_compilation_cache_dir == before


def test_use_makes_an_owner_only_bounded_cache_and_names_its_off_switch(tmp_path):
  """The serve job's path: its workdir cache gets the same mode and bound as the jobs' default one."""
  import jax  # pylint: disable=g-import-not-at-top
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_compilation_cache_max_size")
  before = {name: getattr(jax.config, name) for name in names}
  directory = str(tmp_path / "work" / "jax_cache" / compilation_cache.host_key())
  try:
    line = compilation_cache.use(directory, "persistence.compilation_cache_dir=none")
    assert line == f"{directory} (at most 1024 MiB; persistence.compilation_cache_dir=none turns it off)"
    assert jax.config.jax_compilation_cache_dir == directory
    assert jax.config.jax_compilation_cache_max_size == compilation_cache.MAX_BYTES
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  finally:  # this process's other tests keep conftest's cache
    for name, value in before.items():
      jax.config.update(name, value)
  assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


_PROGRAM = r"""
import json, sys
import jax, jax.monitoring, numpy as np
from b4b_jax import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
line = compilation_cache.apply()
@jax.jit
def f(x):
  return jax.nn.gelu(x @ x.T).sum(0)
value = np.asarray(f(np.arange(64, dtype=np.float32).reshape(8, 8) / 64))
print("RESULT" + json.dumps({"line": line, "hits": events.count("/jax/compilation_cache/cache_hits"),
                             "misses": events.count("/jax/compilation_cache/cache_misses"),
                             "value": value.tobytes().hex()}))
"""


def _run(tmp_path, **env):
  full = {k: v for k, v in os.environ.items()
          if k not in (compilation_cache.JAX_ENV, compilation_cache.ENV)}
  full.update(env, XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu",
              PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=full, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.split("RESULT")[1])


def test_a_second_process_loads_what_the_first_compiled_to_the_same_bits(tmp_path):
  directory = os.path.join(str(tmp_path / "xdg"), "b4b_jax", "xla", compilation_cache.host_key())
  first = _run(tmp_path)
  assert first["line"].startswith(directory) and "at most 1024 MiB" in first["line"]
  assert first["misses"] >= 1 and first["hits"] == 0
  assert any(name.endswith("-cache") for name in os.listdir(directory))
  assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700  # JAX runs what it holds: owner only
  second = _run(tmp_path)
  assert second["hits"] >= 1 and second["misses"] == 0
  assert second["value"] == first["value"]
  for name in os.listdir(directory):  # as a process killed while writing would leave them
    if name.endswith("-cache"):
      with open(os.path.join(directory, name), "r+b") as f:
        f.truncate(100)
  damaged = _run(tmp_path)  # JAX warns, compiles afresh, and the value is the same
  assert damaged["misses"] >= 1 and damaged["value"] == first["value"]
  off = _run(tmp_path, B4B_COMPILATION_CACHE="none")
  assert off["line"].startswith("off (") and off["hits"] == 0 and off["misses"] == 0
  assert off["value"] == first["value"]
