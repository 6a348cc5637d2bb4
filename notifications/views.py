"""HTTP entry points: thin, they validate, call one service and format the answer."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers."""
    return JsonResponse({"code": 200, "msg": "SUCCESS", "data": {}})
