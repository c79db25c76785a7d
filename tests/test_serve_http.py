"""The served API over HTTP on 127.0.0.1: a real server process (configs/serve.py:tiny on a tiny
random-init encoder), every kind of bad input refused with a 4xx naming the problem and nothing charged,
the request formats, the admin endpoints and CLI, the Python client, /metrics and /healthz."""
import base64
import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from b4b_jax import compilation_cache
from b4b_jax import xla_flags
from b4b_jax.serve import client as client_lib
from b4b_jax.serve import store as store_lib
from b4b_jax.serve import testing

CACHE = os.path.join(tempfile.gettempdir(), "b4b-jax-serve-test-jax-cache")
SERVER_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}  # tiny shapes: compile time dominates


def server_overrides(**extra):
  out = [f"--config.persistence.compilation_cache_dir={CACHE}", "--config.batching.max_rows=32"]
  return out + [f"--config.{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("http")
  encoder_dir = testing.tiny_encoder_dir(str(root / "encoder"))
  workdir = str(root / "work")
  os.makedirs(workdir)
  st = store_lib.Store(os.path.join(workdir, store_lib.DB_NAME))
  keys = {name: st.create_key(name)[1] for name in ("alice", "bob", "carol")}
  keys["quota"] = st.create_key("quota", quota_rows=8)[1]
  revoked_id, keys["revoked"] = st.create_key("carol")
  st.revoke_key(revoked_id)
  st.close()
  proc = testing.ServerProcess(workdir, encoder_dir, overrides=server_overrides(), env=SERVER_ENV)
  proc.start(timeout=300)
  with open(os.path.join(workdir, "admin_token")) as f:
    token = f.read().strip()
  yield proc, keys, token
  assert proc.stop() == 0, proc.log_tail()


def _log_line(proc, marker: str) -> str:
  """The first line of the server's log that contains marker (StopIteration when none does)."""
  with open(proc.log_path, errors="replace") as f:
    return next(l for l in f if marker in l)


def test_the_server_process_compiles_with_the_serving_xla_flags(server):
  line = _log_line(server[0], "XLA_FLAGS:")
  assert all(flag in line for flag in xla_flags.FLAGS + xla_flags.SERVING_FLAGS), line


def test_the_server_keeps_its_programs_in_a_bounded_per_host_cache(server):
  line = _log_line(server[0], "compilation cache:")
  assert f"{os.path.join(CACHE, compilation_cache.host_key())} (at most 1024 MiB" in line, line


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(image):
  buf = io.BytesIO()
  image.save(buf, format="JPEG")
  return buf.getvalue()


def _bomb_header():
  data = bytearray(_png(np.zeros((4, 4), np.uint8)))
  data[16:24] = struct.pack(">II", 100000, 100000)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
  return bytes(data)


def _npy(a):
  buf = io.BytesIO()
  np.save(buf, a)
  return buf.getvalue()


def _count(url, key):
  return httpx.get(url + "/v1/account", headers={"Authorization": f"Bearer {key}"}).json()["num_queries"]


def test_bad_inputs_are_4xx_naming_the_problem_nothing_charged_and_serving_continues(server):
  proc, keys, token = server
  url = proc.url + "/v1/embeddings"
  auth = {"Authorization": f"Bearer {keys['alice']}"}
  good = testing.random_images(2, 16, seed=5)
  png = _png(good[0])
  multipart = lambda *files: {"files": [("image", (f"{i}.png", f, "image/png"))  # noqa: E731
                                        for i, f in enumerate(files)], "headers": auth}
  npy = lambda a: {"content": _npy(a), "headers": {**auth, "Content-Type": "application/x-npy"}}  # noqa
  js = lambda body: {"content": body, "headers": {**auth, "Content-Type": "application/json"}}  # noqa
  cases = [
      ("no key", {"content": _npy(good), "headers": {"Content-Type": "application/x-npy"}}, 401,
       "missing_key", "API key"),
      ("wrong key", {"content": _npy(good), "headers": {"Authorization": "Bearer b4b_000000000000_" +
                                                        "x" * 43}}, 401, "invalid_key", "not valid"),
      ("revoked key", {"content": _npy(good), "headers": {"Authorization": f"Bearer {keys['revoked']}",
                                                          "Content-Type": "application/x-npy"}},
       401, "revoked_key", "revoked"),
      ("truncated png", multipart(png, png[:len(png) // 2]), 422, "corrupt_image", "image 1"),
      ("corrupt jpeg", multipart(b"\xff\xd8\xff" + os.urandom(300)), 422, "corrupt_image", "JPEG"),
      ("bomb", multipart(_bomb_header()), 413, "image_too_many_pixels", "10000000000 pixels"),
      ("1 channel", npy(good[..., :1]), 422, "wrong_channels", "1 channels"),
      ("4 channels", npy(np.concatenate([good, good[..., :1]], -1)), 422, "wrong_channels", "4"),
      ("16-bit", multipart(_png(np.zeros((16, 16), np.uint16))), 422, "unsupported_bit_depth",
       "16-bit"),
      ("cmyk", multipart(_jpeg(Image.new("CMYK", (16, 16)))), 422, "unsupported_color_mode", "CMYK"),
      ("float npy", npy(good.astype(np.float32)), 422, "wrong_dtype", "float32"),
      ("empty npy body", npy(good)["headers"] and {"content": b"", "headers": npy(good)["headers"]},
       400, "empty_body", "empty"),
      ("empty json body", js(b""), 400, "empty_body", "empty"),
      ("oversized batch", npy(testing.random_images(33, 16)), 413, "too_many_images", "33 images"),
      ("oversized body", {"content": b"\0" * (8 * 2**20 + 1), "headers": npy(good)["headers"]}, 413,
       "request_too_large", "limit"),
      ("malformed json", js(b'{"images": [}'), 400, "malformed_json", "not valid JSON"),
      ("json without images", js(b'{"pictures": []}'), 422, "bad_json_images", "images"),
      ("bad base64", js(json.dumps({"images": ["%%%"]}).encode()), 422, "bad_base64", "image 0"),
      ("text body", {"content": b"hello", "headers": {**auth, "Content-Type": "text/plain"}}, 415,
       "unsupported_content_type", "text/plain"),
  ]
  before = _count(proc.url, keys["alice"])
  for name, kw, status, code, words in cases:
    r = httpx.post(url, timeout=60, **kw)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], (name, err)
  r = httpx.get(proc.url + "/v1/accounts/bob", headers=auth)
  assert r.status_code == 403 and "another account" in r.json()["error"]["message"]
  for headers, status in (({}, 401), ({"Authorization": "Bearer nope-nope-nope"}, 403),
                          (auth, 403)):
    assert httpx.get(proc.url + "/v1/admin/accounts", headers=headers).status_code == status
  quota = {"Authorization": f"Bearer {keys['quota']}", "Content-Type": "application/x-npy"}
  assert httpx.post(url, content=_npy(testing.random_images(6, 16)), headers=quota).status_code == 200
  r = httpx.post(url, content=_npy(testing.random_images(6, 16)), headers=quota)
  assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
  assert "6 of its quota of 8" in r.json()["error"]["message"] and "retry-after" in r.headers
  # Nothing was charged for any refused request, and the server still answers.
  assert _count(proc.url, keys["alice"]) == before
  r = httpx.post(url, **npy(good))
  assert r.status_code == 200 and len(r.json()["embeddings"]) == 2
  assert _count(proc.url, keys["alice"]) == before + 2
  admin = client_lib.AdminClient(proc.url, token)
  accounts = admin.accounts()["accounts"]
  assert accounts["quota"]["num_queries"] == 6 and accounts["carol"]["num_queries"] == 0
  assert httpx.get(proc.url + "/healthz").json()["status"] == "ok"


def test_every_request_format_gives_the_same_representations(server):
  proc, keys, _ = server
  url = proc.url + "/v1/embeddings"
  auth = {"Authorization": f"Bearer {keys['bob']}"}
  images = testing.random_images(3, 16, seed=11)
  pngs = [_png(im) for im in images]
  as_npy = httpx.post(url, content=_npy(images), headers={**auth, "Content-Type": "application/x-npy",
                                                          "Accept": "application/x-npy"})
  reps = np.load(io.BytesIO(as_npy.content))
  assert reps.dtype == np.float32 and reps.shape[0] == 3
  as_json = httpx.post(url, json={"images": [base64.b64encode(p).decode() for p in pngs]},
                       headers=auth).json()
  as_form = httpx.post(url, files=[("image", (f"{i}.png", p, "image/png")) for i, p in
                                   enumerate(pngs)], headers=auth).json()
  raw = httpx.post(url, content=pngs[1], headers={**auth, "Content-Type": "image/png"}).json()
  # The same account gets the same transform; B4B's noise is tiny at this coverage.
  for other in (np.asarray(as_json["embeddings"]), np.asarray(as_form["embeddings"])):
    np.testing.assert_allclose(other, reps, atol=1e-3)
  np.testing.assert_allclose(np.asarray(raw["embeddings"])[0], reps[1], atol=1e-3)
  assert as_form["journal_seq"] > as_json["journal_seq"]


def test_the_load_benchmarks_raw_client_gets_the_answers_httpx_gets(server):
  """benchmarks/serve_load.py's client: requests encoded beforehand, one keep-alive connection."""
  import asyncio
  from benchmarks import serve_load
  proc, keys, _ = server
  host = proc.url.split("//", 1)[1]
  images = testing.random_images(2, 16, seed=12)
  form = {"files": [("image", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]}
  npy = {"content": _npy(images), "headers": {"Content-Type": "application/x-npy"}}

  async def exchanges():
    name, port = host.rsplit(":", 1)
    connection = serve_load._Connection(name, int(port), timeout=60.0)
    out = [await connection.exchange(serve_load._request_bytes(host, key, body))
           for key, body in ((keys["alice"], form), (keys["alice"], npy), ("not-a-key", npy))]
    connection.close()
    return out

  (s1, b1), (s2, b2), (s3, _) = asyncio.run(exchanges())
  assert (s1, s2, s3) == (200, 200, 401)
  expected = httpx.post(proc.url + "/v1/embeddings", files=form["files"],
                        headers={"Authorization": f"Bearer {keys['alice']}"}).json()["embeddings"]
  for body in (b1, b2):
    np.testing.assert_allclose(np.load(io.BytesIO(body)), np.asarray(expected), atol=1e-3)


def test_admin_endpoints_cli_client_and_metrics(server):
  proc, _, token = server
  admin = client_lib.AdminClient(proc.url, token)
  created = admin.create_key("dave")
  dave = client_lib.Client(proc.url, created["key"], batch_size=16, retries=0)
  reps = dave.embed(testing.random_images(20, 16, seed=3))  # two requests: 16 + 4 rows
  assert reps.shape[0] == 20 and dave.account()["num_queries"] == 20
  assert "coverage" not in dave.account() and "sigma" not in dave.account()
  remote = client_lib.RemoteDefendedEncoder(proc.url, admin_token=token)
  out = remote.query_mixed(["erin", "dave", "erin"], testing.random_images(3, 16, seed=4))
  assert out.reps.shape[0] == 3 and remote.num_queries("erin") == 2
  assert 0 < remote.coverage("dave") <= 100 and remote.sigma("dave") >= 0
  assert remote.out_dim == reps.shape[1]  # from /healthz
  assert out.coverage.shape == (3,) and out.sigma.shape == (3,) and float(out.coverage[0]) > 0
  startup = httpx.get(proc.url + "/healthz").json()["startup"]  # where the start-up seconds went
  assert {"process_imports_s", "process_s_at_listen", "load_encoder_s", "replay_s",
          "process_s_at_ready"} <= set(startup), startup
  assert startup["process_s_at_listen"] <= startup["process_s_at_ready"]  # bound before restoring
  admin.revoke(created["key_id"])
  with pytest.raises(client_lib.ServedError) as e:
    dave.embed(testing.random_images(1, 16))
  assert e.value.status == 401 and e.value.code == "revoked_key"
  cli = [sys.executable, "-m", "b4b_jax.serve.admin", f"--workdir={proc.workdir}"]
  made = json.loads(subprocess.run(cli + ["create-key", "frank"], check=True, capture_output=True,
                                   text=True).stdout)
  frank = client_lib.Client(proc.url, made["key"], retries=0)
  assert frank.embed(testing.random_images(2, 16)).shape[0] == 2
  subprocess.run(cli + ["revoke", made["key_id"]], check=True, capture_output=True)
  time.sleep(1.2)  # config.limits.auth_cache_seconds
  with pytest.raises(client_lib.ServedError, match="revoked"):
    frank.embed(testing.random_images(1, 16))
  listed = json.loads(subprocess.run(cli + ["list", f"--url={proc.url}"], check=True,
                                     capture_output=True, text=True).stdout)
  assert listed["accounts"]["frank"]["num_queries"] == 2 and "sigma" in listed["accounts"]["frank"]
  metrics = httpx.get(proc.url + "/metrics").text
  for name in ("b4b_requests_total", "b4b_request_seconds_bucket", "b4b_batch_rows_bucket",
               "b4b_rows_total", "b4b_journal_commit_seconds_bucket",
               'b4b_accounts_above_coverage{threshold="10"}'):
    assert name in metrics, name


def test_the_port_is_bound_before_start_up_requests_wait_and_a_failed_start_exits(tmp_path):
  """Start-up binds the port first: /healthz says "starting" (503) until the state is restored, a query
  sent meanwhile waits and is answered and charged once; a start that fails (here: a snapshot made
  with another defense config) answers 503 and exits non-zero with the reason."""
  encoder_dir = testing.tiny_encoder_dir(str(tmp_path / "encoder"))
  workdir = str(tmp_path / "work")
  os.makedirs(workdir)
  st = store_lib.Store(os.path.join(workdir, store_lib.DB_NAME))
  key = st.create_key("early")[1]
  st.close()
  proc = testing.ServerProcess(workdir, encoder_dir, overrides=server_overrides(), env=SERVER_ENV)
  proc.start(wait=False)
  first = None
  while first is None:
    assert proc.proc.poll() is None, proc.log_tail()
    try:
      first = httpx.get(proc.url + "/healthz", timeout=5)
    except httpx.HTTPError:
      time.sleep(0.01)
  headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"}
  r = httpx.post(proc.url + "/v1/embeddings", content=_npy(testing.random_images(3, 16)),
                 headers=headers, timeout=300)  # waits for the restored state if still starting
  assert r.status_code == 200 and r.json()["num_rows"] == 3, r.text[:300]
  if first.status_code == 503:  # (the usual case: restoring takes a moment after the port is bound)
    assert first.json()["status"] == "starting" and "process_imports_s" in first.json()["startup"]
  else:
    assert first.json()["status"] == "ok"
  assert _count(proc.url, key) == 3
  assert proc.stop() == 0, proc.log_tail()

  db = sqlite3.connect(os.path.join(workdir, store_lib.DB_NAME))
  db.execute("UPDATE accounts SET rows = rows + 1 WHERE name = 'early'")  # disagrees with the state
  db.commit()
  db.close()
  proc.start(wait=False)
  assert proc.wait_exit(300) != 0
  assert "counts 4 answered images" in proc.log_tail() and "did not start" in proc.log_tail()
