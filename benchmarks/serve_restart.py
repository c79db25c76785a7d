r"""How fast the served API comes back after SIGKILL, beside its cold first start.

  python -m benchmarks.serve_restart [--kills 2] [--load-seconds 4] [--clients 4] [--max-rows 32]
                                     [--also-wait-for-warm-up]

Starts `python -m b4b_jax.serve --config=configs/serve.py:tiny` on 127.0.0.1 (random-init
resnet18_w0.125 at 16 px, the hardened default defense) with a fresh workdir and a fresh persistent
compilation cache (<workdir>/jax_cache), sends load from a few client threads for a few seconds,
SIGKILLs it, restarts it on the same workdir, and so on. For every start it prints, from the process
start:
  listening     the first HTTP answer (/healthz 503 "starting": the port is bound before restoring)
  ready         /healthz 200: state restored, journal replayed, queries are answered
  first answer  a query sent from the process start on (retrying while nothing listens) came back
  warm          every padded batch size compiled (queries no longer pay for a compile)
and the service's own phase breakdown (/healthz "startup"). `--also-wait-for-warm-up` repeats the
kills with `batching.serve_during_warm_up=False` (answers only after every size compiled, the earlier
behaviour), interleaved with the default, for the ratio. Timings are wall-clock on a shared machine:
the load average is printed beside every figure. No timed assertions (tests/test_serve_faults.py pins
that nothing acknowledged is lost across such kills).
"""
import argparse
import io
import os
import shutil
import tempfile
import threading
import time

import httpx
import numpy as np

from b4b_jax.serve import store as store_lib
from b4b_jax.serve import testing

ACCOUNTS = ("r0", "r1", "r2", "r3")


def _load() -> str:
  return "load %.1f" % os.getloadavg()[0]


def _npy(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, a)
  return buf.getvalue()


def timed_start(proc: testing.ServerProcess, key: str, timeout: float = 600.0) -> dict:
  """Starts proc; returns seconds from the process start to listening, ready, first answer, warm."""
  url, out = proc.url, {}
  body = _npy(testing.random_images(1, 16, seed=12345))
  headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"}

  def first_answer():
    with httpx.Client(timeout=timeout) as http:
      while time.perf_counter() - t0 < timeout:
        try:
          r = http.post(url + "/v1/embeddings", content=body, headers=headers)
        except httpx.TransportError:  # nothing listens yet
          time.sleep(0.02)
          continue
        if r.status_code == 200:
          out["first_answer_s"] = time.perf_counter() - t0
          return
        time.sleep(0.02)

  t0 = time.perf_counter()
  proc.start(wait=False)
  asker = threading.Thread(target=first_answer, daemon=True)
  asker.start()
  with httpx.Client(timeout=5.0) as http:
    while time.perf_counter() - t0 < timeout:
      if proc.proc.poll() is not None:
        raise RuntimeError(f"server exited with {proc.proc.returncode}:\n{proc.log_tail()}")
      try:
        r = http.get(url + "/healthz")
      except httpx.TransportError:
        time.sleep(0.01)
        continue
      now = time.perf_counter() - t0
      out.setdefault("listening_s", now)
      if r.status_code == 200:
        out.setdefault("ready_s", now)
        if not r.json().get("warming_up"):
          out["warm_s"] = now
          out["startup"] = r.json()["startup"]
          break
      time.sleep(0.01)
  asker.join(timeout)
  out["load"] = _load()
  return out


def _client(url, keys, seed, stop, answered):
  rng = np.random.default_rng(seed)
  with httpx.Client(timeout=60) as http:
    while not stop.is_set():
      account = ACCOUNTS[rng.integers(len(ACCOUNTS))]
      images = testing.random_images(int(rng.integers(1, 7)), 16, seed=int(rng.integers(1 << 30)))
      try:
        r = http.post(url + "/v1/embeddings", content=_npy(images),
                      headers={"Authorization": f"Bearer {keys[account]}",
                               "Content-Type": "application/x-npy"})
        if r.status_code == 200:
          answered.append(len(images))
      except httpx.HTTPError:
        time.sleep(0.05)


def load_then_kill(proc, keys, seconds: float, clients: int) -> int:
  stop, answered = threading.Event(), []
  threads = [threading.Thread(target=_client, args=(proc.url, keys, i, stop, answered), daemon=True)
             for i in range(clients)]
  for t in threads:
    t.start()
  time.sleep(seconds)
  proc.kill()  # SIGKILL under load
  stop.set()
  for t in threads:
    t.join(60)
  return len(answered)


