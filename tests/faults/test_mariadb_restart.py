"""MariaDB stopped and started again for real: 503 while down, nothing half-stored, no pushsite restart.

A mariadbd of this test's own (a fresh datadir, a free port; the shared server
on 3306 is never touched) holds the main database and, as in the real suite
configuration, the shard databases of one daphne node; Redis is the shared
one under the test's key prefix. Clients are logged in over real sockets and
pushes flow through the signed API, to one uid and to uids on every shard
database at once, while mariadbd is stopped with SIGTERM (as ``systemctl stop``
does) and, once it has exited, started again on the same datadir and port.

Invariants guarded here:
* while MariaDB is down the push API answers the contract's 503 at once, never
  500 and never a hang; a login, or any request that needs the database, gets
  an ERROR frame with code 503, and the socket stays open;
* the daphne process survives; ``/healthz`` is liveness only and stays 200;
* after the restart, with the same daphne: pushes are accepted and delivered
  live, a refused login succeeds, and a socket closed during the outage leaves
  no relation row or presence entry behind;
* every push answered 2xx is stored exactly once and reaches its user, live or
  through ``unread``; a push answered 503, multi-uid ones included, stored
  none of its rows.

tests/notifications/test_outages.py proves the same claims through TCP proxies
cut in front of the shared server; this test stops a real server process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import MySQLdb
import pytest
import redis
import websockets
from django.conf import settings

from connections.models import Connection, UserStatus
from connections.presence import online_key
from connections.protocol import Code, MsgType
from notifications.sharding import shard_alias, shard_of, shard_table
from notifications.signing import signed_headers
from tests.servers import BIN, ROOT, ServerProcess, daphne_with, free_port, server_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        settings.DATABASES["default"]["ENGINE"] != "django.db.backends.mysql" or not settings.REDIS_URL,
        reason="needs the real configuration (MariaDB and Redis)",
    ),
]

USERS = 6  # half of them on each shard database
PUSHERS = 2
BEFORE_STOP = 1.5  # seconds of pushes before mariadbd is stopped
DOWN_FOR = 1.5  # seconds of pushes against the stopped server
AFTER_RESTART = 2.0  # seconds of pushes after it is back
CLIENT_TIMEOUT = 10  # the push client's timeout; a 503 must come well inside it
QUICK = 3  # seconds: "at once" for a refusal


def mariadb_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} not found: install mariadb-server (scripts/setup.sh does) to run this test")
    return path


class MariadbdProcess(ServerProcess):
    """mariadbd is ready once it says so, not as soon as its port is open."""

    def ready(self) -> bool:
        return super().ready() and "ready for connections" in self.log.read_text(errors="replace")


class MariaDB:
    """A mariadbd of the test's own, on a datadir that outlives its stops."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pushsite-mariadb-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.process: MariadbdProcess | None = None

    def install(self) -> None:
        done = subprocess.run(
            [
                mariadb_binary("mariadb-install-db"),
                "--no-defaults",  # must come first
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",  # root@127.0.0.1 without a password
                "--skip-test-db",
                "--skip-name-resolve",
                "--user=root",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"mariadb-install-db failed:\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        args = [
            mariadb_binary("mariadbd"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.root / 'sock'}",
            f"--pid-file={self.root / 'mariadbd.pid'}",
            "--skip-log-bin",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            "--user=root",
        ]
        self.process = MariadbdProcess("mariadbd", args, {}, port=self.port).start(ready_timeout=30)

    def stop(self) -> None:
        """SIGTERM, as ``systemctl stop`` sends; returns once mariadbd has exited."""
        assert self.process is not None and self.process.proc is not None
        os.killpg(self.process.proc.pid, signal.SIGTERM)
        self.process.proc.wait(30)
        assert self.process.proc.returncode == 0, self.process.output()
        assert "Shutdown complete" in self.process.output()

    def destroy(self) -> None:
        if self.process is not None:
            self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        connection = MySQLdb.connect(
            host="127.0.0.1", port=self.port, user="root", database=database, connect_timeout=5
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return list(cursor.fetchall())
        finally:
            connection.close()


@pytest.fixture
def mariadb():
    server = MariaDB()
    try:
        server.install()
        server.start()
        yield server
    finally:
        server.destroy()


def databases() -> dict[str, str]:
    """Database alias -> database name on the test's server, shaped as the suite's configuration."""
    names = {"default": "pushsite"}
    names.update({alias: f"pushsite_{alias}" for alias in settings.PUSH_SHARD_DATABASES if alias != "default"})
    return names


def node_environment(server: MariaDB) -> dict[str, str]:
    """A node on the test's server, migrated, with its shard tables."""
    names = databases()
    for name in names.values():
        server.query("mysql", f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    env = server_env(
        PUSH_JOBS="inline",
        PUSH_NODE_HEARTBEAT=1,  # the node retries the relation closes the database refused once a second
        DATABASE_URL=server.url(names["default"]),
    )
    env.pop("PUSH_SHARD_DATABASE_URLS", None)
    shard_urls = [server.url(name) for alias, name in names.items() if alias != "default"]
    if shard_urls:
        env["PUSH_SHARD_DATABASE_URLS"] = ",".join(shard_urls)
    for command in (["migrate", "--noinput"], ["init_push_tables"]):
        done = subprocess.run(
            [str(BIN / "python"), "manage.py", *command, "-v", "0"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"manage.py {command[0]} failed:\n{done.stdout}\n{done.stderr}"
    return env


def uids_on_every_database(new_uid: Callable[[], int], per_database: int) -> list[int]:
    """Fresh uids, ``per_database`` of them on each shard database, interleaved."""
    wanted = list(dict.fromkeys(settings.PUSH_SHARD_DATABASES))
    found: dict[str, list[int]] = {alias: [] for alias in wanted}
    while any(len(uids) < per_database for uids in found.values()):
        uid = new_uid()
        alias = shard_alias(shard_of(uid))
        if len(found[alias]) < per_database:
            found[alias].append(uid)
    return [uid for group in zip(*found.values(), strict=True) for uid in group]


class Client:
    """One user's socket: replies matched by seq, pushed notices collected."""

    def __init__(self, url: str, uid: int) -> None:
        self.url = url
        self.uid = uid
        self.live: set[str] = set()
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._seq = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def open(self) -> None:
        self._ws = await websockets.connect(self.url, open_timeout=5, max_queue=None)
        self._reader = asyncio.create_task(self._read(self._ws))

    async def _read(self, ws: Any) -> None:
        async for text in ws:
            assert "Traceback" not in text
            frame = json.loads(text)
            waiter = self._pending.pop(frame["seq"], None) if frame["seq"] is not None else None
            if waiter is not None:
                waiter.set_result(frame)
            elif frame["msg_type"] == MsgType.USER_NOTICE:
                assert frame["body"]["to_uid"] == self.uid
                self.live.add(frame["noce_ack"])
            else:
                raise AssertionError(f"unexpected frame {frame}")

    async def request(self, action: str, body: dict[str, Any] | None = None, timeout: float = 10) -> dict[str, Any]:
        assert self._reader is not None and not self._reader.done(), f"socket of uid {self.uid} closed"
        self._seq += 1
        future = self._pending[self._seq] = asyncio.get_running_loop().create_future()
        await self._ws.send(json.dumps({"action": action, "body": body or {}, "seq": self._seq}))
        return await asyncio.wait_for(future, timeout)

    async def login(self) -> dict[str, Any]:
        return await self.request("login", {"ukey": f"key-{self.uid}"})

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    def still_open(self) -> bool:
        if self._reader is not None and self._reader.done() and not self._reader.cancelled():
            self._reader.result()  # a failed assertion in the reader surfaces here
        return self._reader is not None and not self._reader.done()


@dataclass
class Push:
    n: int
    uids: list[int]
    status: int
    seconds: float
    answer: dict[str, Any]


class Pushes:
    """Every push sent through the signed API, and what it answered."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/api/notice/userMessage"
        self.sent: list[Push] = []
        self._numbers = itertools.count()

    def push(self, uids: list[int]) -> Push:
        n = next(self._numbers)
        data = json.dumps({"uids": uids, "body": {"n": n}}).encode()
        headers = {"Content-Type": "application/json", **signed_headers(settings.PUSH_API_SECRET, data)}
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        except OSError as error:  # a hang (timeout) or a dead server
            status, raw = 0, json.dumps({"error": repr(error)}).encode()
        seconds = time.monotonic() - started
        try:
            answer = json.loads(raw)
        except ValueError:  # not the contract's JSON: kept for the assertion message
            answer = {"not_json": raw[:300].decode(errors="replace")}
        push = Push(n, uids, status, seconds, answer)
        self.sent.append(push)
        return push

    async def loop(self, targets: list[list[int]], offset: int) -> None:
        for turn in itertools.count(offset, PUSHERS):
            await asyncio.to_thread(self.push, targets[turn % len(targets)])
            await asyncio.sleep(0.01)

    def acked(self) -> list[Push]:
        return [p for p in self.sent if 200 <= p.status < 300]

    def refused(self) -> list[Push]:
        return [p for p in self.sent if not 200 <= p.status < 300]


def stored(server: MariaDB, uids: list[int]) -> dict[int, list[tuple[str, int]]]:
    """(noce_ack, body n) of every row of these users, read where the node's router put them."""
    names = databases()
    rows: dict[int, list[tuple[str, int]]] = {}
    for uid in uids:
        shard = shard_of(uid)
        found = server.query(
            names[shard_alias(shard)], f"SELECT noce_ack, body FROM {shard_table(shard)} WHERE to_uid = %s", (uid,)
        )
        rows[uid] = [(ack, json.loads(body)["n"]) for ack, body in found]
    return rows


def relation(server: MariaDB, uids: list[int]) -> set[tuple[int, str]]:
    marks = ",".join(["%s"] * len(uids))
    return set(
        server.query(
            databases()["default"],
            f"SELECT uid, conn_id FROM {Connection._meta.db_table} WHERE user_status = %s AND uid IN ({marks})",
            (int(UserStatus.ONLINE), *uids),
        )
    )


def presence_entries(uids: list[int]) -> set[tuple[int, str]]:
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        return {(uid, conn_id) for uid in uids for conn_id in client.hkeys(online_key(uid))}
    finally:
        client.close()


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return response.status


async def test_mariadb_stopped_and_restarted_loses_nothing_acknowledged(verifier, new_uid, mariadb):
    node = daphne_with("mariadb-restart-node", node_environment(mariadb))
    clients: list[Client] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        node.start()
        url = f"ws://127.0.0.1:{node.port}/ws/push/"
        per_database = USERS // len(set(settings.PUSH_SHARD_DATABASES))
        uids = uids_on_every_database(new_uid, per_database)
        clients += [Client(url, uid) for uid in uids]
        for client in clients:
            await client.open()
            assert (await client.login())["code"] == Code.OK
        late = Client(url, new_uid())  # logs in first while the database is down
        clients.append(late)

        # One push in three goes to a uid on every shard database at once.
        spread = len(uids) // per_database
        targets = [[uid] for uid in uids] + [uids[i : i + spread] for i in range(0, len(uids), spread)]
        pushes = Pushes(node.port)
        pushers = [asyncio.create_task(pushes.loop(targets, offset)) for offset in range(PUSHERS)]
        tasks += pushers
        await asyncio.sleep(BEFORE_STOP)
        acked_before = len(pushes.acked())

        await asyncio.to_thread(mariadb.stop)
        down_since = time.monotonic()

        # A push to every shard database: the contract's 503 at once, and none of its rows (checked below).
        refused = await asyncio.to_thread(pushes.push, targets[-1])
        assert refused.status == 503, refused
        assert refused.answer["code"] == 503 and "nothing was stored" in refused.answer["msg"], refused
        assert "data" not in refused.answer
        assert refused.seconds < QUICK, refused

        # A login needs the database: an ERROR frame with 503 at once, and the socket lives on.
        await late.open()
        started = time.monotonic()
        reply = await late.login()
        assert (reply["msg_type"], reply["code"]) == (MsgType.ERROR, Code.UNAVAILABLE), reply
        assert time.monotonic() - started < QUICK
        assert (await late.request("heartbeat"))["code"] == Code.OK

        # So does unread on a logged-in socket, which stays logged in.
        reply = await clients[1].request("unread", {"limit": 10})
        assert (reply["msg_type"], reply["code"]) == (MsgType.ERROR, Code.UNAVAILABLE), reply
        assert (await clients[1].request("heartbeat"))["code"] == Code.OK

        # A socket closed while its relation row cannot be deleted; it comes back after the restart.
        dropped = clients[0]
        await dropped.close()

        assert node.proc is not None and node.proc.poll() is None, node.output()
        assert await asyncio.to_thread(healthz, node.port) == 200
        await asyncio.sleep(max(0.0, DOWN_FOR - (time.monotonic() - down_since)))

        await asyncio.to_thread(mariadb.start)
        acked_at_restart = len(pushes.acked())
        reply = await late.login()
        assert reply["code"] == Code.OK, reply
        await dropped.open()
        reply = await dropped.login()
        assert reply["code"] == Code.OK, reply
        await asyncio.sleep(AFTER_RESTART)
        for task in pushers:
            task.cancel()
        ended = await asyncio.gather(*pushers, return_exceptions=True)
        assert all(isinstance(end, asyncio.CancelledError) for end in ended), ended

        # The node came through without a restart.
        assert node.proc.poll() is None, node.output()
        assert await asyncio.to_thread(healthz, node.port) == 200
        assert all(client.still_open() for client in clients)

        # While the database was down the API said so at once, and only that.
        down = pushes.refused()
        assert down, "no push met the outage"
        assert {p.status for p in down} == {503}, [(p.status, p.answer) for p in down if p.status != 503]
        assert all(p.answer.get("code") == 503 and "data" not in p.answer for p in down), down
        assert max(p.seconds for p in down) < QUICK, max(p.seconds for p in down)
        acked_after = len(pushes.acked())
        assert 0 < acked_before <= acked_at_restart < acked_after, "no push acknowledged before or after the outage"

        # Served again: a push after the recovery reaches every logged-in client live.
        after = {}
        for client in clients:
            push = await asyncio.to_thread(pushes.push, [client.uid])
            assert push.status == 200, push
            after[client.uid] = push.answer["data"]["noce_acks"][str(client.uid)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(after[c.uid] not in c.live for c in clients):
            await asyncio.sleep(0.05)
        assert not [c.uid for c in clients if after[c.uid] not in c.live], "clients not served live after the restart"

        # Every acknowledged push: stored exactly once, and its user got it.
        everyone = [client.uid for client in clients]
        rows = await asyncio.to_thread(stored, mariadb, everyone)
        acked_pairs = {(uid, p.answer["data"]["noce_acks"][str(uid)], p.n) for p in pushes.acked() for uid in p.uids}
        delivered_live = 0
        for client in clients:
            mine = {(ack, n) for uid, ack, n in acked_pairs if uid == client.uid}
            assert len(mine) < 200  # one unread page holds them all
            reply = await client.request("unread", {"limit": 200, "msg_type": int(MsgType.USER_NOTICE)})
            assert reply["code"] == Code.OK, reply
            unread = {item["noce_ack"] for item in reply["body"]["items"]}
            acks_stored = [ack for ack, _ in rows[client.uid]]
            for ack, _ in mine:
                assert acks_stored.count(ack) == 1, (client.uid, ack)
                assert ack in client.live or ack in unread, (client.uid, ack)
            delivered_live += len({ack for ack, _ in mine} & client.live)
            # A push answered 503 stored none of its rows: every stored row was acknowledged.
            unexpected = {n for _, n in rows[client.uid]} - {n for _, n in mine}
            assert sorted(rows[client.uid]) == sorted(mine), [p for p in pushes.sent if p.n in unexpected]

        # The socket closed during the outage left no relation row and no presence entry.
        deadline = time.monotonic() + 10
        while True:
            rows_now = await asyncio.to_thread(relation, mariadb, everyone)
            if rows_now == await asyncio.to_thread(presence_entries, everyone) and len(rows_now) == len(clients):
                break
            assert time.monotonic() < deadline, f"relation {rows_now} and presence never agreed"
            await asyncio.sleep(0.1)

        print(
            f"pushes sent {len(pushes.sent)}, acknowledged {len(pushes.acked())} "
            f"({len(acked_pairs)} rows, {delivered_live} live), refused 503: {len(down)}, "
            f"slowest refusal {max(p.seconds for p in down):.3f} s"
        )
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        node.stop()
