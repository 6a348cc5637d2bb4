"""HTTP entry points of the push API (PROTOCOL.md section 2).

Thin: each view checks the signature, parses the body into a typed envelope,
calls one service and formats the answer. Every error is the contract's JSON
``{"code": n, "msg": "..."}`` with the same HTTP status; a backend that is down
is a 503 and nothing is half-stored.

The signed push endpoints are answered by ``PushApiApp`` in front of Django
(pushsite/asgi.py), with one hop to the bridge per request; their Django
routes stay and run the same ``checked_call``, so both ways check the same
signature and answer the same codes.

Guarded by tests/notifications/test_api.py.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, DataError, IntegrityError
from django.http import HttpRequest, JsonResponse
from django.http.request import split_domain_port, validate_host
from django.utils.cache import patch_cache_control, patch_vary_headers
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ValidationError

from connections import bridge
from connections.protocol import MAX_UNREAD_LIMIT, MsgType
from pushsite import metrics, strictjson
from pushsite.errors import BackendUnavailable

from . import envelopes, idempotency, services
from .idempotency import Answer
from .models import PushJob
from .signing import check_signature

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def api_response(status: int, msg: str, data: dict[str, Any] | None = None) -> JsonResponse:
    payload: dict[str, Any] = {"code": status, "msg": msg}
    if data is not None:
        payload["data"] = data
    return JsonResponse(payload, status=status, json_dumps_params={"ensure_ascii": False})


PushHandler = Callable[[bytes, str], idempotency.Answer]  # (raw body, seed) -> answer


def api_view(*, method: str, signed: bool = True) -> Callable[[Callable[..., JsonResponse]], Any]:
    """Method check, signature check and error mapping for one API view.

    The view runs on the bridge's database threads, not on the thread Django
    starts per request under ASGI: those threads come and go, and a persistent
    database connection opened on each would pile up (MariaDB ran out of
    connections under a burst of pushes).
    """

    def decorate(view: Callable[..., JsonResponse]) -> Any:
        def handle(request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> JsonResponse:
            return checked_call(
                method=request.method or "",
                allowed=method,
                path=request.path,
                length=request.META.get("CONTENT_LENGTH"),
                read_body=lambda: request.body,
                timestamp=request.headers.get("X-Push-Timestamp") if signed else None,
                signature=request.headers.get("X-Push-Signature") if signed else None,
                signed=signed,
                idempotency_key=request.headers.get("Idempotency-Key"),
                run=lambda raw: view(request, *args, **kwargs),
                push=getattr(view, "push_handler", None),
            )

        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
            return await bridge.call(handle, request=request, args=args, kwargs=kwargs)

        return wrapper

    return decorate


def checked_call(*, path: str, **kwargs: Any) -> JsonResponse:
    """``_checked_call``, counted and timed (pushsite_api_requests_total, _request_duration_seconds)."""
    started = time.perf_counter()
    response = _checked_call(path=path, **kwargs)
    route = metric_route(path)
    metrics.API_DURATION.labels(route).observe(time.perf_counter() - started)
    metrics.API_REQUESTS.labels(route, str(response.status_code)).inc()
    return response


def metric_route(path: str) -> str:
    """The path label of an API request: its route, never a job id (one series per route)."""
    if path.startswith("/api/push/jobs/"):
        return "/api/push/jobs/{job_id}"
    return path if path in METRIC_ROUTES else "other"


def _checked_call(
    *,
    method: str,
    allowed: str,
    path: str,
    length: str | int | None,
    read_body: Callable[[], bytes],
    timestamp: str | None,
    signature: str | None,
    signed: bool,
    run: Callable[[bytes], JsonResponse] | None = None,
    push: PushHandler | None = None,
    idempotency_key: str | None = None,
) -> JsonResponse:
    """What every API request goes through, whichever way it came in (Django or ``PushApiApp``).

    A ``push`` is run once per Idempotency-Key (or, without one, per
    signature): a retry or a replay gets the first answer again.
    """
    if method != allowed:
        response = api_response(405, f"method {method} not allowed; use {allowed}")
        response["Allow"] = allowed
        return response
    try:
        try:
            declared = int(length or 0)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if declared > settings.PUSH_API_MAX_REQUEST_BYTES:
            raise ApiError(413, f"request body larger than {settings.PUSH_API_MAX_REQUEST_BYTES} bytes")
        raw = read_body()
        if signed:
            problem = check_signature(
                secret=settings.PUSH_API_SECRET,
                timestamp=timestamp,
                signature=signature,
                body=raw,
                max_skew=settings.PUSH_API_MAX_SKEW,
            )
            if problem:
                raise ApiError(401, problem)
        if push is None:
            assert run is not None
            return run(raw)
        answer = idempotency.push_once(
            scope=path,
            header=idempotency_key,
            signature=signature,
            body=raw,
            run=lambda seed: push(raw, seed),
        )
        return api_response(answer.status, answer.msg, answer.data)
    except ApiError as error:
        return api_response(error.status, error.msg)
    except idempotency.InvalidKey as error:
        return api_response(400, str(error))
    except idempotency.KeyConflict as error:
        return api_response(409, str(error))
    except idempotency.StillAnswering as error:
        response = api_response(503, str(error))
        response["Retry-After"] = "1"
        return response
    except RequestDataTooBig:
        return api_response(413, f"request body larger than {settings.PUSH_API_MAX_REQUEST_BYTES} bytes")
    except (DataError, IntegrityError) as error:
        # The database is up and refused this row (a CHECK constraint such as
        # MariaDB's JSON_VALID, error 4025, or a value out of range): retrying
        # cannot help, so it is the sender's 400, not an outage's 503.
        log.warning("push API %s: the database refused the message: %s", path, error)
        return api_response(400, "the database refused this message (body or field out of range); nothing was stored")
    except (BackendUnavailable, DatabaseError, redis.RedisError) as error:
        if isinstance(error, DatabaseError):
            metrics.backend_error("mysql")
        elif isinstance(error, redis.RedisError):
            metrics.backend_error("redis")  # (a BackendUnavailable was counted where it was raised)
        log.warning("push API %s: backend unavailable: %s", path, error)
        return api_response(503, "service unavailable: a backend is down, nothing was stored; retry later")
    except Exception:
        log.exception("push API %s failed", path)
        return api_response(500, "internal error")


def parse_body(raw: bytes, envelope: type[BaseModel]) -> Any:
    if not raw:
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        data = strictjson.loads(raw)
    except strictjson.JsonRefused as error:
        raise ApiError(400, f"request body refused: {error}") from None
    except ValueError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return envelope.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, envelopes.describe(error)) from None


def _targeted_push(raw: bytes, seed: str, envelope: type[envelopes._Targeted], msg_type: MsgType) -> Answer:
    push = parse_body(raw, envelope)
    uids = push.targets
    if len(uids) > settings.PUSH_API_INLINE_MAX_UIDS:
        job = services.push_job_create(msg_type=msg_type, uids=uids, body=push.body, from_uid=push.from_uid, seed=seed)
        return Answer(202, "ACCEPTED", {"job_id": str(job.id), "uids": len(uids)})
    result = services.notifications_push(
        msg_type=msg_type, uids=uids, body=push.body, from_uid=push.from_uid, seed=seed
    )
    return Answer(
        200,
        "SUCCESS",
        {
            "stored": result.stored,
            "sent": result.sent,
            "noce_acks": {str(uid): ack for uid, ack in result.noce_acks.items()},
        },
    )


def _user_message(raw: bytes, seed: str) -> Answer:
    """A personal notice (msg_type 7) to each uid."""
    return _targeted_push(raw, seed, envelopes.UserMessage, MsgType.USER_NOTICE)


def _comment_message(raw: bytes, seed: str) -> Answer:
    """A comment notification (msg_type 5) to each uid."""
    return _targeted_push(raw, seed, envelopes.CommentMessage, MsgType.COMMENT)


def _system_message(raw: bytes, seed: str) -> Answer:
    """A system notice (msg_type 6) to every online user, as a job."""
    push = parse_body(raw, envelopes.SystemMessage)
    job = services.push_job_create(msg_type=MsgType.SYSTEM_NOTICE, uids=None, body=push.body, from_uid=0, seed=seed)
    return Answer(202, "ACCEPTED", {"job_id": str(job.id), "uids": None})


def push_view(handler: PushHandler) -> Any:
    """The Django route of a push endpoint: the same checks and the same handler as ``PushApiApp``'s."""

    def view(request: HttpRequest) -> JsonResponse:
        raise AssertionError("a push view is answered by its push_handler")  # pragma: no cover

    view.push_handler = handler  # type: ignore[attr-defined]
    view.__name__ = handler.__name__.lstrip("_")
    view.__doc__ = handler.__doc__
    return api_view(method="POST")(view)


