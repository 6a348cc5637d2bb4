"""The WebSocket session through a real daphne process and a real client over TCP.

Each server is a ``daphne`` subprocess on a free loopback port, sharing the
test's database (MariaDB: the test database; embedded: its own SQLite file,
migrated first, read back with sqlite3) and logging in against the session's
verify server. Servers are started once per module per distinct environment.

Guards what only a real server shows: frames crossing TCP, close codes on the
wire, the idle sweep and the connection limit in a process of their own, and the
relation rows written by that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import redis
import websockets
from channels.db import database_sync_to_async
from django.conf import settings as django_settings
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from connections.models import Connection, Node, UserStatus
from connections.protocol import MAX_SEQ, CloseCode, Code, MsgType
from tests.conftest import REAL_BACKENDS, VERIFY_TOKEN
from tests.servers import BIN, ServerProcess, configuration_environment, free_port, prepare_server_database

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

needs_real = pytest.mark.skipif(not REAL_BACKENDS, reason="needs MariaDB and Redis (the real configuration)")


@dataclass
class Daphne:
    """One running daphne process and how to look at what it wrote."""

    process: ServerProcess
    node: str
    prefix: str
    sqlite_path: Path | None

    @property
    def port(self) -> int:
        assert self.process.port is not None
        return self.process.port

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/push/"

    def relation_rows_sync(self, uid: int) -> list[tuple[str, str, int, int]]:
        """(conn_id, node, user_status, client_type) of uid's rows, as the server wrote them."""
        if self.sqlite_path is not None:
            with contextlib.closing(sqlite3.connect(self.sqlite_path, timeout=10)) as db:
                rows = db.execute(
                    "SELECT conn_id, node, user_status, client_type FROM push_user_connection WHERE uid = ?", (uid,)
                ).fetchall()
            return sorted(rows)
        return sorted(Connection.objects.filter(uid=uid).values_list("conn_id", "node", "user_status", "client_type"))

    def node_age_sync(self) -> float | None:
        """Seconds since this server's liveness mark, or None without a Node row."""
        if self.sqlite_path is not None:
            with contextlib.closing(sqlite3.connect(self.sqlite_path, timeout=10)) as db:
                row = db.execute("SELECT heartbeat_at FROM push_node WHERE node_id = ?", (self.node,)).fetchone()
            if row is None:
                return None
            # Django stores aware datetimes in SQLite as naive UTC text.
            return time.time() - datetime.fromisoformat(row[0]).replace(tzinfo=UTC).timestamp()
        node = Node.objects.filter(node_id=self.node).first()
        return None if node is None else time.time() - node.heartbeat_at.timestamp()

    async def relation_rows(self, uid: int) -> list[tuple[str, str, int, int]]:
        return await database_sync_to_async(self.relation_rows_sync)(uid)

    async def node_age(self) -> float | None:
        return await database_sync_to_async(self.node_age_sync)()

    def presence(self, uid: int) -> dict[str, str] | None:
        """The server's Redis presence hash of uid; None without Redis (it is in the server's memory)."""
        if not django_settings.REDIS_URL:
            return None
        client = redis.Redis.from_url(django_settings.REDIS_URL, decode_responses=True)
        try:
            return client.hgetall(f"{self.prefix}:online:{uid}")
        finally:
            client.close()


@pytest.fixture(scope="module")
def server_base(django_db_setup, verify_server, tmp_path_factory) -> dict[str, Any]:
    """What every daphne of this module shares: its environment, and its SQLite file if embedded."""
    var_dir = tmp_path_factory.mktemp("daphne-var")
    env = configuration_environment(var_dir, verify_url=verify_server.url, verify_token=VERIFY_TOKEN)
    return {"env": env, "sqlite_path": prepare_server_database(env)}


