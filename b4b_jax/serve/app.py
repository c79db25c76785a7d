"""The HTTP face of the service (FastAPI on uvicorn). Loopback by default; one process owns the device.

Endpoints (user endpoints take `Authorization: Bearer <api key>`, admin ones the admin token):
  POST   /v1/embeddings          images -> defended representations of the key's account. Bodies:
                                   multipart/form-data, fields "image" (one or more PNG/JPEG files);
                                   application/json {"images": ["<base64 PNG/JPEG>", ...]};
                                   application/x-npy, a uint8 array [N, S, S, 3] at the input size;
                                   image/png or image/jpeg, one raw image.
                                 Answer: JSON {"embeddings": [[...]], "num_rows", "journal_seq"}, or with
                                 `Accept: application/x-npy` a float32 npy [N, out_dim] (same numbers).
                                 The answer leaves only after the batch's accounting is durable.
  GET    /v1/account             the caller's own counters (query count, requests, quota); never coverage
                                 or sigma (they would help a thief tune its queries)
  GET    /v1/accounts/{name}     the same for `name`; 403 unless it is the caller's own account
  GET    /v1/admin/accounts      every account with coverage, sigma, counters, keys (provider only)
  POST   /v1/admin/keys          {"account", "quota_rows"?, "rate_rows_per_s"?} -> a new key, shown once
  DELETE /v1/admin/keys/{key_id} revokes a key
  POST   /v1/admin/snapshot      snapshot now (and trim the journal)
  GET    /healthz, GET /metrics  liveness (+ out_dim, input_size, warming_up: batch shapes still
                                 compiling on their thread) and Prometheus text
The port is bound before the state is restored: until the service is ready /healthz answers 503 with
status "starting" (and the start-up phases so far) and every other request waits for it (a request
waits, it is not refused: nothing is queued or charged before the restored state serves it); if the
start fails they get 503 and the process exits with the reason.
Errors are {"error": {"code", "message"}} with a 4xx naming the problem (nothing is charged for a
refused request) or 503 when the service cannot answer (then nothing was charged either).
"""
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging as std_logging
import signal
import time

import numpy as np
from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from b4b_jax.defense.errors import DefenseError
from b4b_jax.serve import errors
from b4b_jax.serve import images as images_lib
from b4b_jax.serve import service as service_lib
from b4b_jax.serve.service import Service

NPY = "application/x-npy"
_KNOWN = ("/v1/embeddings", "/v1/account", "/v1/admin/accounts", "/v1/admin/snapshot", "/healthz",
          "/metrics")


def _endpoint_label(path: str) -> str:
  if path in _KNOWN:
    return path
  for prefix in ("/v1/accounts/", "/v1/admin/keys"):
    if path.startswith(prefix):
      return prefix.rstrip("/") + "/*"
  return "other"


class _Observe:
  """ASGI middleware: per-request latency and status counts (cheaper than BaseHTTPMiddleware)."""

  def __init__(self, app, metrics, access_log: bool):
    self.app, self.metrics, self.access_log = app, metrics, access_log

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    t0 = time.perf_counter()
    status = [500]

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      endpoint = _endpoint_label(scope.get("path", ""))
      seconds = time.perf_counter() - t0
      self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
      self.metrics.latency.labels(endpoint=endpoint).observe(seconds)
      if self.access_log or status[0] >= 500:
        logging.info("%s", json.dumps({"event": "request", "endpoint": endpoint,
                                       "method": scope.get("method"), "status": status[0],
                                       "ms": round(1000 * seconds, 2)}))


async def _read_body(request: Request, limit: int) -> bytes:
  length = request.headers.get("content-length")
  if length is not None:
    try:
      length = int(length)
    except ValueError:
      raise errors.bad_request("bad_content_length", f"Content-Length {length!r} is not a number")
    if length > limit:
      raise errors.too_large("request_too_large", f"the body has {length} bytes; the limit is {limit}")
  chunks, total = [], 0
  async for chunk in request.stream():
    total += len(chunk)
    if total > limit:
      raise errors.too_large("request_too_large", f"the body exceeds the limit of {limit} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


def _bearer(request: Request) -> str:
  auth = request.headers.get("authorization", "")
  if auth[:7].lower() == "bearer ":
    return auth[7:].strip()
  return request.headers.get("x-api-key", "").strip()


def create_app(service: Service, on_startup=None) -> FastAPI:
  """The ASGI app in front of `service`; on_startup() runs at the lifespan start-up (run_server starts
  the service there, on a thread, as uvicorn binds the port)."""
  limits = service.limits

  @contextlib.asynccontextmanager
  async def lifespan(_):
    # On shutdown (SIGTERM/SIGINT: uvicorn drains open requests first) the service stops here, after
    # finishing a start still under way.
    if on_startup is not None:
      on_startup()
    yield
    await run_in_threadpool(service.stop)
    logging.info("%s", json.dumps({"event": "stopped", "journal_seq": service.store.last_seq}))

  app = FastAPI(title="b4b-jax defended encoder", docs_url=None, redoc_url=None, openapi_url=None,
                lifespan=lifespan)

  @app.exception_handler(errors.RequestError)
  async def _request_error(request, exc: errors.RequestError):
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status,
                        headers=exc.headers)

  @app.exception_handler(errors.ServiceUnavailable)
  async def _unavailable(request, exc: errors.ServiceUnavailable):
    return JSONResponse({"error": {"code": "unavailable", "message": exc.message}}, status_code=503,
                        headers={"Retry-After": str(max(1, int(exc.retry_after)))})

  @app.exception_handler(DefenseError)
  async def _refused(request, exc: DefenseError):
    # Inputs are validated before they are queued, so this is rare: the batch was refused unchanged.
    return JSONResponse({"error": {"code": "refused_by_defense", "message": str(exc)}}, status_code=422)

  @app.exception_handler(Exception)
  async def _internal(request, exc: Exception):
    logging.exception("internal error on %s", request.url.path)
    return JSONResponse({"error": {"code": "internal", "message": f"internal error ({type(exc).__name__})"
                                   }}, status_code=500)

  async def _ready() -> None:
    """Waits until the service serves (start-up restores the state after the port is bound)."""
    while not service.ready.is_set():
      if service.start_error is not None:
        raise errors.ServiceUnavailable(f"the service did not start: {service.start_error}", 5.0)
      await asyncio.sleep(0.02)

  def _parse(content_type: str, body: bytes, files):
    if files is not None:
      return images_lib.decode_images(files, service.geometry, limits)
    if not body:
      raise errors.bad_request("empty_body", "the request body is empty")
    if content_type in (NPY, "application/octet-stream"):
      return images_lib.decode_npy(body, service.geometry, limits)
    if content_type == "application/json":
      try:
        doc = json.loads(body)
      except (ValueError, UnicodeDecodeError) as e:
        raise errors.bad_request("malformed_json", f"the body is not valid JSON: {e}") from None
      if not isinstance(doc, dict) or "images" not in doc:
        raise errors.unprocessable("bad_json_images", "the JSON body must be an object with a field "
                                   "'images': a list of base64 PNG/JPEG strings")
      items = images_lib.check_base64_list(doc["images"], limits)
      decoded = []
      for i, item in enumerate(items):
        try:
          decoded.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as e:
          raise errors.unprocessable("bad_base64", f"image {i} is not valid base64: {e}") from None
      return images_lib.decode_images(decoded, service.geometry, limits)
    if content_type in ("image/png", "image/jpeg"):
      return images_lib.decode_images([body], service.geometry, limits)
    raise errors.unsupported_media("unsupported_content_type", f"Content-Type {content_type!r} is not "
                                   "accepted; use multipart/form-data, application/json, "
                                   f"{NPY} or image/png|jpeg")

  def _prepare(key: str, content_type: str, body: bytes, files):
    t0 = time.perf_counter()
    account = service.gate.authenticate(key)
    service.gate.refresh_limits()
    images = _parse(content_type, body, files)
    service.metrics.decode.observe(time.perf_counter() - t0)
    return account, images

  @app.post("/v1/embeddings")
  async def embeddings(request: Request):
    key = _bearer(request)
    if not key:  # before reading a possibly large body
      raise errors.unauthorized("missing_key", "no API key: send 'Authorization: Bearer <key>'")
    await _ready()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, limits.max_request_bytes)
    files = None
    if content_type == "multipart/form-data":
      request._body = body  # pylint: disable=protected-access  (form() re-reads the bounded body)
      try:
        form = await request.form(max_files=limits.max_rows_per_request + 1, max_fields=8,
                                  max_part_size=limits.max_image_bytes)
      except Exception as e:  # pylint: disable=broad-except  (multipart errors are 400s)
        raise errors.bad_request("malformed_multipart", f"the multipart body cannot be parsed: "
                                 f"{getattr(e, 'detail', e)}") from None
      uploads = [v for k, v in form.multi_items() if k in ("image", "images")]
      if not uploads:
        raise errors.unprocessable("no_images", "the multipart body has no 'image' file fields")
      files = []
      for u in uploads:
        if isinstance(u, str):
          raise errors.unprocessable("bad_multipart_field", "field 'image' must be a file upload")
        files.append(await u.read())
    account, images = await run_in_threadpool(_prepare, key, content_type, body, files)
    reps, seq = await service.embed(account, images)
    if NPY in request.headers.get("accept", ""):
      return Response(images_lib.encode_npy(np.asarray(reps, np.float32)), media_type=NPY,
                      headers={"X-B4B-Rows": str(len(reps)), "X-B4B-Journal-Seq": str(seq)})
    payload = {"embeddings": None, "num_rows": int(len(reps)), "journal_seq": int(seq)}
    if reps.size > 16384:
      text = await run_in_threadpool(_json_embeddings, payload, reps)
    else:
      text = _json_embeddings(payload, reps)
    return Response(text, media_type="application/json")

  async def _account(request: Request) -> str:
    await _ready()
    return await run_in_threadpool(service.gate.authenticate, _bearer(request))

  @app.get("/v1/account")
  async def own_account(request: Request):
    account = await _account(request)
    return await run_in_threadpool(service.account_view, account)

  @app.get("/v1/accounts/{name}")
  async def named_account(name: str, request: Request):
    account = await _account(request)
    if name != account:
      raise errors.forbidden("not_your_account", f"this key belongs to another account; it may only "
                             f"read its own (/v1/accounts/{account})")
    return await run_in_threadpool(service.account_view, account)

  def _admin(request: Request) -> None:
    token = _bearer(request)
    if not token:
      raise errors.unauthorized("missing_admin_token", "admin endpoints need 'Authorization: Bearer "
                                "<admin token>'")
    if not hmac.compare_digest(token.encode(), service.admin_token.encode()):
      raise errors.forbidden("not_admin", "the admin token is not valid")

  @app.get("/v1/admin/accounts")
  async def admin_accounts(request: Request):
    _admin(request)
    await _ready()
    return await run_in_threadpool(service.admin_accounts)

  @app.post("/v1/admin/keys")
  async def admin_create_key(request: Request):
    _admin(request)
    await _ready()
    body = await _read_body(request, 65536)
    try:
      doc = json.loads(body or b"null")
    except ValueError as e:
      raise errors.bad_request("malformed_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("account"), str):
      raise errors.unprocessable("bad_request_body", "send {\"account\": NAME, \"quota_rows\"?: int, "
                                 "\"rate_rows_per_s\"?: float}")

    def create():
      try:
        key_id, key = service.store.create_key(doc["account"],
                                               quota_rows=int(doc.get("quota_rows") or 0),
                                               rate_rows_per_s=float(doc.get("rate_rows_per_s") or 0))
      except (ValueError, TypeError) as e:
        raise errors.unprocessable("bad_account", str(e)) from None
      service.gate.reload()
      return {"account": doc["account"], "key_id": key_id, "key": key}

    return await run_in_threadpool(create)

  @app.delete("/v1/admin/keys/{key_id}")
  async def admin_revoke(key_id: str, request: Request):
    _admin(request)
    await _ready()

    def revoke():
      try:
        account = service.store.revoke_key(key_id)
      except KeyError as e:
        raise errors.RequestError(404, "no_such_key", str(e.args[0])) from None
      service.gate.forget_keys()
      return {"key_id": key_id, "account": account, "revoked": True}

    return await run_in_threadpool(revoke)

  @app.post("/v1/admin/snapshot")
  async def admin_snapshot(request: Request):
    _admin(request)
    await _ready()
    seq = await run_in_threadpool(service.snapshot_now)
    return {"snapshot_seq": seq}

  @app.get("/healthz")
  async def healthz():
    if not service.ready.is_set():
      failed = service.start_error is not None
      return JSONResponse({"status": "unavailable" if failed else "starting",
                           "reason": f"start-up failed: {service.start_error}" if failed else "starting",
                           "startup": dict(service.startup)}, status_code=503)
    broken = service.batcher.broken
    body = {"status": "ok" if not broken else "unavailable", "reason": broken,
            "journal_seq": service.store.last_seq, "start_seconds": service.start_seconds,
            "out_dim": service.out_dim, "input_size": service.geometry.input_size,
            "warming_up": service.warming_up,
            "startup": dict(service.startup)}
    return JSONResponse(body, status_code=503 if broken else 200)

  @app.get("/metrics")
  async def metrics():
    return Response(service.metrics.render(), media_type=service.metrics.CONTENT_TYPE)

  return _Observe(app, service.metrics, bool(service.config.observability.access_log))


def _json_embeddings(payload: dict, reps: np.ndarray) -> str:
  payload = dict(payload)
  payload["embeddings"] = np.asarray(reps, np.float32).tolist()
  return json.dumps(payload)


def _make_server_class():
  import uvicorn  # pylint: disable=g-import-not-at-top

  class Server(uvicorn.Server):
    """uvicorn.Server whose SIGINT/SIGTERM handling drains and returns (exit status 0) instead of
    re-raising the signal after shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
      previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for sig, handler in previous.items():
          signal.signal(sig, handler)

  return Server


def run_server(config, workdir: str, encoder_dir: str, startup=None) -> None:
  """Binds the port, starts the service on a thread (requests wait for it; /healthz says "starting"),
  then serves until SIGINT/SIGTERM, then drains, snapshots and exits. A start-up failure stops the
  server and is raised here (StartupError: the process exits with the reason). startup: earlier
  phases' seconds (imports) for the start-up breakdown logged at "ready" and shown in /healthz."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  _Server = _make_server_class()  # pylint: disable=invalid-name
  service = Service(config, workdir, encoder_dir)
  service.startup.update(startup or {})

  def started():
    if service.start_error is not None:
      server.should_exit = True  # nothing was served; run() returns and the error is raised below
      return
    logging.info("%s", json.dumps({"event": "ready", "start_seconds": service.start_seconds,
                                   "startup": service.startup}))

  def listening():  # the lifespan start-up: uvicorn binds the port right after it
    service.startup["process_s_at_listen"] = service_lib.process_age_seconds()
    logging.info("%s", json.dumps({"event": "listening", "host": str(config.host),
                                   "port": int(config.port), "workdir": workdir,
                                   "encoder_dir": encoder_dir, "startup": service.startup}))
    service.start_in_background(started)

  uv = uvicorn.Config(create_app(service, on_startup=listening), host=str(config.host),
                      port=int(config.port), log_level="warning", access_log=False, lifespan="on",
                      timeout_graceful_shutdown=10,
                      timeout_keep_alive=75,  # longer than clients keep idle pooled connections
                      limit_concurrency=int(config.limits.max_connections))
  server = _Server(uv)
  std_logging.getLogger("uvicorn.error").setLevel(std_logging.WARNING)
  try:
    server.run()
  finally:
    service.stop()  # no-op if the lifespan already stopped it; waits for a start under way
  if service.start_error is not None:
    raise service.start_error
