"""A client that closes while its replies are still being written: nothing is left behind.

Real daphne, real sockets. Between a client's close frame and daphne noticing
the disconnect, a write to the socket used to raise inside the consumer; the
exception ended the application before its disconnect handler ran, so the
socket's relation row, presence entry and hub entry stayed for good
(pushsite/server.py drops those writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import tempfile
from pathlib import Path

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings

from connections.models import Connection
from tests.conftest import VERIFY_TOKEN
from tests.servers import BIN, ServerProcess, configuration_environment, free_port, prepare_server_database

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SOCKETS = 30
FRAMES = 30  # under the burst allowance: every one is answered


@pytest.fixture
def server(verify_server):
    env = configuration_environment(
        Path(tempfile.mkdtemp(prefix="pushsite-closing-")), verify_url=verify_server.url, verify_token=VERIFY_TOKEN
    )
    env["PUSH_REDIS_PREFIX"] = settings.PUSH_REDIS_PREFIX
    sqlite_path = prepare_server_database(env)
    port = free_port()
    node = ServerProcess(
        "daphne-closing",
        [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "pushsite.asgi:application"],
        env,
        port,
    )
    node.start()
    yield node, sqlite_path
    node.stop()


def relation_rows(sqlite_path: Path | None, uids: list[int]) -> int:
    if sqlite_path is None:
        return Connection.objects.filter(uid__in=uids).count()
    with contextlib.closing(sqlite3.connect(sqlite_path, timeout=10)) as db:
        marks = ",".join("?" * len(uids))
        return db.execute(f"SELECT COUNT(*) FROM push_user_connection WHERE uid IN ({marks})", uids).fetchone()[0]


async def leave_mid_reply(port: int, uid: int) -> None:
    # max_queue=None: the client reads on while it reads no frames itself, or
    # its flow control stops reading at 16 queued frames and the close reply
    # waits behind them until its own close timeout (10 s).
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/push/", max_queue=None) as ws:
        await ws.send(json.dumps({"action": "login", "body": {"ukey": f"key-{uid}"}, "seq": 0}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["code"] == 200
        for seq in range(1, FRAMES + 1):
            await ws.send(json.dumps({"action": "heartbeat", "seq": seq}))
        # Closing now: the close frame arrives while the replies are written.


async def test_a_client_closing_mid_reply_leaves_no_row_and_no_error(server, new_uid):
    node, sqlite_path = server
    uids = [new_uid() for _ in range(SOCKETS)]
    await asyncio.gather(*(leave_mid_reply(node.port, uid) for uid in uids))

    for _ in range(100):
        if await database_sync_to_async(relation_rows)(sqlite_path, uids) == 0:
            break
        await asyncio.sleep(0.1)
    assert await database_sync_to_async(relation_rows)(sqlite_path, uids) == 0
    log = node.output()
    assert "Exception inside application" not in log and "Traceback" not in log, log