@pytest.fixture(scope="module")
def start_daphne(server_base) -> Iterator[Callable[..., Daphne]]:
    """Start a daphne process, once per distinct settings; all are stopped at module end."""
    servers: dict[tuple[Any, ...], Daphne] = {}

    def _start(*daphne_args: str, **settings: str) -> Daphne:
        key = (*daphne_args, *sorted(settings.items()))
        running = servers.get(key)
        if running is not None and running.process.proc is not None and running.process.proc.poll() is None:
            return running
        node = f"daphne-{uuid.uuid4().hex[:8]}"
        prefix = f"pushtest-daphne-{uuid.uuid4().hex[:10]}"
        env = {**server_base["env"], "PUSH_NODE_ID": node, "PUSH_REDIS_PREFIX": prefix, **settings}
        for attempt in range(3):
            port = free_port()
            process = ServerProcess(
                node,
                [str(BIN / "daphne"), *daphne_args, "-b", "127.0.0.1", "-p", str(port), "pushsite.asgi:application"],
                env,
                port,
            )
            try:
                process.start()
            except RuntimeError:
                if attempt < 2 and "Address already in use" in process.output():
                    continue  # the free port was taken meanwhile
                raise
            servers[key] = Daphne(process, node, prefix, server_base["sqlite_path"])
            return servers[key]
        raise AssertionError("unreachable")

    yield _start
    for server in servers.values():
        server.process.stop()


@pytest.fixture
def daphne(start_daphne) -> Daphne:
    """A server with the default limits (idle timeout 180 s, 10000 connections)."""
    return start_daphne()


class Client:
    """A real WebSocket client on TCP, with the contract's frame helpers."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seq = 0

    async def send(self, action: str, body: dict[str, Any] | None = None) -> int:
        self.seq += 1
        frame: dict[str, Any] = {"action": action, "seq": self.seq}
        if body is not None:
            frame["body"] = body
        await self.ws.send(json.dumps(frame))
        return self.seq

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        text = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(text, str), "the server sends text frames"
        return json.loads(text)

    async def request(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        seq = await self.send(action, body)
        reply = await self.recv()
        assert reply["seq"] == seq, reply
        return reply

    async def login(self, key: str) -> dict[str, Any]:
        return await self.request("login", {"ukey": key})

    async def closed_with(self, timeout: float = 5) -> int:
        """Wait for the server to close the socket; the close code it sent."""
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        assert self.ws.close_code is not None
        return self.ws.close_code  # 1006 if the server sent no close frame


@pytest.fixture
async def ws_connect() -> Any:
    """Open real WebSocket clients; all are closed at teardown."""
    opened: list[ClientConnection] = []

    async def _connect(server: Daphne, **kwargs: Any) -> Client:
        ws = await websockets.connect(server.ws_url, open_timeout=5, **kwargs)
        opened.append(ws)
        return Client(ws)

    yield _connect
    for ws in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 5)


async def eventually(check: Callable[[], Any], *, timeout: float = 5.0) -> Any:
    """Poll an async check until it returns something truthy (or time is up); its last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.05)


# --- session basics ---------------------------------------------------------------


async def test_http_health_answers_on_the_same_port(daphne):
    with urlopen(f"http://127.0.0.1:{daphne.port}/healthz", timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"code": 200, "msg": "SUCCESS", "data": {}}


async def test_login_heartbeat_and_seq_echo_over_tcp(daphne, ws_connect, new_uid):
    uid = new_uid()
    client = await ws_connect(daphne)

    anonymous = await client.request("heartbeat")
    assert anonymous["msg_type"] == MsgType.HEARTBEAT and anonymous["code"] == 200
    assert anonymous["uid"] == 0
    assert abs(anonymous["body"]["ts"] - time.time() * 1000) < 60_000

    login = await client.login(f"key-{uid}")
    assert login["msg_type"] == MsgType.LOGIN and login["code"] == 200 and login["msg"] == "SUCCESS"
    assert login["body"] == {"uid": uid, "unread": {}}
    assert login["uid"] == uid

    beat = await client.request("heartbeat")
    assert beat["uid"] == uid and beat["seq"] == client.seq

    await client.ws.send(json.dumps({"action": "heartbeat", "seq": MAX_SEQ}))
    assert (await client.recv())["seq"] == MAX_SEQ
    await client.ws.send(json.dumps({"action": "heartbeat"}))
    assert (await client.recv())["seq"] is None
    await client.ws.send(json.dumps({"action": "heartbeat", "seq": 0}))
    assert (await client.recv())["seq"] == 0


