"""What the outage tests share: a redis-server of their own, reconnecting clients, counted pushes."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import redis
import websockets
from channels.db import database_sync_to_async
from django.conf import settings

from connections.models import Connection, UserStatus
from notifications.client import PushClient, PushError
from notifications.sharding import model_for_uid
from tests.servers import ServerProcess

PUSHERS = 2


def redis_server(port: int, *extra: str, name: str = "redis") -> ServerProcess:
    """A redis-server of our own that keeps nothing on disk: a restart starts empty."""
    args = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    return ServerProcess(name, [*args, "--dir", tempfile.mkdtemp(prefix="pushsite-redis-"), *extra], {}, port=port)


class Client:
    """One user's socket, reconnected and logged in again whenever it closes."""

    def __init__(self, url: str, uid: int) -> None:
        self.url = url
        self.uid = uid
        self.live: set[str] = set()
        self.connections = 0
        self.login_refusals = 0
        self.logged_in = asyncio.Event()
        self._ws: Any = None
        self._seq = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def run(self) -> None:
        while True:
            try:
                async with websockets.connect(self.url, open_timeout=5, max_queue=None) as ws:
                    self._ws = ws
                    self.connections += 1
                    reader = asyncio.create_task(self._read(ws))
                    try:
                        await self._login()
                        await reader
                    finally:
                        reader.cancel()
                        self.logged_in.clear()
            except (OSError, TimeoutError, websockets.ConnectionClosed):
                pass
            self.logged_in.clear()
            await asyncio.sleep(0.2)

    async def _read(self, ws: Any) -> None:
        async for text in ws:
            frame = json.loads(text)
            assert "Traceback" not in text
            waiter = self._pending.pop(frame["seq"], None) if frame["seq"] is not None else None
            if waiter is not None:
                waiter.set_result(frame)
            elif frame["msg_type"] == 7:
                assert frame["body"]["to_uid"] == self.uid
                self.live.add(frame["noce_ack"])
            else:
                raise AssertionError(f"unexpected frame {frame}")

    async def _login(self) -> None:
        while True:
            reply = await self.request("login", {"ukey": f"key-{self.uid}"}, timeout=10)
            if reply["code"] == 200:
                self.logged_in.set()
                return
            # Redis down: the login is refused with 503 and the socket stays open.
            assert reply["msg_type"] == 9 and reply["code"] == 503, reply
            self.login_refusals += 1
            await asyncio.sleep(0.2)

    async def drop(self) -> None:
        """Close the socket as a client that lost its network would; run() reconnects."""
        await self._ws.close()

    async def request(self, action: str, body: dict[str, Any] | None = None, timeout: float = 5) -> dict[str, Any]:
        self._seq += 1
        future = self._pending[self._seq] = asyncio.get_running_loop().create_future()
        await self._ws.send(json.dumps({"action": action, "body": body or {}, "seq": self._seq}))
        return await asyncio.wait_for(future, timeout)


class Pushes:
    """Every push sent, and what the API answered."""

    def __init__(self, port: int) -> None:
        # retries=0: the test counts every 503 the outage gives.
        self.api = PushClient(f"http://127.0.0.1:{port}", secret=settings.PUSH_API_SECRET, timeout=10, retries=0)
        self.acked: dict[int, dict[str, int]] = defaultdict(dict)  # uid -> noce_ack -> n
        self.refused: list[tuple[int, float]] = []  # (status, seconds it took)
        self.sent = 0

    def acknowledged(self) -> int:
        """How many pushes the API answered 2xx."""
        return sum(len(acks) for acks in self.acked.values())

    def push(self, uid: int) -> int:
        n, self.sent = self.sent, self.sent + 1
        started = time.monotonic()
        try:
            answer = self.api.user_message([uid], {"n": n})
        except PushError as error:
            self.refused.append((error.status, time.monotonic() - started))
            return error.status
        self.acked[uid][answer["data"]["noce_acks"][str(uid)]] = n
        return answer["code"]

    async def loop(self, uids: list[int], offset: int) -> None:
        turn = offset
        while True:
            await asyncio.to_thread(self.push, uids[turn % len(uids)])
            turn += PUSHERS
            await asyncio.sleep(0.01)


