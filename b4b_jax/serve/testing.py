"""Helpers for tests and benchmarks of the service: a tiny encoder directory, a free loopback port, and
a real server process (`python -m b4b_jax.main --config=configs/serve.py:tiny ...`) that is waited for
on /healthz and killed afterwards. Loopback only."""
import os
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

import numpy as np

LOOPBACK = "127.0.0.1"


def tiny_encoder_dir(directory: str, *, input_size: int = 16, arch: str = "resnet18_w0.125",
                     seed: int = 0) -> str:
  """A random-init small ResNet saved as an encoder directory (the demo victim's shape)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    model = models.create_resnet(arch, rngs=nnx.Rngs(seed), small_input=True)
    models.save_encoder(directory, model, {
        "preprocessing": models.default_preprocessing(input_size, resize=None),
        "source": {"kind": "random init (service tests)"}})
  return directory


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((LOOPBACK, 0))
    return s.getsockname()[1]


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class ServerProcess:
  """A service process on 127.0.0.1:<port>; `stop()` (SIGTERM, graceful) or `kill()` (SIGKILL)."""

  def __init__(self, workdir: str, encoder_dir: str, *, port: Optional[int] = None,
               overrides: Optional[List[str]] = None, env: Optional[dict] = None, log_path=None,
               config: str = "configs/serve.py:tiny", keep_xla_flags: bool = False):
    self.config = config
    self.workdir, self.encoder_dir = workdir, encoder_dir
    self.port = port or free_port()
    self.overrides = list(overrides or [])
    self.env = dict(os.environ, **(env or {}))
    self.env.setdefault("JAX_PLATFORMS", "cpu")
    if not keep_xla_flags:  # one device: the served process, not the test's 8 virtual ones
      self.env.pop("XLA_FLAGS", None)
    self.log_path = log_path or os.path.join(os.path.dirname(os.path.abspath(workdir)),
                                             os.path.basename(workdir) + ".log")
    self.proc: Optional[subprocess.Popen] = None
    self.startup: dict = {}  # the last start's breakdown (seconds per phase, from /healthz)

  @property
  def url(self) -> str:
    return f"http://{LOOPBACK}:{self.port}"

  def command(self) -> List[str]:
    return [sys.executable, "-m", "b4b_jax.serve", f"--config={self.config}",
            f"--workdir={self.workdir}", f"--config.port={self.port}",
            f"--config.encoder_dir={self.encoder_dir}", *self.overrides]

  def start(self, timeout: float = 120.0, wait: bool = True, warm: bool = True) -> float:
    """Starts the process; returns the seconds until /healthz answered ok (RuntimeError if it exited).
    warm: also wait until the batch shapes are compiled (no query then pays for compiling; the
    service itself answers before, see configs/serve.py batching.serve_during_warm_up)."""
    import httpx  # pylint: disable=g-import-not-at-top
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self._log = open(self.log_path, "ab")
    t0 = time.perf_counter()
    self.proc = subprocess.Popen(self.command(), cwd=root, env=self.env, stdout=self._log,
                                 stderr=subprocess.STDOUT)
    if not wait:
      return 0.0
    while time.perf_counter() - t0 < timeout:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
      try:
        r = httpx.get(self.url + "/healthz", timeout=1.0)
        if r.status_code == 200:
          ready = time.perf_counter() - t0
          self.startup = r.json().get("startup", {})
          if warm:
            while r.json().get("warming_up") and time.perf_counter() - t0 < timeout:
              time.sleep(0.1)
              r = httpx.get(self.url + "/healthz", timeout=5.0)
            self.startup = r.json().get("startup", {})
          return ready
      except httpx.HTTPError:
        pass
      time.sleep(0.1)
    self.kill()
    raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log_tail()}")

  def wait_exit(self, timeout: float = 120.0) -> int:
    return self.proc.wait(timeout)

  def log_tail(self, chars: int = 4000) -> str:
    try:
      with open(self.log_path, "rb") as f:
        return f.read().decode(errors="replace")[-chars:]
    except OSError:
      return ""

  def kill(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
      self.proc.wait(30)

  def stop(self, timeout: float = 60.0) -> int:
    if self.proc is None or self.proc.poll() is not None:
      return self.proc.returncode if self.proc else 0
    self.proc.send_signal(signal.SIGTERM)
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise
