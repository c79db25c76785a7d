"""Errors of the served API, each carrying the HTTP status it maps to and a message naming the problem.

Everything a client can get wrong raises a `RequestError` (a ValueError) before anything is charged; the
app turns it into `{"error": {"code": ..., "message": ...}}` with `status`. `StartupError` is what the
service raises when it refuses to start (unwritable or full workdir, damaged snapshot or journal,
accounts that disagree with the restored defense state): the process exits with that message and never
serves from a state it could not restore exactly.
"""


class RequestError(ValueError):
  """A client error: HTTP `status` (4xx), a short machine-readable `code`, and the message."""

  def __init__(self, status: int, code: str, message: str, *, headers=None):
    super().__init__(message)
    self.status = int(status)
    self.code = code
    self.message = message
    self.headers = dict(headers or {})


def bad_request(code: str, message: str) -> RequestError:
  return RequestError(400, code, message)


def unauthorized(code: str, message: str) -> RequestError:
  return RequestError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


def forbidden(code: str, message: str) -> RequestError:
  return RequestError(403, code, message)


def too_large(code: str, message: str) -> RequestError:
  return RequestError(413, code, message)


def unsupported_media(code: str, message: str) -> RequestError:
  return RequestError(415, code, message)


def unprocessable(code: str, message: str) -> RequestError:
  return RequestError(422, code, message)


def too_many(code: str, message: str, retry_after: float) -> RequestError:
  return RequestError(429, code, message, headers={"Retry-After": str(max(1, int(retry_after + 0.999)))})


class ServiceUnavailable(Exception):
  """The service cannot answer now (starting, stopping, or it could not persist an accounting)."""

  def __init__(self, message: str, retry_after: float = 1.0):
    super().__init__(message)
    self.message = message
    self.retry_after = retry_after


class StartupError(RuntimeError):
  """The service refuses to start; the message says why and what the operator can do."""