async def test_replies_come_back_in_request_order(daphne, ws_connect):
    client = await ws_connect(daphne)
    sent = [await client.send("heartbeat") for _ in range(10)]
    assert [(await client.recv())["seq"] for _ in sent] == sent


async def test_refused_login_is_401_and_the_socket_stays_usable(daphne, ws_connect):
    client = await ws_connect(daphne)
    reply = await client.login("nobody-knows-me")
    assert reply["msg_type"] == MsgType.ERROR and reply["code"] == Code.LOGIN_REFUSED
    assert (await client.request("unread"))["code"] == Code.LOGIN_REQUIRED
    assert (await client.request("heartbeat"))["code"] == 200


# --- malformed frames ----------------------------------------------------------------


async def test_malformed_frames_get_errors_and_the_socket_keeps_working(daphne, ws_connect, new_uid):
    uid = new_uid()
    client = await ws_connect(daphne)
    await client.login(f"key-{uid}")

    await client.ws.send("this is not json")
    error = await client.recv()
    assert error["msg_type"] == MsgType.ERROR and error["code"] == Code.BAD_REQUEST
    assert "not valid JSON" in error["msg"] and error["seq"] is None

    await client.ws.send(json.dumps({"action": "subscribe", "seq": 41}))
    error = await client.recv()
    assert error["code"] == Code.BAD_REQUEST and "unknown action" in error["msg"] and error["seq"] == 41

    await client.ws.send(json.dumps({"action": "ack", "body": {"noce_acks": []}, "seq": 42}))
    error = await client.recv()
    assert error["code"] == Code.BAD_REQUEST and "body.noce_acks" in error["msg"] and error["seq"] == 42

    await client.ws.send(json.dumps({"action": "heartbeat", "pad": "x" * (64 * 1024)}))
    error = await client.recv()
    assert error["msg_type"] == MsgType.ERROR and error["code"] == Code.TOO_LARGE

    await client.ws.send(json.dumps({"action": "heartbeat", "pad": "é" * 40_000}, ensure_ascii=False))
    assert (await client.recv())["code"] == Code.TOO_LARGE

    await client.ws.send(b"\x00\x01binary")
    error = await client.recv()
    assert error["code"] == Code.BAD_REQUEST and "binary" in error["msg"]

    beat = await client.request("heartbeat")
    assert beat["code"] == 200 and beat["uid"] == uid  # still open, still logged in
    assert len(await daphne.relation_rows(uid)) == 1


# --- liveness and limits --------------------------------------------------------------


async def test_idle_socket_gets_kick_4000_then_close_code_4000(start_daphne, ws_connect, new_uid):
    server = start_daphne(PUSH_IDLE_TIMEOUT="2")
    uid = new_uid()
    client = await ws_connect(server)
    assert (await client.login(f"key-{uid}"))["code"] == 200

    kick = await client.recv(timeout=10)
    assert kick["msg_type"] == MsgType.KICK
    assert kick["code"] == CloseCode.IDLE_TIMEOUT == 4000
    assert await client.closed_with() == 4000

    async def row_gone() -> bool:
        return await server.relation_rows(uid) == []

    assert await eventually(row_gone), await server.relation_rows(uid)


async def test_frames_keep_a_socket_alive_past_the_idle_timeout(start_daphne, ws_connect):
    server = start_daphne(PUSH_IDLE_TIMEOUT="1")
    client = await ws_connect(server)
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.5
    while loop.time() < until:
        assert (await client.request("heartbeat"))["code"] == 200
        await asyncio.sleep(0.3)
    assert (await client.request("heartbeat"))["msg_type"] == MsgType.HEARTBEAT


