"""Helpers for the push API: signed requests through the real ASGI application."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator
from django.conf import settings

from notifications.sharding import model_for_uid
from notifications.signing import signed_headers


class Api:
    """Sends requests to the ASGI app as the main site would, signed by default."""

    async def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        raw: bytes | None = None,
        sign: bool = True,
        headers: dict[str, str] | None = None,
        secret: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        from pushsite.asgi import application

        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        all_headers = {"content-type": "application/json", "host": "testserver"}
        if sign:
            all_headers.update(
                {k.lower(): v for k, v in signed_headers(secret or settings.PUSH_API_SECRET, body).items()}
            )
        all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
        communicator = HttpCommunicator(
            application,
            method,
            path,
            body=body,
            headers=[(k.encode(), v.encode()) for k, v in all_headers.items()],
        )
        response = await communicator.get_response(timeout=10)
        content = response["body"]
        return response["status"], json.loads(content) if content else {}

    async def post(self, path: str, payload: Any = None, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        return await self.call("POST", path, payload, **kwargs)


@pytest.fixture
def api() -> Api:
    return Api()


@database_sync_to_async
def stored_rows(uid: int, **filters: Any) -> list[Any]:
    """The rows of a uid in its shard table, oldest first."""
    return list(model_for_uid(uid).objects.filter(to_uid=uid, **filters).order_by("id"))


@pytest.fixture
def rows() -> Callable[..., Any]:
    return stored_rows
