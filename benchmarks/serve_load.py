r"""Load benchmark of the served API: 64 concurrent clients on loopback vs the in-process API.

  python -m benchmarks.serve_load                  # 64 clients, 16 accounts, 4096 requests (~1 min)
  python -m benchmarks.serve_load --tiny           # 16 clients, 160 requests, for a smoke check
  python -m benchmarks.serve_load --encoder_dir=DIR   # any encoder directory (default: a random-init
                                                   # resnet18_w0.25 at 16 px, the demo victim's shape)

A server (configs/serve.py, default defense) starts on 127.0.0.1 in a subprocess. Clients send a fixed
number of requests, mixed over accounts: 3/4 small (1-4 images as PNG files, multipart) and 1/4 large
(64 images as one uint8 npy), answers as npy; every request is encoded before the load phase and each
client sends its requests one after another on one keep-alive connection (asyncio streams, no HTTP
library: the clients share the machine with the server, so they must cost little, and the output says
how much of a core they used). Printed: served images/s and requests/s, latency p50/p99, errors; the
server's resident memory after the load phase, its peak and its page faults during the load; the
in-process DefendedEncoder's images/s on the same encoder at the batch size the server formed (mean of
its micro-batches) and at its row budget, measured before and after the served run in this process (the
median of 30 timed calls each, compiled with the server's XLA flags); and the served / in-process ratio
(target >= 0.7). Finally the server is stopped and every account's state (occupancy bits, bucket counts,
query count) is compared with a recomputation from what the clients sent. Never asserts a time; the
machine's other load shows in the figures.
"""
import argparse
import asyncio
import io
import os
import re
import tempfile
import time

import numpy as np

from b4b_jax import defense
from b4b_jax import host_memory
from b4b_jax import xla_flags
from b4b_jax.serve import images as images_lib
from b4b_jax.serve import service as service_lib
from b4b_jax.serve import store as store_lib
from b4b_jax.serve import testing


def _bodies(args, accounts):
  rng = np.random.default_rng(0)
  out = []
  for i in range(args.requests):
    account = accounts[int(rng.integers(len(accounts)))]
    large = rng.random() < args.large_fraction
    n = args.large_rows if large else int(rng.integers(1, 5))
    images = testing.random_images(n, args.image_size, seed=i)
    if large:
      body = {"content": images_lib.encode_npy(images), "headers": {"Content-Type": "application/x-npy"}}
    else:
      body = {"files": [("image", (f"{j}.png", images_lib.encode_png(im), "image/png"))
                        for j, im in enumerate(images)]}
    out.append((account, images, body))
  return out


def _multipart(files) -> tuple:
  """(content type, body bytes) of a multipart/form-data body of (field, (filename, data, type))."""
  boundary = "b4b-serve-load-boundary"
  parts = []
  for field, (filename, data, kind) in files:
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                 f'filename="{filename}"\r\nContent-Type: {kind}\r\n\r\n'.encode() + data + b"\r\n")
  return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def _request_bytes(host: str, key: str, body: dict) -> bytes:
  """The whole HTTP/1.1 POST /v1/embeddings request, encoded once before the load phase."""
  if "files" in body:
    content_type, content = _multipart(body["files"])
  else:
    content_type, content = body["headers"]["Content-Type"], body["content"]
  head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
          f"Accept: application/x-npy\r\nContent-Type: {content_type}\r\n"
          f"Content-Length: {len(content)}\r\n\r\n")
  return head.encode() + content


