"""HTTP entry points of the push API (PROTOCOL.md section 2).

Thin: each view checks the signature, parses the body into a typed envelope,
calls one service and formats the answer. Every error is the contract's JSON
``{"code": n, "msg": "..."}`` with the same HTTP status; a backend that is down
is a 503 and nothing is half-stored.

Guarded by tests/notifications/test_api.py.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import cache_control
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ValidationError

from connections import bridge
from connections.protocol import MAX_UNREAD_LIMIT, MsgType
from pushsite.errors import BackendUnavailable

from . import envelopes, services
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


def api_view(*, method: str, signed: bool = True) -> Callable[[Callable[..., JsonResponse]], Any]:
    """Method check, signature check and error mapping for one API view.

    The view runs on the bridge's database threads, not on the thread Django
    starts per request under ASGI: those threads come and go, and a persistent
    database connection opened on each would pile up (MariaDB ran out of
    connections under a burst of pushes).
    """

    def decorate(view: Callable[..., JsonResponse]) -> Any:
        def handle(request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> JsonResponse:
            if request.method != method:
                response = api_response(405, f"method {request.method} not allowed; use {method}")
                response["Allow"] = method
                return response
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
                if length > settings.PUSH_API_MAX_REQUEST_BYTES:
                    raise ApiError(413, f"request body larger than {settings.PUSH_API_MAX_REQUEST_BYTES} bytes")
                raw = request.body
                if signed:
                    problem = check_signature(
                        secret=settings.PUSH_API_SECRET,
                        timestamp=request.headers.get("X-Push-Timestamp"),
                        signature=request.headers.get("X-Push-Signature"),
                        body=raw,
                        max_skew=settings.PUSH_API_MAX_SKEW,
                    )
                    if problem:
                        raise ApiError(401, problem)
                return view(request, *args, **kwargs)
            except ApiError as error:
                return api_response(error.status, error.msg)
            except RequestDataTooBig:
                return api_response(413, f"request body larger than {settings.PUSH_API_MAX_REQUEST_BYTES} bytes")
            except (BackendUnavailable, DatabaseError, redis.RedisError) as error:
                log.warning("push API %s: backend unavailable: %s", request.path, error)
                return api_response(503, "service unavailable: a backend is down, nothing was stored; retry later")
            except Exception:
                log.exception("push API %s failed", request.path)
                return api_response(500, "internal error")

        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
            return await bridge.call(handle, request=request, args=args, kwargs=kwargs)

        return wrapper

    return decorate


def parse_body(request: HttpRequest, envelope: type[BaseModel]) -> Any:
    if not request.body:
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        data = json.loads(request.body)
    except (ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return envelope.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, envelopes.describe(error)) from None


def _targeted_push(request: HttpRequest, envelope: type[envelopes._Targeted], msg_type: MsgType) -> JsonResponse:
    push = parse_body(request, envelope)
    uids = push.targets
    if len(uids) > settings.PUSH_API_INLINE_MAX_UIDS:
        job = services.push_job_create(msg_type=msg_type, uids=uids, body=push.body, from_uid=push.from_uid)
        return api_response(202, "ACCEPTED", {"job_id": str(job.id), "uids": len(uids)})
    result = services.notifications_push(msg_type=msg_type, uids=uids, body=push.body, from_uid=push.from_uid)
    return api_response(
        200,
        "SUCCESS",
        {
            "stored": result.stored,
            "sent": result.sent,
            "noce_acks": {str(uid): ack for uid, ack in result.noce_acks.items()},
        },
    )


@api_view(method="POST")
def user_message(request: HttpRequest) -> JsonResponse:
    """A personal notice (msg_type 7) to each uid."""
    return _targeted_push(request, envelopes.UserMessage, MsgType.USER_NOTICE)


@api_view(method="POST")
def comment_message(request: HttpRequest) -> JsonResponse:
    """A comment notification (msg_type 5) to each uid."""
    return _targeted_push(request, envelopes.CommentMessage, MsgType.COMMENT)


@api_view(method="POST")
def system_message(request: HttpRequest) -> JsonResponse:
    """A system notice (msg_type 6) to every online user, as a job."""
    push = parse_body(request, envelopes.SystemMessage)
    job = services.push_job_create(msg_type=MsgType.SYSTEM_NOTICE, uids=None, body=push.body, from_uid=0)
    return api_response(202, "ACCEPTED", {"job_id": str(job.id), "uids": None})


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


@cache_control(public=True, max_age=300)
@api_view(method="GET", signed=False)
def push_config(request: HttpRequest) -> JsonResponse:
    """What clients need to connect; cacheable for 5 minutes."""
    ws_url = settings.PUSH_WS_PUBLIC_URL
    if not ws_url:
        scheme = "wss" if request.is_secure() else "ws"
        ws_url = f"{scheme}://{request.get_host()}/ws/push/"
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
    # Public and the same for every page: the main site's pages (another origin) read it.
    response["Access-Control-Allow-Origin"] = "*"
    return response


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers."""
    return api_response(200, "SUCCESS", {})


@csrf_exempt
def api_not_found(request: HttpRequest) -> JsonResponse:
    return api_response(404, f"no API endpoint at {request.path[:100]}")