async def admitted(ws_connect: Callable[..., Any], server: Daphne) -> Client | None:
    """A new client if the server takes it (answers a heartbeat), None if it was kicked."""
    client = await ws_connect(server)
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        await client.send("heartbeat")  # a kicked socket may be closed already
        if (await client.recv())["msg_type"] == MsgType.HEARTBEAT:
            return client
    return None


async def fill(ws_connect: Callable[..., Any], server: Daphne, count: int) -> list[Client]:
    """Take count places (waiting for the sockets of earlier tests to be let go)."""
    clients = []
    for _ in range(count):
        client = await eventually(lambda: admitted(ws_connect, server))
        assert client is not None, "the server did not take a client below its limit"
        clients.append(client)
    return clients


async def test_full_server_kicks_with_503_and_closes_1013(start_daphne, ws_connect):
    server = start_daphne(PUSH_MAX_CONNECTIONS="2")
    await fill(ws_connect, server, 2)
    third = await ws_connect(server)
    kick = await third.recv()
    assert kick["msg_type"] == MsgType.KICK and kick["code"] == Code.UNAVAILABLE
    assert kick["seq"] is None and kick["noce_ack"] is None
    assert await third.closed_with() == CloseCode.TRY_AGAIN_LATER == 1013


async def test_full_server_keeps_its_clients_and_admits_again_after_a_close(start_daphne, ws_connect):
    server = start_daphne(PUSH_MAX_CONNECTIONS="2")
    first, second = await fill(ws_connect, server, 2)
    assert await admitted(ws_connect, server) is None

    assert (await first.request("heartbeat"))["code"] == 200
    assert (await second.request("heartbeat"))["code"] == 200

    await first.ws.close()
    assert await eventually(lambda: admitted(ws_connect, server)) is not None
    assert (await second.request("heartbeat"))["code"] == 200


async def test_origin_not_listed_is_refused_at_handshake(start_daphne, ws_connect):
    server = start_daphne(PUSH_ALLOWED_ORIGINS="https://www.example.com")
    allowed = await ws_connect(server, origin="https://www.example.com")
    assert (await allowed.request("heartbeat"))["code"] == 200
    no_origin = await ws_connect(server)  # apps and servers send no Origin
    assert (await no_origin.request("heartbeat"))["code"] == 200
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(server, origin="https://evil.example.net")
    assert refused.value.response.status_code == 403


# --- relation rows written by the server ----------------------------------------------


async def test_relation_row_exists_after_login_and_is_gone_after_close(daphne, ws_connect, new_uid):
    uid = new_uid()
    client = await ws_connect(daphne)
    assert (await client.request("login", {"token": f"key-{uid}"}))["code"] == 200

    [(conn_id, node, status, client_type)] = await daphne.relation_rows(uid)
    assert node == daphne.node
    assert conn_id.startswith(f"{daphne.node}.")
    assert (status, client_type) == (UserStatus.ONLINE, 2)
    presence = daphne.presence(uid)
    if presence is not None:
        assert list(presence) == [conn_id]
        assert presence[conn_id].startswith(f"{daphne.node} 2 ")

    age = await eventually(daphne.node_age)
    assert age is not None and age < 30, "the server keeps a fresh liveness mark while sockets are open"

    await client.ws.close()

    async def row_gone() -> bool:
        return await daphne.relation_rows(uid) == []

    assert await eventually(row_gone), await daphne.relation_rows(uid)
    if presence is not None:
        assert daphne.presence(uid) == {}


async def test_logout_over_tcp_marks_the_row_offline_and_keeps_the_socket(daphne, ws_connect, new_uid):
    uid = new_uid()
    client = await ws_connect(daphne)
    await client.login(f"key-{uid}")
    reply = await client.request("logout")
    assert reply["msg_type"] == MsgType.LOGOUT and reply["code"] == 200
    [(_, _, status, _)] = await daphne.relation_rows(uid)
    assert status == UserStatus.OFFLINE
    if daphne.presence(uid) is not None:
        assert daphne.presence(uid) == {}
    assert (await client.request("heartbeat"))["uid"] == 0


