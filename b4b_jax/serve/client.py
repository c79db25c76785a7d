"""Python client of the served API, and a drop-in for the in-process DefendedEncoder's calls.

  client = Client("http://127.0.0.1:8000", api_key)
  reps = client.embed(images_uint8)          # [N, H, W, 3] uint8 -> float32 [N, out_dim]; split into
                                             # requests of `batch_size` rows, sent as npy (or PNG)
  client.account()                           # {"account", "num_queries", ...} (no coverage/sigma)

  admin = AdminClient("http://127.0.0.1:8000", admin_token)
  key = admin.create_key("alice")["key"]; admin.revoke(key_id); admin.accounts()

  api = RemoteDefendedEncoder(url, admin_token=token)      # or keys={"alice": key, ...}
  api.query("alice", images_uint8).reps                    # as DefendedEncoder.query on uint8 images
  api.query_mixed(users_per_row, images).reps, api.coverage("alice"), api.sigma("alice"),
  api.num_queries("alice"), api.stats()                    # the provider's read-outs, via admin
  api.out_dim                                              # from /healthz

Errors: a refused request raises ServedError (a ValueError) with `.status`, `.code` and the server's
message; 429 and 503 are retried `retries` times after the server's Retry-After (capped).
"""
import time
from typing import Dict, Optional, Sequence

import httpx
import numpy as np

from b4b_jax.serve import images as images_lib

NPY = "application/x-npy"


class ServedError(ValueError):

  def __init__(self, status: int, code: str, message: str):
    super().__init__(f"HTTP {status} {code}: {message}")
    self.status, self.code, self.message = status, code, message


def _raise_for(response: httpx.Response) -> None:
  if response.status_code < 400:
    return
  try:
    err = response.json()["error"]
    code, message = err["code"], err["message"]
  except Exception:  # pylint: disable=broad-except
    code, message = "http_error", response.text[:500]
  raise ServedError(response.status_code, code, message)


class _Http:

  def __init__(self, base_url: str, token: str, *, timeout: float = 120.0, retries: int = 3,
               max_retry_wait: float = 5.0):
    self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                              headers={"Authorization": f"Bearer {token}"})
    self.retries, self.max_retry_wait = int(retries), float(max_retry_wait)

  def request(self, method: str, path: str, **kw) -> httpx.Response:
    for attempt in range(self.retries + 1):
      r = self._http.request(method, path, **kw)
      if r.status_code in (429, 503) and attempt < self.retries:
        time.sleep(min(self.max_retry_wait, float(r.headers.get("retry-after", "1"))))
        continue
      _raise_for(r)
      return r
    raise AssertionError("unreachable")

  def close(self) -> None:
    self._http.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Client(_Http):
  """One account's view of the service (its API key)."""

  def __init__(self, base_url: str, api_key: str, *, batch_size: int = 256, **kw):
    super().__init__(base_url, api_key, **kw)
    self.batch_size = int(batch_size)

  def embed_once(self, images: np.ndarray, *, as_png: bool = False) -> np.ndarray:
    """One request (at most the server's max_rows_per_request rows)."""
    images = np.asarray(images)
    if as_png:
      files = [("image", (f"{i}.png", images_lib.encode_png(im), "image/png"))
               for i, im in enumerate(images)]
      r = self.request("POST", "/v1/embeddings", files=files, headers={"Accept": NPY})
    else:
      if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels [N, H, W, 3], got {images.dtype}")
      r = self.request("POST", "/v1/embeddings", content=images_lib.encode_npy(images),
                       headers={"Content-Type": NPY, "Accept": NPY})
    return images_lib.load_npy(r.content)

  def embed(self, images: np.ndarray, *, as_png: bool = False) -> np.ndarray:
    images = np.asarray(images)
    if len(images) == 0:
      raise ValueError("no images to embed")
    return np.concatenate([self.embed_once(images[i:i + self.batch_size], as_png=as_png)
                           for i in range(0, len(images), self.batch_size)])

  def account(self) -> dict:
    return self.request("GET", "/v1/account").json()


class AdminClient(_Http):
  """The provider's view (admin token)."""

  def create_key(self, account: str, *, quota_rows: int = 0, rate_rows_per_s: float = 0.0) -> dict:
    return self.request("POST", "/v1/admin/keys", json={"account": account, "quota_rows": quota_rows,
                                                        "rate_rows_per_s": rate_rows_per_s}).json()

  def revoke(self, key_id: str) -> dict:
    return self.request("DELETE", f"/v1/admin/keys/{key_id}").json()

  def accounts(self) -> dict:
    return self.request("GET", "/v1/admin/accounts").json()

  def snapshot(self) -> dict:
    return self.request("POST", "/v1/admin/snapshot").json()