@database_sync_to_async
def stored(uids: list[int]) -> dict[int, list[tuple[str, int]]]:
    """(noce_ack, body n) of every row of these users."""
    return {
        uid: [(row.noce_ack, row.body["n"]) for row in model_for_uid(uid).objects.filter(to_uid=uid)] for uid in uids
    }


async def came_through(node: ServerProcess, clients: list[Client], pushers: list[asyncio.Task[None]]) -> None:
    """Stop the pushers; the node is alive and healthy, and every client is logged in again."""
    for task in pushers:
        task.cancel()
    await asyncio.gather(*pushers, return_exceptions=True)
    assert node.proc is not None and node.proc.poll() is None, node.output()
    assert await asyncio.to_thread(healthz, node.port) == 200
    await asyncio.wait_for(asyncio.gather(*(c.logged_in.wait() for c in clients)), 15)


def refused_at_once(pushes: Pushes, acked_before: int, acked_at_recovery: int, what: str) -> None:
    """While the backend was away the API answered 503 at once, and only that; it took pushes before and after."""
    assert pushes.refused, f"no push met the {what}"
    assert {status for status, _ in pushes.refused} == {503}, pushes.refused
    assert max(seconds for _, seconds in pushes.refused) < 5
    acked_after = pushes.acknowledged()
    assert 0 < acked_before <= acked_at_recovery < acked_after, f"no push acknowledged before or after the {what}"


async def served_again(pushes: Pushes, clients: list[Client], after: str) -> None:
    """A push to each client, once the backend is back, reaches it live."""
    sent = {}
    for client in clients:
        answer = await asyncio.to_thread(pushes.api.user_message, [client.uid], {"n": -1})
        sent[client.uid] = answer["data"]["noce_acks"][str(client.uid)]
        pushes.acked[client.uid][sent[client.uid]] = -1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(sent[c.uid] not in c.live for c in clients):
        await asyncio.sleep(0.05)
    missed_live = [c.uid for c in clients if sent[c.uid] not in c.live]
    assert not missed_live, f"clients not served live after the {after}: {missed_live}"


async def delivered_once(pushes: Pushes, clients: list[Client]) -> int:
    """Every acknowledged push is stored exactly once and reached its user live or in unread; how many live."""
    rows = await stored([client.uid for client in clients])
    delivered_live = 0
    for client in clients:
        acked = pushes.acked[client.uid]
        assert len(acked) < 200  # one unread page holds them all
        reply = await client.request("unread", {"limit": 200, "msg_type": 7})
        assert reply["code"] == 200, reply
        unread = {item["noce_ack"] for item in reply["body"]["items"]}
        acks_stored = [ack for ack, _ in rows[client.uid]]
        for ack in acked:
            assert acks_stored.count(ack) == 1, (client.uid, ack)
            assert ack in client.live or ack in unread, (client.uid, ack)
        delivered_live += len(acked.keys() & client.live)
        # A push answered 503 stored nothing: every stored row was acknowledged.
        assert sorted(n for _, n in rows[client.uid]) == sorted(acked.values())
    return delivered_live


def relation(uids: list[int]) -> set[tuple[int, str]]:
    return set(Connection.objects.filter(uid__in=uids, user_status=UserStatus.ONLINE).values_list("uid", "conn_id"))


def presence_entries(port: int, uids: list[int], password: str | None = None) -> set[tuple[int, str]]:
    client = redis.Redis(port=port, password=password, decode_responses=True)
    try:
        return {
            (uid, conn_id) for uid in uids for conn_id in client.hkeys(f"{settings.PUSH_REDIS_PREFIX}:online:{uid}")
        }
    finally:
        client.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await database_sync_to_async(condition)():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return response.status
