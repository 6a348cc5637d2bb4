"""Redis killed and restarted under load: the node lives on and nothing acknowledged is lost.

A redis-server of this test's own (its own port, no persistence, so a restart
comes back empty as after a crash) serves one daphne node. Clients are logged
in over real sockets and pushes flow through the signed API while the Redis
process is SIGKILLed and, a second later, started again on the same port.

Invariants guarded here:
* while Redis is down the push API answers 503 at once: never 500, never a hang;
* the daphne process survives and answers /healthz;
* a client whose socket closed reconnects and logs in again; one whose socket
  stayed open is served again: a push after the recovery reaches every client live;
* every push answered 2xx is stored exactly once and reaches its user, live
  or through ``unread``; a push answered 503 stored nothing;
* a push whose rows are stored when Redis dies is answered as stored (200,
  ``sent`` 0), not with the 503 that says nothing was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.db import connections

from connections.protocol import MsgType
from notifications.services import notifications_push
from notifications.sharding import model_for_uid, shard_alias, shard_of
from tests.faults.outage import (
    PUSHERS,
    Client,
    Pushes,
    came_through,
    delivered_once,
    presence_entries,
    redis_server,
    refused_at_once,
    relation,
    served_again,
    wait_for,
)
from tests.proxy import TcpProxy
from tests.servers import daphne, free_port

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not settings.REDIS_URL, reason="needs the real configuration (MariaDB and Redis)"),
]

USERS = 8
BEFORE_KILL = 1.5  # seconds of pushes before Redis dies
DOWN_FOR = 1.0
AFTER_RESTART = 3.0  # seconds of pushes after Redis is back


async def test_redis_killed_and_restarted_loses_nothing_acknowledged(verifier, new_uid):
    redis_port = free_port()
    server = redis_server(redis_port).start()
    node = daphne(
        "redis-restart-node",
        PUSH_JOBS="inline",
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        PUSH_NODE_HEARTBEAT=1,  # the node retries the closes Redis refused once a second
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        node.start()
        uids = [new_uid() for _ in range(USERS)]
        clients = [Client(f"ws://127.0.0.1:{node.port}/ws/push/", uid) for uid in uids]
        tasks += [asyncio.create_task(client.run()) for client in clients]
        await asyncio.wait_for(asyncio.gather(*(c.logged_in.wait() for c in clients)), 15)

        pushes = Pushes(node.port)
        pushers = [asyncio.create_task(pushes.loop(uids, offset)) for offset in range(PUSHERS)]
        tasks += pushers
        await asyncio.sleep(BEFORE_KILL)
        acked_before = pushes.acknowledged()
        server.kill()
        await asyncio.sleep(0.2)
        # Half the clients lose their socket during the outage and come back at once.
        dropped = clients[: USERS // 2]
        for client in dropped:
            await client.drop()
        await asyncio.sleep(DOWN_FOR - 0.2)
        server = redis_server(redis_port).start()
        acked_at_restart = pushes.acknowledged()
        await asyncio.sleep(AFTER_RESTART)

        # The node came through: alive, healthy, and every client is logged in again.
        await came_through(node, clients, pushers)
        assert all(c.connections == 2 and c.login_refusals > 0 for c in dropped)
        assert all(c.connections == 1 for c in clients if c not in dropped)

        # While Redis was down the API said so at once, and only that.
        refused_at_once(pushes, acked_before, acked_at_restart, "outage")

        # Served again: a push after the recovery reaches every client live.
        await served_again(pushes, clients, after="recovery")

        # Every acknowledged push: stored exactly once, and the user got it.
        delivered_live = await delivered_once(pushes, clients)
        acked_total = pushes.acknowledged()

        # The sockets closed during the outage left no relation row and no presence entry.
        await wait_for(lambda: relation(uids) == presence_entries(redis_port, uids) and len(relation(uids)) == USERS)
        print(
            f"pushes sent {pushes.sent}, acknowledged {acked_total} "
            f"(live {delivered_live}, through unread {acked_total - delivered_live}), "
            f"refused 503: {len(pushes.refused)}, "
            f"reconnects {sum(c.connections - 1 for c in clients)}, "
            f"logins refused 503: {sum(c.login_refusals for c in clients)}"
        )
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        node.stop()
        server.stop()


def test_a_push_stored_as_redis_dies_is_answered_as_stored(settings, new_uid):
    """The window between the rows' commit and the publish: Redis goes right after the INSERT."""
    target = urlsplit(settings.REDIS_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    settings.REDIS_URL = target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    uid = new_uid()

    def redis_dies_after_insert(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        result = execute(sql, *args)
        if sql.lstrip().upper().startswith("INSERT"):
            proxy.cut()
        return result

    try:
        with connections[shard_alias(shard_of(uid))].execute_wrapper(redis_dies_after_insert):
            result = notifications_push(msg_type=MsgType.USER_NOTICE, uids=[uid], body={"late": True}, from_uid=0)
    finally:
        proxy.close()
    assert (result.stored, result.sent) == (1, 0)
    (row,) = model_for_uid(uid).objects.filter(to_uid=uid)
    assert row.noce_ack == result.noce_acks[uid] and not row.is_sent  # the next login or periodic run sends it
