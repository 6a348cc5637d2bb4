"""Shared fixtures: a real main-site verify server, sockets, fresh uids.

The suite runs twice (scripts/test.sh): against MariaDB and Redis, and in the
embedded configuration. Nothing between pushsite and a backend is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.conf import settings as django_settings
from django.core.cache import cache
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from connections.auth import close_http_client
from notifications.signing import signed_headers

VERIFY_TOKEN = "test-verify-token"
REAL_BACKENDS = bool(os.environ.get("DATABASE_URL")) and bool(os.environ.get("REDIS_URL"))

# Property tests run a short profile in the suite and a long one on demand:
#     HYPOTHESIS_PROFILE=long .venv/bin/pytest --timeout 0 tests/fuzz tests/connections/test_protocol.py
# No deadline: examples that go through a real server vary with its load.
hypothesis_settings.register_profile(
    "default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.register_profile(
    "long", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_report_header(config: pytest.Config) -> str:
    db = django_settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    layer = "redis" if django_settings.REDIS_URL else "in-process"
    return f"pushsite configuration: database={db}, redis={layer}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With shards on their own databases, every DB test sets up and cleans them all."""
    if len(django_settings.DATABASES) == 1:
        return
    for item in items:
        marker = item.get_closest_marker("django_db")
        if marker is not None and "databases" not in marker.kwargs:
            item.add_marker(pytest.mark.django_db(*marker.args, **marker.kwargs, databases="__all__"), append=False)


class VerifyServer:
    """The main site's verify endpoint (PROTOCOL.md section 3), for real, on loopback.

    Login keys: ``key-<uid>`` -> uid; ``slow-<uid>`` answers after 3 s;
    ``error`` -> HTTP 500; ``garbage`` -> not JSON; anything else -> uid 0.
    A wrong ``token`` parameter gets code 403.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                key = query.get("loginkey", "")
                with server.lock:
                    server.calls[key] += 1
                if query.get("token") != VERIFY_TOKEN or not query.get("timestamp", "").isdigit():
                    return self._json(200, {"code": 403, "msg": "bad token", "data": {}})
                if key == "error":
                    return self._json(500, {"code": 500})
                if key == "garbage":
                    return self._raw(200, b"<html>not json</html>")
                if key.startswith("slow-"):
                    time.sleep(3)
                    key = "key-" + key.removeprefix("slow-")
                uid = int(key.removeprefix("key-")) if key.startswith("key-") and key[4:].isdigit() else 0
                return self._json(200, {"code": 200, "data": {"uid": uid}})

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                self._raw(status, json.dumps(payload).encode())

            def _raw(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            # A site's listen backlog, not http.server's 5: a burst of logins
            # opens dozens of verify connections at once.
            request_queue_size = 128

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/push/verify"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def verify_server() -> Iterator[VerifyServer]:
    server = VerifyServer()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _isolated(settings: Any) -> None:
    """Each test: its own Redis key prefix (pub/sub channels are server-wide) and an empty cache."""
    settings.PUSH_REDIS_PREFIX = f"pushtest-{uuid.uuid4().hex[:10]}"
    cache.clear()


@pytest.fixture
def verifier(settings: Any, verify_server: VerifyServer) -> VerifyServer:
    """Point login verification at the real local verify server."""
    settings.PUSH_ENV = "test"
    settings.PUSH_AUTH_VERIFY_URL = verify_server.url
    settings.PUSH_AUTH_VERIFY_TOKEN = VERIFY_TOKEN
    settings.PUSH_AUTH_VERIFY_TIMEOUT = 1.0
    with verify_server.lock:
        verify_server.calls.clear()
    return verify_server


_uids = itertools.count(random.randrange(10_000, 9_000_000) * 1000)


@pytest.fixture
def new_uid() -> Callable[[], int]:
    """Fresh uids, so tests never see each other's rows."""
    return lambda: next(_uids)


class Socket:
    """A WebSocket client on the ASGI application, with frame helpers."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator
        self.seq = 0

    async def send(self, action: str, body: dict[str, Any] | None = None, **extra: Any) -> int:
        self.seq += 1
        frame: dict[str, Any] = {"action": action, "seq": self.seq, **extra}
        if body is not None:
            frame["body"] = body
        await self.communicator.send_json_to(frame)
        return self.seq

    async def send_text(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def recv(self, timeout: float = 3) -> dict[str, Any]:
        return await self.communicator.receive_json_from(timeout=timeout)

    async def request(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        seq = await self.send(action, body)
        reply = await self.recv()
        assert reply["seq"] == seq, reply
        return reply

    async def login(self, key: str) -> dict[str, Any]:
        return await self.request("login", {"ukey": key})

    async def nothing(self, timeout: float = 0.3) -> bool:
        return await self.communicator.receive_nothing(timeout=timeout)

    async def close_frame(self, timeout: float = 3) -> dict[str, Any]:
        return await self.communicator.receive_output(timeout=timeout)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    """Open sockets to the real ASGI application; all are closed at teardown."""
    from pushsite.asgi import application

    opened: list[WebsocketCommunicator] = []

    async def _connect(path: str = "/ws/push/", headers: list[tuple[bytes, bytes]] | None = None) -> Socket:
        communicator = WebsocketCommunicator(application, path, headers=headers or [])
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        opened.append(communicator)
        return Socket(communicator)

    yield _connect
    for communicator in opened:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, AssertionError):
            await communicator.disconnect(timeout=2)
    await close_http_client()


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
                {k.lower(): v for k, v in signed_headers(secret or django_settings.PUSH_API_SECRET, body).items()}
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