user_message = push_view(_user_message)
comment_message = push_view(_comment_message)
system_message = push_view(_system_message)


@api_view(method="GET")
def job_status(request: HttpRequest, job_id: str) -> JsonResponse:
    """Progress of an accepted job."""
    try:
        job = PushJob.objects.get(id=uuid.UUID(job_id))
    except (ValueError, PushJob.DoesNotExist):
        raise ApiError(404, f"no job {job_id[:40]!r}") from None
    return api_response(
        200,
        "SUCCESS",
        {
            "job_id": str(job.id),
            "state": job.state,
            "msg_type": job.msg_type,
            "stored": job.stored,
            "sent": job.sent,
            "attempts": job.attempts,
            "error": job.error,
            "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        },
    )


# Host names a derived ws_url may name besides the explicit ALLOWED_HOSTS entries.
LOCAL_HOSTS = [".localhost", "127.0.0.1", "[::1]"]


def _host_named(host: str) -> bool:
    """Whether ALLOWED_HOSTS names this host itself (a bare "*" names none) or it is local."""
    domain, _port = split_domain_port(host)
    named = [pattern for pattern in settings.ALLOWED_HOSTS if pattern != "*"]
    return bool(domain) and validate_host(domain, named + LOCAL_HOSTS)


@api_view(method="GET", signed=False)
def push_config(request: HttpRequest) -> JsonResponse:
    """What clients need to connect; cacheable for 5 minutes."""
    ws_url = settings.PUSH_WS_PUBLIC_URL
    derived = not ws_url
    if derived:
        # A URL built from any Host header and cached publicly would let one
        # request point every client of a shared cache at another server.
        host = request.get_host()
        if not _host_named(host):
            return api_response(400, "Host not allowed for ws_url; set PUSH_WS_PUBLIC_URL or DJANGO_ALLOWED_HOSTS")
        scheme = "wss" if request.is_secure() else "ws"
        ws_url = f"{scheme}://{host}/ws/push/"
    response = JsonResponse(
        {
            "ws_url": ws_url,
            "heartbeat": 180,
            "heartbeat_timeout": 30,
            "reconnect_delays": [60, 120, 180],
            "login_retry": 30,
            "idle_timeout": settings.PUSH_IDLE_TIMEOUT,
            "max_frame_bytes": settings.PUSH_MAX_FRAME_BYTES,
            "unread_limit": MAX_UNREAD_LIMIT,
            "config_ttl": 300,
        }
    )
    # The same for every page: the main site's pages (another origin) read it.
    response["Access-Control-Allow-Origin"] = "*"
    if derived:
        patch_cache_control(response, private=True, max_age=300)
        patch_vary_headers(response, ["Host"])
    else:
        patch_cache_control(response, public=True, max_age=300)
    return response


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers."""
    return api_response(200, "SUCCESS", {})


@csrf_exempt
def api_not_found(request: HttpRequest) -> JsonResponse:
    return api_response(404, f"no API endpoint at {request.path[:100]}")


# --- the push API without Django's request cycle ------------------------------

# The signed push endpoints, served by ``PushApiApp``; the Django routes in
# notifications/urls.py stay, for anything that calls Django directly.
FAST_ROUTES: dict[str, PushHandler] = {
    "/api/notice/userMessage": _user_message,
    "/api/comment/message": _comment_message,
    "/api/notice/systemMessage": _system_message,
}
METRIC_ROUTES = frozenset({*FAST_ROUTES, "/api/push/config"})
for _route in METRIC_ROUTES:  # shown at 0 before the first request
    metrics.API_DURATION.labels(_route)
    metrics.API_REQUESTS.labels(_route, "200")


class PushApiApp:
    """ASGI: the signed push endpoints answered with one hop to the bridge; anything else goes to ``inner``.

    Why not Django's request cycle: under ASGI it starts a thread per request
    and hops to it for every sync middleware, signal receiver and the request
    body, about a dozen thread switches before and after the view. With the
    service's own work on the bridge that was most of the server's CPU per push
    (bench/README.md, latency). None of those middlewares means anything to a
    signed JSON API (no session, user, CSRF, frames or redirects); the Host
    check Django would make is made here.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in FAST_ROUTES:
            await self.inner(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if not _host_allowed(headers.get("host", "")):
            response = api_response(400, "Host header not allowed")
        else:
            body, too_big = await _read_body(receive, settings.PUSH_API_MAX_REQUEST_BYTES)
            if body is None:
                return  # the client went away before its body was in: nothing is done, as in Django
            response = await bridge.call(
                _fast_handle,
                path=scope["path"],
                method=scope["method"],
                headers=headers,
                body=body,
                too_big=too_big,
            )
        # What CommonMiddleware and SecurityMiddleware would add to a JSON answer.
        response["Content-Length"] = str(len(response.content))
        response["X-Content-Type-Options"] = "nosniff"
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.items()],
            }
        )
        await send({"type": "http.response.body", "body": response.content})


def _fast_handle(*, path: str, method: str, headers: dict[str, str], body: bytes, too_big: bool) -> JsonResponse:
    def read_body() -> bytes:
        if too_big:
            raise RequestDataTooBig
        return body

    return checked_call(
        method=method,
        allowed="POST",
        path=path,
        length=headers.get("content-length"),
        read_body=read_body,
        timestamp=headers.get("x-push-timestamp"),
        signature=headers.get("x-push-signature"),
        signed=True,
        idempotency_key=headers.get("idempotency-key"),
        push=FAST_ROUTES[path],
    )


async def _read_body(receive: Any, limit: int) -> tuple[bytes | None, bool]:
    """The request body; (b"", True) once it passes ``limit`` bytes, (None, False) if the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _host_allowed(host: str) -> bool:
    """Django's ALLOWED_HOSTS check (HttpRequest.get_host), for requests that skip Django."""
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    domain, _port = split_domain_port(host)
    return bool(domain) and validate_host(domain, allowed)
