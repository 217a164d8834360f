"""The FastAPI app of the CLL scoring API: routes, request limits, auth and error mapping.

`build_http_app(service)` builds the app around any object with `score(job)`, `models()`
and `reload(model)` coroutines plus the limits below; the Ray Serve ingress (deployments.py)
is one such object, so the HTTP layer is the same with or without Ray.

Error policy: every problem with the input is a 4xx whose `detail` says what is wrong
(400 malformed JSON, bad Content-Length or an unusable model path, 401 a missing or wrong key,
403 a key without the right: a scoring key on a reload, reloads disabled, a model path outside
the model roots; 404/405 routing, 413 body or item count over the limit, 415 a body that is not
declared JSON, 422 wrong types or an item the model cannot score); a 500 means a bug (or a
promotion that could not be recorded) and a 503 an unavailable backend, never bad input.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from opsft.serve.core import Job
from opsft.serve.schemas import ErrorResponse, ModelsResponse, ReloadRequest, ScoreRequest, ScoreResponse

log = logging.getLogger("ray.serve.opsft")  # under Serve's logger: lands in the replica logs

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 503)}
RELOAD = "/v1/models/reload"
JSON_ROUTES = {("POST", "/v1/score"), ("POST", RELOAD)}  # the routes that read a JSON body
MAX_ERRORS = 20  # schema errors listed in a 422 body: a hostile body must not get a huge answer


@dataclass(frozen=True)
class Limits:
    """Request limits and keys (opsft.serve.auth). api_key scores and reads; admin_key also reloads.
    No api_key is allowed only with allow_open (every route open); no admin_key refuses reloads
    unless allow_open (then a reload needs what every route needs)."""

    max_items: int = 64
    max_body_bytes: int = 2 * 1024 * 1024
    api_key: str | None = None
    admin_key: str | None = None
    allow_open: bool = False

    def __post_init__(self):
        if self.api_key is None and not self.allow_open:
            raise ValueError("Limits: no api_key: give one, or allow_open=True to serve without auth")


def json_error(status: int, detail: str, headers: dict | None = None, errors: list | None = None) -> JSONResponse:
    body = {"detail": detail} if errors is None else {"detail": detail, "errors": errors}
    return JSONResponse(status_code=status, content=body, headers=headers)


class Guard:
    """ASGI middleware: bearer-token auth (all routes but /healthz), the body's media type
    (JSON routes), the body size limit (Content-Length and the streamed body both count), and
    per-request metrics/logging."""

    def __init__(self, app, limits: Limits, on_request: Callable[[str, int, float], None] | None = None):
        self.app, self.limits, self.on_request = app, limits, on_request

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            early = self._check_auth(scope) or self._check_type(scope) or self._check_length(scope)
            if early is None:
                body, early = await self._read_body(receive)
            if early is not None:
                await early(scope, receive, send_tracked)
                return
            await self.app(scope, replay(body, receive), send_tracked)
        finally:
            ms = (time.perf_counter() - start) * 1000
            route = route_of(scope)
            log.info("%s %s -> %d in %.1f ms", scope.get("method"), route, status[0], ms)
            if self.on_request is not None:
                self.on_request(route, status[0], ms)

    def _check_auth(self, scope):
        route, lim = route_of(scope), self.limits
        if route == "/healthz":
            return None
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        token = token.strip().encode() if scheme.lower() == "bearer" else None
        is_admin = matches(token, lim.admin_key)
        reload = route == RELOAD
        if lim.api_key is not None or (reload and lim.admin_key is not None):
            if not (is_admin or matches(token, lim.api_key)):
                why = "missing" if not given else "wrong"
                what = "admin key" if reload and lim.admin_key is not None else "API key"
                return json_error(401, f"{why} {what}: send the header 'Authorization: Bearer <key>'",
                                  headers={"WWW-Authenticate": "Bearer"})
        if not reload or is_admin:
            return None
        if lim.admin_key is None:
            if lim.allow_open:
                return None
            return json_error(403, "reloads are disabled: the service has no admin key (set admin_key_env, "
                                   "default OPSFT_ADMIN_KEY, or admin_key_file where the service runs)")
        return json_error(403, "this key may score but not reload: POST /v1/models/reload needs the admin key")

    def _check_type(self, scope):
        if (scope.get("method"), route_of(scope)) not in JSON_ROUTES:
            return None
        raw = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        media = raw.partition(";")[0].strip().lower()
        if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
            return None
        return json_error(415, f"the body must be JSON: send 'Content-Type: application/json' (got "
                               f"{repr(raw[:64]) if raw else 'no Content-Type'})")

    def _check_length(self, scope):
        raw = dict(scope.get("headers") or []).get(b"content-length")
        if raw is None:
            return None
        try:
            length = int(raw)
        except ValueError:
            return json_error(400, f"Content-Length is not a number: {raw[:32]!r}")
        if length > self.limits.max_body_bytes:
            return json_error(413, f"request body is {length} bytes; the limit is {self.limits.max_body_bytes}")
        return None

    async def _read_body(self, receive):
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", json_error(400, "client disconnected before sending the body")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limits.max_body_bytes:
                return b"", json_error(413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def matches(token: bytes | None, key: str | None) -> bool:
    """The token is the key (constant-time comparison)."""
    return token is not None and key is not None and hmac.compare_digest(token, key.encode())


def replay(body: bytes, receive):
    """An ASGI receive that hands the already read body over once, then defers to the client."""
    sent = [False]

    async def receive_again():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def route_of(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def describe(errors: list[dict]) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(str(x)[:100] for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def plain_errors(errors) -> list[dict]:
    """The first MAX_ERRORS schema errors as JSON-safe dicts (locations cut at 100 characters:
    an unknown key is part of its location, and a key can be as long as the body)."""
    return [{"loc": [str(x)[:100] for x in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in errors[:MAX_ERRORS]]


def build_http_app(service, limits: Limits, on_request=None) -> FastAPI:
    app = FastAPI(title="opsft CLL scoring API", version="1",
                  description="Centered log-likelihood (phi = log p + H) of responses under the served model. "
                              "Send 'Authorization: Bearer <key>' (all routes but /healthz): the API key scores and "
                              "reads, the admin key also reloads.")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        found = exc.errors()
        status = 400 if any(e.get("type") == "json_invalid" for e in found) else 422
        return json_error(status, ("malformed JSON: " if status == 400 else "invalid request: ") + describe(found),
                          errors=plain_errors(found))

    @app.exception_handler(Exception)
    async def crashed(_request, exc: Exception):
        log.exception("request failed")
        if is_unavailable(exc):
            return json_error(503, f"scoring backend unavailable, retry later: {type(exc).__name__}")
        return json_error(500, f"internal error: {type(exc).__name__}: {exc}"[:500])

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERRORS)
    async def models():
        return await service.models()

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, responses=ERRORS)
    async def score(req: ScoreRequest):
        if len(req.items) > limits.max_items:
            raise HTTPException(413, f"too many items: {len(req.items)} > {limits.max_items}; split the request")
        job = Job(rows=[item.as_row() for item in req.items], include_eos=req.include_eos,
                  return_tokens=req.return_tokens)
        answer = await service.score(job)
        if "status" in answer:  # a 503 (the engine failed; its replica is being replaced) says when to come back
            return json_error(answer["status"], answer["detail"],
                              headers={"Retry-After": "5"} if answer["status"] == 503 else None)
        return answer

    @app.post(RELOAD, response_model=ModelsResponse, responses=ERRORS)
    async def reload(req: ReloadRequest):
        answer = await service.reload(req.model)
        if "status" in answer:
            return json_error(answer["status"], answer["detail"])
        return answer

    app.add_middleware(Guard, limits=limits, on_request=on_request)
    return app


def is_unavailable(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in (exc, exc.__cause__, getattr(exc, "cause", None)) if e is not None}
    return bool(names & {"RayActorError", "ActorDiedError", "ActorUnavailableError", "BackPressureError",
                         "DeploymentUnavailableError", "TimeoutError"})
