"""Crash safety of the served API: the server is SIGKILLed under load at random moments, several times,
and restarted on the same workdir. Afterwards no acknowledged query is missing from any account's
coverage or counters and nothing is counted twice: every account's state lies between a recomputation
from the acknowledged requests and one from the acknowledged plus the in-flight (unanswered) ones. The
service runs its default defense, the hardened B4B (noise keyed per input), whose seen-code state is
journaled and replayed with the LSH buckets."""
import io
import os
import threading
import time

import httpx
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.serve import service as service_lib
from b4b_jax.serve import store as store_lib
from b4b_jax.serve import testing
from tests.test_serve_http import SERVER_ENV, server_overrides

pytestmark = pytest.mark.usefixtures("fast_compiles")
ACCOUNTS = ("a0", "a1", "a2", "a3")
KILLS = 3


def _npy(a):
  buf = io.BytesIO()
  np.save(buf, a)
  return buf.getvalue()


def _load(url, keys, rng_seed, stop, acked, unknown, failures):
  rng = np.random.default_rng(rng_seed)
  with httpx.Client(timeout=30) as http:
    i = 0
    while not stop.is_set():
      account = ACCOUNTS[rng.integers(len(ACCOUNTS))]
      seed = rng_seed * 100000 + i
      i += 1
      images = testing.random_images(int(rng.integers(1, 7)), 16, seed=seed)
      try:
        r = http.post(url, content=_npy(images), headers={"Authorization": f"Bearer {keys[account]}",
                                                          "Content-Type": "application/x-npy",
                                                          "Accept": "application/x-npy"})
      except httpx.HTTPError:
        unknown.append((account, images))  # sent, never answered: may or may not be counted
        time.sleep(0.05)
        continue
      if r.status_code == 200:
        acked.append((account, images))
      elif r.status_code == 503:
        unknown.append((account, images))
      else:
        failures.append((r.status_code, r.text[:200]))


def _reference(encoder_dir, config, requests):
  api = defense.DefendedEncoder.from_encoder_dir(encoder_dir, config.defense, capacity=8)
  users = [account for account, images in requests for _ in range(len(images))]
  images = np.concatenate([images for _, images in requests])
  for i in range(0, len(users), 64):  # coverage is a union and counts add up: any grouping
    api.query_mixed(users[i:i + 64], images[i:i + 64])
  arrays = {k: np.asarray(getattr(api.state, k)) for k in ("occupancy", "num_queries",
                                                            "fine_occupancy")}
  return {u: {k: v[api.slot(u)] for k, v in arrays.items()} for u in api.users}


def test_sigkill_under_load_loses_no_acknowledged_query_and_counts_nothing_twice(tmp_path):
  encoder_dir = testing.tiny_encoder_dir(str(tmp_path / "encoder"))
  workdir = str(tmp_path / "work")
  os.makedirs(workdir)
  st = store_lib.Store(os.path.join(workdir, store_lib.DB_NAME))
  keys = {a: st.create_key(a)[1] for a in ACCOUNTS}
  st.close()
  proc = testing.ServerProcess(workdir, encoder_dir, env=SERVER_ENV, overrides=server_overrides(
      **{"persistence.snapshot_every_entries": 10, "batching.max_rows": 8,
         "limits.max_rows_per_request": 8}))
  acked, unknown, failures, restarts = [], [], [], []
  rng = np.random.default_rng(0)
  proc.start(timeout=300)
  try:
    for round_ in range(KILLS + 1):
      stop = threading.Event()
      threads = [threading.Thread(target=_load, args=(proc.url + "/v1/embeddings", keys,
                                                      round_ * 10 + t, stop, acked, unknown, failures))
                 for t in range(6)]
      for t in threads:
        t.start()
      # Kill at a random moment once this round has some acknowledged load (bounded in time).
      target, deadline = len(acked) + int(rng.integers(8, 25)), time.time() + 60
      while len(acked) < target and time.time() < deadline:
        time.sleep(0.01)
      time.sleep(float(rng.uniform(0.0, 0.3)))
      if round_ < KILLS:
        proc.kill()  # SIGKILL mid-load: requests in flight are never answered
      stop.set()
      for t in threads:
        t.join(60)
      if round_ < KILLS:
        restarts.append(proc.start(timeout=300))
        print(f"restart {round_ + 1}: {restarts[-1]:.1f} s to /healthz ok (ready); breakdown "
              f"{proc.startup}; load {os.getloadavg()[0]:.1f}")
  finally:
    code = proc.stop()
  assert code == 0, proc.log_tail()
  assert not failures, failures[:5]
  assert len(acked) >= 8 * (KILLS + 1) and len(unknown) >= KILLS, (len(acked), len(unknown))
  print(f"acknowledged {len(acked)} requests, {len(unknown)} in flight at kills; restarts took "
        f"{[round(t, 1) for t in restarts]} s (to /healthz, from process start)")

  from configs import serve as serve_config  # pylint: disable=g-import-not-at-top
  config = serve_config.get_config("tiny")
  assert config.defense.noise_keying == "per_input"  # the service's default: hardened B4B
  svc = service_lib.Service(config, workdir, encoder_dir)
  svc.open()
  users, arrays = svc.state_arrays()
  db = svc.store.accounts()
  svc.close()
  low = _reference(encoder_dir, config, acked)
  high = _reference(encoder_dir, config, acked + unknown)
  for account in ACCOUNTS:
    slot = users.index(account)
    occ, rows = arrays["occupancy"][slot], int(arrays["num_queries"][slot])
    assert db[account]["rows"] == rows
    lo, hi = low[account], high[account]
    assert int(lo["num_queries"]) <= rows <= int(hi["num_queries"]), (account, rows)
    assert not np.any(lo["occupancy"] & ~occ), f"{account}: an acknowledged query's bucket is missing"
    assert not np.any(occ & ~hi["occupancy"]), f"{account}: a bucket nobody sent is counted"
    # The hardened default's per-row state (the seen fine codes behind the repeat counts) is journaled
    # and replayed too.
    fine = arrays["fine_occupancy"][slot]
    assert not np.any(lo["fine_occupancy"] & ~fine) and not np.any(fine & ~hi["fine_occupancy"])
  # Nothing counted twice: the total is the acknowledged rows plus a part of the unanswered ones.
  total = int(arrays["num_queries"].sum())
  assert sum(len(i) for _, i in acked) <= total <= sum(len(i) for _, i in acked + unknown)
