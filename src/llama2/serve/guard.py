"""What every request of the HTTP API passes through: the guard middleware and the JSON errors.

`Guard` counts responses, checks the API key on `/v1/*` and `/metrics`, and bounds the
body size; `install_error_handlers` makes every error JSON in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import ServerMetrics
from .protocol import APIError, error_body

__all__ = ["Guard", "install_error_handlers"]

_PROTECTED_PREFIXES = ("/v1/", "/metrics")
_ENDPOINTS = frozenset(
    {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
)  # metric labels; anything else counts as "other"
_ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_exceeded"}


def install_error_handlers(app: FastAPI) -> None:
    """Answer `APIError`s, validation errors, HTTP errors and anything unexpected as OpenAI-shaped JSON."""
    app.add_exception_handler(APIError, _api_error_response)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(Exception, _internal_error_response)


class Guard:
    """Pure ASGI middleware: counts responses, checks the API key and the body size.

    The body is read here (up to the limit) and replayed to the app, so an oversize
    body is a clean 413 and later `receive` calls still report a client disconnect.
    """

    def __init__(self, app, *, api_key: str | None, metrics: ServerMetrics, max_body_bytes: int):
        self.app, self.api_key, self.metrics, self.max_body_bytes = app, api_key, metrics, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            problem = self._auth_problem(scope)
            body = None if problem else await _read_body(receive, self.max_body_bytes)
            if problem is None and body is None:
                problem = APIError(
                    413, f"the request body is larger than {self.max_body_bytes} bytes", code="request_too_large"
                )
            if problem is not None:
                await _api_error_response(None, problem)(scope, receive, counted_send)
            else:
                await self.app(scope, _replay(body, receive), counted_send)
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.http_requests.labels(endpoint, str(status)).inc()

    def _auth_problem(self, scope) -> APIError | None:
        key = self.api_key
        if key is None or not scope["path"].startswith(_PROTECTED_PREFIXES):
            return None
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return APIError(
                401,
                "You didn't provide an API key: send it as `Authorization: Bearer YOUR_KEY`.",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds `limit` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the app will notice
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _api_error_response(request: Request | None, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _validation_error_response(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        message = f"We could not parse the JSON body of your request ({detail}). Send valid JSON."
        param = None
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing" and param is None:
        message = "The request needs a JSON body."
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        where = f" for '{param}'" if param else ""
        message = f"Invalid value{where}: {first.get('msg', 'invalid')}."
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


def _http_error_response(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = str(error.detail) if error.detail else "error"
    if error.status_code == 404:
        message = f"Unknown path {request.url.path}; see /v1/models, /v1/completions, /v1/chat/completions."
    kind = _ERROR_TYPES.get(error.status_code, "invalid_request_error")
    return JSONResponse(error_body(message, kind), status_code=error.status_code, headers=error.headers)


def _internal_error_response(request: Request, error: Exception) -> JSONResponse:
    message = f"internal error: {type(error).__name__}"
    return JSONResponse(error_body(message, "server_error"), status_code=500)