class _Connection:
  """One keep-alive HTTP/1.1 connection to host:port, opened on first use and again after a close.
  Responses must carry Content-Length (the service's do); each exchange is bounded by `timeout`
  seconds (httpx's bound before these clients), so a stuck server cannot hang the benchmark."""

  def __init__(self, host: str, port: int, timeout: float = 120.0):
    self.host, self.port, self.timeout = host, port, timeout
    self.reader = self.writer = None

  async def exchange(self, request: bytes):
    """Sends one encoded request; returns (status, body)."""
    return await asyncio.wait_for(self._exchange(request), self.timeout)

  async def _exchange(self, request: bytes):
    if self.writer is None:
      self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
    self.writer.write(request)
    await self.writer.drain()
    head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {k.strip().lower(): v.strip()
               for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
    if "content-length" not in headers:
      raise ValueError(f"response without Content-Length: {head[0]} {sorted(headers)}")
    body = await self.reader.readexactly(int(headers["content-length"]))
    if headers.get("connection", "").lower() == "close":
      self.close()
    return status, body

  def close(self):
    if self.writer is not None:
      self.writer.close()
    self.reader = self.writer = None


async def _run_load(url, keys, bodies, clients, duration):
  """Each of `clients` workers keeps one HTTP/1.1 connection open and sends requests one after another.
  The requests are encoded beforehand and sent over asyncio streams: an httpx client spent most of one
  core building multipart bodies and parsing answers (93 % CPU at 120 requests/s on the 2-core CPU,
  beside a server at 73 %), so the figure measured the client as much as the service."""
  host, port = url.split("//", 1)[1].rsplit(":", 1)
  requests = [_request_bytes(f"{host}:{port}", keys[account], body) for account, _, body in bodies]
  results = [None] * len(bodies)
  next_index = [0]
  t_end = time.perf_counter() + duration

  async def worker():
    connection = _Connection(host, int(port))
    while next_index[0] < len(bodies) and time.perf_counter() < t_end:
      i = next_index[0]
      next_index[0] += 1
      t0 = time.perf_counter()
      try:
        status, content = await connection.exchange(requests[i])
        if status == 200:
          np.load(io.BytesIO(content))
      except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        status = type(e).__name__
        print(f"[serve_load] request {i} ({bodies[i][0]}, {len(bodies[i][1])} images) failed after "
              f"{time.perf_counter() - t0:.2f} s: {type(e).__name__}: {e}")
        connection.close()
      results[i] = (status, time.perf_counter() - t0)
    connection.close()

  t0, cpu0 = time.perf_counter(), time.process_time()
  await asyncio.gather(*[worker() for _ in range(clients)])
  seconds = time.perf_counter() - t0
  return results, seconds, (time.process_time() - cpu0) / seconds


def _in_process(encoder_dir, config, batch, accounts, calls, image_size):
  """images/s of the in-process API at `batch` rows a call, from the median of `calls` timed calls
  (after one that compiles), so that one slow call (a collection, another process) does not move it.
  It still moves with the machine between measurements (at batch 256: 8,900-13,600 images/s across
  this session's runs, before vs after in one run up to 35 % apart), hence both are printed."""
  api = defense.DefendedEncoder.from_encoder_dir(encoder_dir, config.defense, capacity=config.capacity)
  images = testing.random_images(batch, image_size, seed=99)
  users = [accounts[i % len(accounts)] for i in range(batch)]
  api.query_mixed(users, images)  # compile
  seconds = []
  for _ in range(calls):
    t0 = time.perf_counter()
    api.query_mixed(users, images)
    seconds.append(time.perf_counter() - t0)
  return batch / float(np.median(seconds))


def _mean_batch(metrics_text):
  total = float(re.search(r"^b4b_batch_rows_sum ([0-9.e+]+)", metrics_text, re.M).group(1))
  count = float(re.search(r"^b4b_batch_rows_count ([0-9.e+]+)", metrics_text, re.M).group(1))
  return total / max(count, 1.0), int(count)


def _mean(metrics_text, name, labels=""):
  """sum / count of a Prometheus histogram in /metrics text (0 when it has no observations)."""
  found = {}
  for part in ("sum", "count"):
    m = re.search(rf"^{name}_{part}{re.escape(labels)} ([0-9.e+-]+)", metrics_text, re.M)
    found[part] = float(m.group(1)) if m else 0.0
  return found["sum"] / found["count"] if found["count"] else 0.0


def _request_profile(metrics_text) -> str:
  """Where an embeddings request's latency went, from the server's own histograms (means): decode
  (auth + image decoding on a worker thread), queue wait (enqueued -> its batch's device call starts),
  device (the batch's encoder + defense call) and commit (the device call's end -> the batch's
  journal commit); "other" is the rest of the server-side latency (reading the body, the worker-thread
  hops, writing the answer). Device and commit are per batch: each request waits for its whole
  batch's."""
  total = _mean(metrics_text, "b4b_request_seconds", '{endpoint="/v1/embeddings"}')
  parts = {"decode": _mean(metrics_text, "b4b_decode_seconds"),
           "queue wait": _mean(metrics_text, "b4b_queue_wait_seconds"),
           "device": _mean(metrics_text, "b4b_device_seconds"),
           "commit": _mean(metrics_text, "b4b_journal_commit_seconds")}
  parts["other"] = max(0.0, total - sum(parts.values()))
  return (f"mean server-side latency {1000 * total:.1f} ms = " +
          " + ".join(f"{k} {1000 * v:.1f} ms ({100 * v / max(total, 1e-12):.0f}%)"
                     for k, v in parts.items()))


def _server_memory(pid) -> dict:
  """The server's resident and peak resident MB and its minor page faults so far (Linux /proc; {}
  elsewhere)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      status = f.read()
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return {}
  mb = {k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}
  minor_faults = int(stat.rsplit(")", 1)[1].split()[7])  # field 10 of proc(5)'s stat, after the name
  return {"resident_mb": mb["VmRSS"], "peak_mb": mb["VmHWM"], "minor_faults": minor_faults}


def _memory_line(before, after, num_batches, server_log) -> str:
  """The server's memory over the load phase, and its host memory setting as its log states it."""
  found = re.search(r"host memory: ([^(\n]*?) \(", server_log)
  setting = f"host memory: {found.group(1) if found else 'not logged'}"
  if not before or not after:
    return f"server memory n/a (no /proc; {setting})"
  faults = after["minor_faults"] - before["minor_faults"]
  return (f"server resident {after['resident_mb']:.0f} MB after the load phase (peak "
          f"{after['peak_mb']:.0f} MB); {faults:,} minor page faults during it, "
          f"{faults / max(num_batches, 1):,.0f} per micro-batch ({setting})")


def _load() -> str:
  return "load " + " ".join(open("/proc/loadavg").read().split()[:3])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--encoder_dir", default="")
  p.add_argument("--workdir", default="")
  p.add_argument("--clients", type=int, default=64)
  p.add_argument("--accounts", type=int, default=16)
  p.add_argument("--requests", type=int, default=4096)
  p.add_argument("--duration", type=float, default=600.0, help="cap on the load phase (s)")
  p.add_argument("--large_fraction", type=float, default=0.25)
  p.add_argument("--large_rows", type=int, default=64)
  p.add_argument("--max_rows", type=int, default=256)
  p.add_argument("--image_size", type=int, default=16)
  p.add_argument("--cache_dir", default="", help="JAX compilation cache shared between runs")
  args = p.parse_args()
  if args.tiny:
    args.clients, args.requests, args.accounts = 16, 160, 4
  root = args.workdir or tempfile.mkdtemp(prefix="b4b-serve-load-")
  encoder_dir = args.encoder_dir or testing.tiny_encoder_dir(
      os.path.join(root, "encoder"), input_size=args.image_size, arch="resnet18_w0.25")
  workdir = os.path.join(root, "work")
  os.makedirs(workdir, exist_ok=True)
  from configs import serve as serve_config  # pylint: disable=g-import-not-at-top
  config = serve_config.get_config()
  overrides = {"encoder_dir": encoder_dir, "capacity": 64, "batching.max_rows": args.max_rows,
               "limits.max_rows_per_request": args.max_rows}
  if args.cache_dir:
    overrides["persistence.compilation_cache_dir"] = args.cache_dir
  config.unlock()
  config.capacity = 64
  accounts = [f"user{i:02d}" for i in range(args.accounts)]
  st = store_lib.Store(os.path.join(workdir, store_lib.DB_NAME))
  keys = {a: st.create_key(a)[1] for a in accounts}
  st.close()
  bodies = _bodies(args, accounts)
  rows_sent = sum(len(b[1]) for b in bodies)
  print(f"[serve_load] {args.requests} requests ({rows_sent} images) from {args.clients} clients over "
        f"{args.accounts} accounts; encoder {encoder_dir}")

  before = _in_process(encoder_dir, config, args.max_rows, accounts, 30, args.image_size)
  proc = testing.ServerProcess(workdir, encoder_dir, config="configs/serve.py",
                               overrides=[f"--config.{k}={v}" for k, v in overrides.items()])
  import httpx  # pylint: disable=g-import-not-at-top
  try:
    start_s = proc.start(timeout=900)
    memory_before = _server_memory(proc.proc.pid)
    results, seconds, client_cpu = asyncio.run(_run_load(proc.url, keys, bodies, args.clients,
                                                         args.duration))
    metrics = httpx.get(proc.url + "/metrics").text
    load_during_run = _load()
    memory_after = _server_memory(proc.proc.pid)
  finally:
    code = proc.stop()
  mean_batch, num_batches = _mean_batch(metrics)
  batch = max(8, int(round(mean_batch)))
  after_mean = _in_process(encoder_dir, config, batch, accounts, 30, args.image_size)
  after = _in_process(encoder_dir, config, args.max_rows, accounts, 30, args.image_size)

  done = [(i, r) for i, r in enumerate(results) if r is not None]
  ok = [i for i, r in done if r[0] == 200]
  errors = [r[0] for _, r in done if r[0] != 200]
  lat = np.asarray([r[1] for _, r in done if r[0] == 200])
  served_rows = sum(len(bodies[i][1]) for i in ok)
  served = served_rows / seconds
  inproc = (before + after) / 2
  print(f"[serve_load] server start {start_s:.1f} s (to /healthz); exit status {code}")
  print(f"[serve_load] served:     {served:8.1f} images/s  {len(ok) / seconds:7.1f} requests/s  "
        f"p50 {1000 * np.percentile(lat, 50):7.1f} ms  p99 {1000 * np.percentile(lat, 99):7.1f} ms  "
        f"errors {len(errors)} {sorted(set(map(str, errors)))[:5]}  ({len(done)}/{len(bodies)} sent in "
        f"{seconds:.1f} s; {load_during_run}; the clients' process used {100 * client_cpu:.0f} % of a "
        f"core)")
  print(f"[serve_load] {_memory_line(memory_before, memory_after, num_batches, proc.log_tail(10**6))}")
  print(f"[serve_load] micro-batches: {num_batches}, mean {mean_batch:.1f} rows")
  print(f"[serve_load] request profile: {_request_profile(metrics)}  ({_load()})")
  print(f"[serve_load] in-process: {before:8.1f} images/s before, {after:8.1f} after (batch "
        f"{args.max_rows}); {after_mean:8.1f} at the served mean batch {batch}  ({_load()})")
  print(f"[serve_load] served / in-process (batch {args.max_rows}) = {served / inproc:.2f}; "
        f"/ in-process at batch {batch} = {served / after_mean:.2f}   (target >= 0.70)")

  # Every account's state vs a recomputation from what the clients sent (answered requests).
  svc = service_lib.Service(config, workdir, encoder_dir)
  svc.open()
  users, arrays = svc.state_arrays()
  svc.close()
  ref = defense.DefendedEncoder.from_encoder_dir(encoder_dir, config.defense, capacity=64)
  users_sent = [bodies[i][0] for i in ok for _ in range(len(bodies[i][1]))]
  images_sent = np.concatenate([bodies[i][1] for i in ok])
  for j in range(0, len(users_sent), args.max_rows):  # coverage is a set union: any grouping
    ref.query_mixed(users_sent[j:j + args.max_rows], images_sent[j:j + args.max_rows])
  mismatches = []
  for account in accounts:
    if account not in ref.users:
      continue
    s, r = users.index(account), ref.slot(account)
    for field in ("occupancy", "counts", "num_queries"):
      if not np.array_equal(arrays[field][s], np.asarray(getattr(ref.state, field))[r]):
        mismatches.append((account, field))
  unsent = [a for a in accounts if a not in ref.users and a in users]
  print(f"[serve_load] state of {len(ref.users)} accounts vs recomputation from the answered requests: "
        f"{'identical (occupancy, counts, query counts)' if not mismatches and not unsent else mismatches}")


if __name__ == "__main__":
  # The in-process API compiled and run as the server's process does: with xla_flags.SERVING_FLAGS (on
  # CPU-only hosts) and its malloc heaps kept (host_memory.apply_serving), which the served process
  # applies (b4b_jax/main.py) and which this process would otherwise lack.
  xla_flags.apply(serving=True)
  host_memory.apply_serving()
  main()