async def test_two_sockets_of_one_uid_are_both_logged_in(daphne, ws_connect, new_uid):
    uid = new_uid()
    tab, phone = await ws_connect(daphne), await ws_connect(daphne)
    assert (await tab.login(f"key-{uid}"))["body"]["uid"] == uid
    assert (await phone.request("login", {"token": f"key-{uid}"}))["body"]["uid"] == uid

    rows = await daphne.relation_rows(uid)
    assert len(rows) == 2
    assert len({conn_id for conn_id, *_ in rows}) == 2
    assert sorted(client_type for *_, client_type in rows) == [1, 2]
    assert {status for _, _, status, _ in rows} == {UserStatus.ONLINE}
    presence = daphne.presence(uid)
    if presence is not None:
        assert set(presence) == {conn_id for conn_id, *_ in rows}

    assert (await tab.request("heartbeat"))["uid"] == uid
    assert (await phone.request("heartbeat"))["uid"] == uid

    await tab.ws.close()

    async def one_left() -> bool:
        return len(await daphne.relation_rows(uid)) == 1

    assert await eventually(one_left)
    assert (await phone.request("heartbeat"))["uid"] == uid


@needs_real
async def test_push_replays_at_login_and_reaches_every_socket_of_the_user(daphne, ws_connect, new_uid, settings):
    from notifications.services import notifications_push
    from notifications.sharding import model_for_uid

    settings.PUSH_REDIS_PREFIX = daphne.prefix  # publish on the server's bus, see its presence
    uid = new_uid()
    push = database_sync_to_async(notifications_push)
    while_away = await push(msg_type=MsgType.USER_NOTICE, uids=[uid], body={"title": "while away"}, from_uid=0)
    assert while_away.sent == 0
    ack = while_away.noce_acks[uid]

    tab = await ws_connect(daphne)
    login = await tab.login(f"key-{uid}")
    assert login["body"]["unread"] == {"7": 1}
    replayed = await tab.recv()
    assert replayed["msg_type"] == MsgType.USER_NOTICE
    assert replayed["noce_ack"] == ack
    assert replayed["body"] == {"to_uid": uid, "title": "while away"}

    @database_sync_to_async
    def marked_sent() -> bool:
        return model_for_uid(uid).objects.get(noce_ack=ack).is_sent

    assert await eventually(marked_sent), "the server marks what it wrote to a socket as sent"

    phone = await ws_connect(daphne)
    assert (await phone.request("login", {"token": f"key-{uid}"}))["body"]["unread"] == {"7": 1}

    live = await push(msg_type=MsgType.COMMENT, uids=[uid], body={"text": "评论 ✓"}, from_uid=176906)
    assert live.sent == 1
    for client in (tab, phone):
        frame = await client.recv()
        assert frame["msg_type"] == MsgType.COMMENT
        assert frame["uid"] == 176906
        assert frame["noce_ack"] == live.noce_acks[uid]
        assert frame["body"] == {"to_uid": uid, "text": "评论 ✓"}


@needs_real
@pytest.mark.parametrize("size", [10, 200, 15_000])
async def test_pushed_frames_of_each_length_class_arrive_whole(daphne, ws_connect, new_uid, settings, size):
    # Pushed frames bypass autobahn (pushsite/server.py); 7-bit and 16-bit lengths both occur.
    from notifications.services import notifications_push

    settings.PUSH_REDIS_PREFIX = daphne.prefix
    uid = new_uid()
    client = await ws_connect(daphne)
    await client.login(f"key-{uid}")
    text = ("推送✓" * size)[:size]
    pushed = await database_sync_to_async(notifications_push)(
        msg_type=MsgType.COMMENT, uids=[uid], body={"text": text}, from_uid=7
    )
    assert pushed.sent == 1
    frame = await client.recv()
    assert frame["noce_ack"] == pushed.noce_acks[uid]
    assert frame["body"] == {"to_uid": uid, "text": text}
    assert (await client.request("heartbeat"))["uid"] == uid, "the stream stays in step after the frame"