def _show(label: str, r: dict) -> None:
  s = r.get("startup", {})
  print(f"{label}: listening {r.get('listening_s', float('nan')):.2f} s, ready "
        f"{r.get('ready_s', float('nan')):.2f} s, first answer {r.get('first_answer_s', float('nan')):.2f}"
        f" s, warm {r.get('warm_s', float('nan')):.2f} s ({r['load']})")
  phases = ("process_imports_s", "process_s_at_listen", "open_database_s", "load_encoder_s",
            "restore_snapshot_s", "replay_s", "check_counters_s", "warm_up_wait_s", "process_s_at_ready",
            "warm_up_s")
  print("    phases: " + ", ".join(f"{k[:-2] if k.endswith('_s') else k} {s[k]}" for k in phases
                                   if k in s) +
        f"; replayed {s.get('replayed_entries')} journal entries in {s.get('replay_calls')} calls")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--kills", type=int, default=2)
  p.add_argument("--load-seconds", type=float, default=4.0)
  p.add_argument("--clients", type=int, default=4)
  p.add_argument("--max-rows", type=int, default=32, help="batching.max_rows (padded sizes 8..max)")
  p.add_argument("--also-wait-for-warm-up", action="store_true",
                 help="interleave kills with batching.serve_during_warm_up=False")
  p.add_argument("--keep", action="store_true", help="keep the scratch directory")
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix="b4b-serve-restart-")
  try:
    encoder_dir = testing.tiny_encoder_dir(os.path.join(root, "encoder"))
    cache = os.path.join(root, "jax_cache")  # shared by the modes: the same cache state for both
    common = [f"--config.batching.max_rows={args.max_rows}",
              f"--config.limits.max_rows_per_request={min(args.max_rows, 32)}",
              "--config.persistence.snapshot_every_entries=50",
              f"--config.persistence.compilation_cache_dir={cache}"]
    modes = [("serve during warm-up", [])]
    if args.also_wait_for_warm_up:
      modes.append(("serve after warm-up", ["--config.batching.serve_during_warm_up=False"]))
    workdirs, keys = {}, {}
    for name, _ in modes:  # one workdir per mode (a workdir keeps the config it was started with)
      workdirs[name] = os.path.join(root, name.replace(" ", "_"))
      os.makedirs(workdirs[name])
      st = store_lib.Store(os.path.join(workdirs[name], store_lib.DB_NAME))
      keys[name] = {a: st.create_key(a)[1] for a in ACCOUNTS}
      st.close()

    def proc_for(name):
      return testing.ServerProcess(workdirs[name], encoder_dir, overrides=common + dict(modes)[name],
                                   log_path=os.path.join(root, "server.log"))

    print(f"tiny encoder, max_rows {args.max_rows}, {args.clients} clients, {args.load_seconds} s of "
          f"load before each SIGKILL; seconds from the process start ({_load()})")
    first = modes[0][0]
    cold_proc = proc_for(first)
    cold = timed_start(cold_proc, keys[first][ACCOUNTS[0]])
    _show("cold first start (empty compilation cache)", cold)
    cold_proc.stop()
    results = {m: [] for m, _ in modes}
    for k in range(args.kills):
      for name, _ in modes:
        proc = proc_for(name)
        proc.start(timeout=600)  # (untimed: the journal of the last kill replays here)
        answered = load_then_kill(proc, keys[name], args.load_seconds, args.clients)
        proc = proc_for(name)
        r = timed_start(proc, keys[name][ACCOUNTS[0]])
        results[name].append(r)
        _show(f"restart {k + 1} after SIGKILL ({name}; {answered} images answered in "
              f"{args.load_seconds:g} s before the kill)", r)
        proc.kill()
    for name, rs in results.items():
      ready = [r["ready_s"] for r in rs]
      first = [r["first_answer_s"] for r in rs]
      print(f"{name}: restart ready {np.mean(ready):.2f} s, first answer {np.mean(first):.2f} s (mean of "
            f"{len(rs)}); cold start ready {cold['ready_s']:.2f} s, first answer "
            f"{cold['first_answer_s']:.2f} s; restart / cold (first answer) "
            f"{np.mean(first) / cold['first_answer_s']:.2f} ({_load()})")
    if len(modes) == 2:
      a, b = (np.mean([r["first_answer_s"] for r in results[m]]) for m, _ in modes)
      print(f"first answer after a restart, serving during / after warm-up: {a:.2f} / {b:.2f} s = "
            f"{a / b:.2f} ({_load()})")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
