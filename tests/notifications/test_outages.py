"""A backend that goes down: 503 at once, nothing half-stored, back to work after.

A daphne process reaches MariaDB (both shard databases) and Redis through
real TCP proxies that the tests cut and restore (tests/proxy.py). Real server
processes stopped and started again: tests/faults/test_mariadb_restart.py and
tests/faults/test_redis_restart.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings

from notifications.client import PushClient, PushError
from notifications.sharding import model_for_uid, shard_alias, shards_by_alias
from tests.proxy import TcpProxy
from tests.scrape import scrape
from tests.servers import daphne, database_url

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(
        not settings.REDIS_URL or len(shards_by_alias()) < 2,
        reason="needs MariaDB with two shard databases and Redis (the real configuration)",
    ),
]


def through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@pytest.fixture
def backends(verifier):
    redis_target = urlsplit(settings.REDIS_URL)
    proxies = {
        "default": TcpProxy("127.0.0.1", 3306),
        "shards0": TcpProxy("127.0.0.1", 3306),
        "shards1": TcpProxy("127.0.0.1", 3306),
        "redis": TcpProxy(redis_target.hostname or "127.0.0.1", redis_target.port or 6379),
    }
    node = daphne(
        "outage-node",
        PUSH_JOBS="inline",
        DB_CONNECT_TIMEOUT=2,
        DATABASE_URL=through(database_url("default"), proxies["default"]),
        PUSH_SHARD_DATABASE_URLS=",".join(
            through(database_url(alias), proxies[alias]) for alias in ("shards0", "shards1")
        ),
        REDIS_URL=through(settings.REDIS_URL, proxies["redis"]),
    )
    try:
        node.start()
        yield node, proxies
    finally:
        node.stop()
        for proxy in proxies.values():
            proxy.close()


def push(node, uids: list[int], *, retries: int = 3) -> tuple[int, dict]:
    client = PushClient(f"http://127.0.0.1:{node.port}", secret=settings.PUSH_API_SECRET, timeout=15, retries=retries)
    try:
        return 200, client.user_message(uids, {"outage": True})
    except PushError as error:
        return error.status, {"msg": error.msg}


@database_sync_to_async
def stored(uids: list[int]) -> int:
    return sum(model_for_uid(uid).objects.filter(to_uid=uid).count() for uid in uids)


def uid_on(alias: str, base: int) -> int:
    """A uid whose shard lives on the given alias."""
    return next(base * 128 + s for s in range(128) if shard_alias(s) == alias)


async def test_redis_down_is_503_with_nothing_stored_then_recovers(backends, new_uid):
    node, proxies = backends
    uid = new_uid()
    before = scrape(node.port)
    proxies["redis"].cut()
    # One request, not the client's retries (their backoff alone is 3.5-5.3 s):
    # the 503 comes at once, not after a hang.
    started = time.monotonic()
    status, answer = await asyncio.to_thread(push, node, [uid], retries=0)
    assert status == 503, answer
    assert "nothing was stored" in answer["msg"]
    assert time.monotonic() - started < 3
    status, answer = await asyncio.to_thread(push, node, [uid])  # and after the client's retries
    assert status == 503, answer
    assert await stored([uid]) == 0
    after = scrape(node.port)
    assert after.value("pushsite_backend_errors_total", backend="redis") > before.value(
        "pushsite_backend_errors_total", backend="redis"
    )
    path = "/api/notice/userMessage"
    assert after.value("pushsite_api_requests_total", path=path, code="503") >= 1  # the client retries 503

    proxies["redis"].restore()
    status, answer = await asyncio.to_thread(push, node, [uid])
    assert status == 200 and answer["data"]["stored"] == 1
    assert await stored([uid]) == 1


async def test_one_shard_database_down_leaves_nothing_on_the_other(backends, new_uid):
    node, proxies = backends
    base = new_uid()
    first, second = uid_on("shards0", base), uid_on("shards1", base)
    before = scrape(node.port)
    proxies["shards1"].cut()
    status, answer = await asyncio.to_thread(push, node, [first, second])
    assert status == 503, answer
    assert await stored([first, second]) == 0
    assert scrape(node.port).value("pushsite_backend_errors_total", backend="mysql") > before.value(
        "pushsite_backend_errors_total", backend="mysql"
    )

    proxies["shards1"].restore()
    status, answer = await asyncio.to_thread(push, node, [first, second])
    assert status == 200 and answer["data"]["stored"] == 2
    assert await stored([first, second]) == 2


async def test_login_while_the_database_is_down_is_503_and_the_socket_lives(backends, new_uid):
    node, proxies = backends
    uid = new_uid()
    async with websockets.connect(f"ws://127.0.0.1:{node.port}/ws/push/") as ws:

        async def request(action: str, body: dict | None = None) -> dict:
            await ws.send(json.dumps({"action": action, "body": body or {}, "seq": 1}))
            return json.loads(await asyncio.wait_for(ws.recv(), 15))

        proxies["default"].cut()
        started = time.monotonic()
        reply = await request("login", {"ukey": f"key-{uid}"})
        assert reply["msg_type"] == 9 and reply["code"] == 503, reply
        assert time.monotonic() - started < 10
        assert (await request("heartbeat"))["code"] == 200

        proxies["default"].restore()
        reply = await request("login", {"ukey": f"key-{uid}"})
        assert reply["code"] == 200 and reply["body"]["uid"] == uid