class RemoteResult:
  """As defense.QueryResult: reps, users, and (with the admin token) each row's account coverage and
  sigma after the call (the in-process per-row sigma is the account's sigma after the call, step.py)."""
  __slots__ = ("reps", "users", "coverage", "sigma")

  def __init__(self, reps, users, coverage=None, sigma=None):
    self.reps, self.users = reps, tuple(users)
    self.coverage, self.sigma = coverage, sigma


class RemoteDefendedEncoder:
  """The served API behind the in-process DefendedEncoder's calls (uint8 images in, as its
  encoder-directory constructor takes them). Keys come from `keys` or, with `admin_token`, are created
  on a user's first query; the provider read-outs (coverage, sigma, stats) need the admin token."""

  def __init__(self, base_url: str, *, keys: Optional[Dict[str, str]] = None,
               admin_token: Optional[str] = None, batch_size: int = 256, **kw):
    self.base_url = base_url
    self._keys = dict(keys or {})
    self._clients: Dict[str, Client] = {}
    self._admin = AdminClient(base_url, admin_token, **kw) if admin_token else None
    self._batch_size = int(batch_size)
    self._kw = kw
    self._accounts = None  # the provider read-out after the last query (admin token only)
    self._info = None

  @property
  def out_dim(self) -> int:
    """The dimension of the served representations (from /healthz)."""
    if self._info is None:
      with httpx.Client(base_url=self.base_url.rstrip("/"), timeout=30) as http:
        r = http.get("/healthz")
        _raise_for(r)
        self._info = r.json()
    return int(self._info["out_dim"])

  def _client(self, user: str) -> Client:
    if user not in self._clients:
      if user not in self._keys:
        if self._admin is None:
          raise ValueError(f"no API key for user {user!r} (pass keys= or admin_token=)")
        self._keys[user] = self._admin.create_key(user)["key"]
      self._clients[user] = Client(self.base_url, self._keys[user], batch_size=self._batch_size,
                                   **self._kw)
    return self._clients[user]

  def register(self, user: str) -> None:
    self._client(user)

  def query(self, user: str, images) -> RemoteResult:
    images = np.asarray(images)
    return self._result(self._client(user).embed(images), [user] * len(images))

  def _result(self, reps, users) -> RemoteResult:
    self._accounts = None
    if self._admin is None:
      return RemoteResult(reps, users)
    accounts = self._read_accounts()
    cov = np.asarray([accounts[u]["coverage"] for u in users], np.float32)
    sig = np.asarray([accounts[u]["sigma"] for u in users], np.float32)
    return RemoteResult(reps, users, cov, sig)

  def _read_accounts(self) -> dict:
    if self._accounts is None:
      self._accounts = self._admin.accounts()["accounts"]
    return self._accounts

  def query_mixed(self, users_per_row: Sequence[str], images) -> RemoteResult:
    """Rows are sent per user (each user's rows in order), then put back in row order."""
    images = np.asarray(images)
    users = list(users_per_row)
    if len(users) != len(images):
      raise ValueError(f"users_per_row has {len(users)} names for {len(images)} rows")
    out = None
    for user in dict.fromkeys(users):
      rows = np.asarray([i for i, u in enumerate(users) if u == user])
      reps = self._client(user).embed(images[rows])
      if out is None:
        out = np.zeros((len(users), reps.shape[1]), np.float32)
      out[rows] = reps
    return self._result(out, users)

  def _account(self, user: str) -> dict:
    if self._admin is None:
      raise ValueError("coverage and sigma are provider read-outs: pass admin_token=")
    accounts = self._read_accounts()
    if user not in accounts:
      raise ValueError(f"unknown user {user!r}")
    return accounts[user]

  def coverage(self, user: str) -> float:
    return float(self._account(user)["coverage"])

  def sigma(self, user: str) -> float:
    return float(self._account(user)["sigma"])

  def num_queries(self, user: str) -> int:
    if self._admin is None:
      return int(self._client(user).account()["num_queries"])
    return int(self._account(user)["num_queries"])

  def stats(self) -> dict:
    """The provider's /v1/admin/accounts read-out, plus total_queries (as DefendedEncoder.stats)."""
    if self._admin is None:
      raise ValueError("stats are a provider read-out: pass admin_token=")
    out = self._admin.accounts()
    out["total_queries"] = sum(int(a["num_queries"]) for a in out["accounts"].values())
    return out

  def close(self) -> None:
    for c in self._clients.values():
      c.close()
    if self._admin is not None:
      self._admin.close()