@needs_real
async def test_a_login_cancelled_after_its_socket_closed_leaves_no_row_and_no_socket(start_daphne, ws_connect, new_uid):
    # daphne cancels an application still running a second (here) after its socket
    # closed. A login stuck on the database then never reaches its disconnect
    # handler: the hub must forget the socket, and the node loop remove the row
    # the login wrote once the database let it through.
    import MySQLdb
    from django.db import connection

    # PUSH_LOGIN_MAX_WAIT: the stuck login's batch may still be finishing when the second socket
    # comes; admission control would then rightly send it away as busy, which is not what this tests.
    server = start_daphne(
        "--application-close-timeout",
        "1",
        PUSH_NODE_HEARTBEAT="1",
        PUSH_MAX_CONNECTIONS="1",
        PUSH_LOGIN_MAX_WAIT="60",
    )
    db = connection.settings_dict
    locker = MySQLdb.connect(
        host=db["HOST"], port=int(db["PORT"] or 3306), user=db["USER"], password=db["PASSWORD"], database=db["NAME"]
    )
    uid = new_uid()
    try:
        locker.cursor().execute("LOCK TABLES push_user_connection WRITE")
        stuck = await ws_connect(server)
        await stuck.send("login", {"ukey": f"key-{uid}"})
        await asyncio.sleep(1.0)  # the login is waiting on the lock
        await stuck.ws.close()
        await asyncio.sleep(3.0)  # past the close timeout: daphne has cancelled it
    finally:
        locker.cursor().execute("UNLOCK TABLES")
        locker.close()

    async def row_and_presence_gone() -> bool:
        return await server.relation_rows(uid) == [] and not server.presence(uid)

    assert await eventually(row_and_presence_gone, timeout=20), await server.relation_rows(uid)
    # PUSH_MAX_CONNECTIONS=1: had the hub kept the cancelled socket, this one would be refused as "server full".
    other = await ws_connect(server)
    assert (await other.login(f"key-{new_uid()}"))["code"] == 200


async def test_a_daphne_stopped_with_sigterm_removes_its_rows_and_presence_at_once(start_daphne, ws_connect, new_uid):
    # A dead-after of an hour: nothing but the stopping server itself can remove its rows within this test.
    server = start_daphne(PUSH_NODE_DEAD_AFTER="3600")
    uids = [new_uid() for _ in range(3)]
    for uid in uids:
        client = await ws_connect(server)
        assert (await client.login(f"key-{uid}"))["code"] == 200
    for uid in uids:
        assert len(await server.relation_rows(uid)) == 1
    assert await server.node_age() is not None

    await asyncio.to_thread(server.process.stop)  # SIGTERM, as systemctl stop sends
    assert server.process.proc is not None and server.process.proc.returncode is not None
    for uid in uids:
        assert await server.relation_rows(uid) == [], server.process.output()
        assert not server.presence(uid)
    assert await server.node_age() is None


def queued_connections(server: Daphne, attempts: int, *, within: float = 2.0) -> int:
    """Connections the kernel completes for a daphne that accepts none (stopped): what its listen backlog holds."""
    assert server.process.proc is not None
    pid = server.process.proc.pid
    sockets: list[socket.socket] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(attempts):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
            sockets.append(sock)
        pending, connected = set(sockets), 0
        deadline = time.monotonic() + within
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], max(0.0, deadline - time.monotonic()))
            for sock in writable:
                pending.discard(sock)
                connected += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        return connected
    finally:
        os.kill(pid, signal.SIGCONT)
        for sock in sockets:
            sock.close()


async def test_daphne_listens_with_the_configured_backlog(start_daphne, ws_connect):
    # A reconnect storm: hundreds of connections before the loop accepts any.
    # Twisted's own backlog (50) has the kernel drop the SYNs past it, and
    # those clients wait a second for their retransmit (pushsite/server.py, item 9).
    default = start_daphne()
    assert queued_connections(default, 300) == 300
    small = start_daphne(PUSH_LISTEN_BACKLOG="50")
    assert queued_connections(small, 300) <= 51
    for server in (default, small):  # both serve on afterwards
        assert (await (await ws_connect(server)).request("heartbeat"))["code"] == 200
