"""Redis Sentinel: the master SIGKILLed under load fails over, and nothing acknowledged is lost.

The test starts its own Sentinel group from Debian's redis-server and
redis-sentinel, on ports of its own: a master, one replica and three
sentinels (quorum 2). One daphne node runs with
``REDIS_URL=redis+sentinel://...``; clients are logged in over real sockets
and pushes flow through the signed API while the master is SIGKILLed. It is
never started again: pushsite must follow the sentinels to the promoted
replica without a restart.

Invariants guarded here:
* while the group fails over the push API answers 503 at once: never 500,
  never a hang; afterwards pushes succeed again, on the same node process;
* every push answered 2xx is stored exactly once and reaches its user, live
  or through ``unread``; a push answered 503 stored nothing;
* sockets that stayed open are served live again (the bus subscription moved
  to the new master), and sockets that dropped log in again;
* the new master holds exactly the presence entries of the open sockets;
* a Celery worker on the same group follows it: a job queued after the
  failover is run and its push reaches every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from pushsite.redis_url import channel_layer_host
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
    stored,
    wait_for,
)
from tests.servers import ServerProcess, celery_worker, daphne, free_port

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not settings.REDIS_URL, reason="needs the real configuration (MariaDB and Redis)"),
    pytest.mark.skipif(not shutil.which("redis-sentinel"), reason="needs Debian's redis-sentinel (scripts/setup.sh)"),
]

MASTER = "pushtest"
USERS = 8
BEFORE_KILL = 1.5  # seconds of pushes before the master dies
AFTER_FAILOVER = 3.0  # seconds of pushes once a replica is promoted


def sentinel(
    port: int, master_port: int, directory: Path, quorum: int = 2, password: str = "", master_password: str = ""
) -> ServerProcess:
    """A redis-sentinel watching the master; its config file is its own (a sentinel rewrites it)."""
    conf = directory / f"sentinel-{port}.conf"
    conf.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {directory}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} {quorum}\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
        f"sentinel parallel-syncs {MASTER} 1\n"
        + (f"requirepass {password}\n" if password else "")
        + (f"sentinel auth-pass {MASTER} {master_password}\n" if master_password else "")
    )
    return ServerProcess(f"sentinel-{port}", [shutil.which("redis-sentinel") or "redis-sentinel", str(conf)], {}, port)


def master_port(sentinel_ports: list[int]) -> int | None:
    """The master's port as the first sentinel that answers sees it."""
    for port in sentinel_ports:
        client = redis.Redis(port=port, decode_responses=True, socket_timeout=1)
        try:
            address = client.sentinel_get_master_addr_by_name(MASTER)
        except redis.RedisError:
            continue
        finally:
            client.close()
        if address:
            return int(address[1])
    return None


def group_ready(sentinel_ports: list[int], replica_port: int) -> bool:
    """Every sentinel knows the other two and sees the replica in sync."""
    for port in sentinel_ports:
        client = redis.Redis(port=port, decode_responses=True, socket_timeout=1)
        try:
            state = client.sentinel_master(MASTER)
            replicas = client.sentinel_slaves(MASTER)
        except redis.RedisError:
            return False
        finally:
            client.close()
        if int(state.get("num-other-sentinels", 0)) != 2:
            return False
        if not any(int(r["port"]) == replica_port and r.get("master-link-status") == "ok" for r in replicas):
            return False
    return True


async def layer_round_trip(layer: RedisChannelLayer, group: str, timeout: float = 15) -> None:
    """A group message through the stock channel layer reaches its member; Redis errors are retried for ``timeout``."""
    deadline = time.monotonic() + timeout
    failure: Exception | None = None
    while time.monotonic() < deadline:
        try:
            channel = await asyncio.wait_for(layer.new_channel(), 5)
            await asyncio.wait_for(layer.group_add(group, channel), 5)
            await asyncio.wait_for(layer.group_send(group, {"type": "probe", "group": group}), 5)
            message = await asyncio.wait_for(layer.receive(channel), 5)
        except (redis.RedisError, OSError) as error:
            failure = error
            await asyncio.sleep(0.2)
            continue
        assert message == {"type": "probe", "group": group}
        return
    raise AssertionError(f"the channel layer did not come back within {timeout}s: {failure!r}")


def layer_for(redis_url: str) -> RedisChannelLayer:
    """The channel layer settings would build for this URL (PUSH_FANOUT=layer's transport)."""
    return RedisChannelLayer(hosts=[channel_layer_host(redis_url, dict(settings.REDIS_CONNECTION_OPTIONS))])


async def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        await asyncio.sleep(0.2)


async def test_master_killed_fails_over_and_loses_nothing_acknowledged(verifier, new_uid, tmp_path):
    old_port, new_port = free_port(), free_port()
    sentinel_ports = [free_port() for _ in range(3)]
    servers = [
        redis_server(old_port, name="redis-master"),
        redis_server(new_port, "--replicaof", "127.0.0.1", str(old_port), name="redis-replica"),
        *(sentinel(port, old_port, tmp_path) for port in sentinel_ports),
    ]
    node = worker = None
    tasks: list[asyncio.Task[None]] = []
    try:
        for server in servers:
            server.start()
        await wait_until(lambda: group_ready(sentinel_ports, new_port), 30, "the sentinel group")
        sentinels = ",".join(f"127.0.0.1:{port}" for port in sentinel_ports)
        redis_url = f"redis+sentinel://{sentinels}/{MASTER}/0"
        node = daphne(
            "sentinel-node",
            PUSH_JOBS="celery",  # Celery's broker is the same Sentinel group
            PUSH_API_INLINE_MAX_UIDS=USERS // 2,  # a push to every client is a job
            REDIS_URL=redis_url,
            PUSH_NODE_HEARTBEAT=1,  # the node retries the closes Redis refused once a second
        )
        node.start()
        worker = celery_worker("sentinel-worker", PUSH_JOBS="celery", REDIS_URL=redis_url)
        worker.start()
        uids = [new_uid() for _ in range(USERS)]
        clients = [Client(f"ws://127.0.0.1:{node.port}/ws/push/", uid) for uid in uids]
        tasks += [asyncio.create_task(client.run()) for client in clients]
        await asyncio.wait_for(asyncio.gather(*(c.logged_in.wait() for c in clients)), 15)

        layer = layer_for(redis_url)
        await layer_round_trip(layer, "before-failover", timeout=5)

        pushes = Pushes(node.port)
        pushers = [asyncio.create_task(pushes.loop(uids, offset)) for offset in range(PUSHERS)]
        tasks += pushers
        await asyncio.sleep(BEFORE_KILL)
        acked_before = pushes.acknowledged()
        servers[0].kill()
        killed_at = time.monotonic()
        await asyncio.sleep(0.2)
        # Half the clients lose their socket during the failover and come back at once.
        dropped = clients[: USERS // 2]
        for client in dropped:
            await client.drop()
        await wait_until(lambda: master_port(sentinel_ports) == new_port, 30, "the failover")
        failover_seconds = time.monotonic() - killed_at
        acked_at_failover = pushes.acknowledged()
        await asyncio.sleep(AFTER_FAILOVER)

        # The node came through without a restart, and every client is logged in again.
        await came_through(node, clients, pushers)
        assert all(c.connections == 2 for c in dropped)
        assert all(c.connections == 1 for c in clients if c not in dropped)

        # While the group failed over the API said so at once, and only that.
        refused_at_once(pushes, acked_before, acked_at_failover, "failover")

        # Served again: a push after the failover reaches every client live.
        await served_again(pushes, clients, after="failover")

        # Every acknowledged push: stored exactly once, and the user got it.
        delivered_live = await delivered_once(pushes, clients)

        # The new master holds the presence of exactly the open sockets.
        await wait_for(lambda: relation(uids) == presence_entries(new_port, uids) and len(relation(uids)) == USERS)

        # The channel layer (channels-redis, its own Sentinel client) follows the failover too.
        await layer_round_trip(layer, "after-failover")
        await layer.close_pools()

        # Celery followed too: a push to every client, queued on the new master, is run by the worker.
        live_before = {client.uid: set(client.live) for client in clients}
        answer = await asyncio.to_thread(pushes.api.user_message, uids, {"n": -2})
        assert answer["code"] == 202, answer
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(c.live == live_before[c.uid] for c in clients):
            await asyncio.sleep(0.1)
        assert all(len(c.live - live_before[c.uid]) == 1 for c in clients), worker.output()
        rows = await stored(uids)
        assert all([n for _, n in rows[uid]].count(-2) == 1 for uid in uids)
        acked_total = pushes.acknowledged()
        print(
            f"failover took {failover_seconds:.1f}s; pushes sent {pushes.sent}, acknowledged {acked_total} "
            f"(live {delivered_live}, through unread {acked_total - delivered_live}), "
            f"refused 503: {len(pushes.refused)}, reconnects {sum(c.connections - 1 for c in clients)}, "
            f"logins refused 503: {sum(c.login_refusals for c in clients)}"
        )
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        if node is not None:
            node.stop()
        if worker is not None:
            worker.stop()
        for server in servers:
            server.stop()


async def test_sentinels_that_require_a_password_are_asked_with_sentinel_password(verifier, new_uid, tmp_path):
    """A sentinel with ``requirepass`` answers only a client that authenticates (``?sentinel_password=``).

    The master has a password of its own (the URL's ``:password@``). A node and a
    worker given both serve logins, an inline push and a job; a node whose URL
    lacks the sentinel password answers the push API 503, nothing stored.
    """
    master_pw, sentinel_pw = "m4ster:pw", "s3ntinel&pw"
    redis_port, sentinel_port = free_port(), free_port()
    servers = [
        redis_server(redis_port, "--requirepass", master_pw, name="redis-master"),
        sentinel(sentinel_port, redis_port, tmp_path, quorum=1, password=sentinel_pw, master_password=master_pw),
    ]
    nodes: list[ServerProcess] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for server in servers:
            server.start()
        asked = redis.Redis(port=sentinel_port, password=sentinel_pw, decode_responses=True, socket_timeout=1)
        await wait_until(lambda: asked.sentinel_get_master_addr_by_name(MASTER) is not None, 15, "the sentinel")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=sentinel_port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
        asked.close()

        base = f"redis+sentinel://:{quote(master_pw, safe='')}@127.0.0.1:{sentinel_port}/{MASTER}/0"
        redis_url = f"{base}?sentinel_password={quote(sentinel_pw, safe='')}"
        common = {"PUSH_JOBS": "celery", "PUSH_API_INLINE_MAX_UIDS": 1, "REDIS_URL": redis_url}
        node = daphne("sentinel-auth-node", **common)
        worker = celery_worker("sentinel-auth-worker", **common)
        nodes += [node, worker]
        node.start()
        worker.start()
        uids = [new_uid() for _ in range(2)]
        clients = [Client(f"ws://127.0.0.1:{node.port}/ws/push/", uid) for uid in uids]
        tasks += [asyncio.create_task(client.run()) for client in clients]
        await asyncio.wait_for(asyncio.gather(*(c.logged_in.wait() for c in clients)), 15)
        assert all(c.login_refusals == 0 for c in clients)

        pushes = Pushes(node.port)
        assert await asyncio.to_thread(pushes.push, uids[0]) == 200
        job = await asyncio.to_thread(pushes.api.user_message, uids, {"n": -2})
        assert job["code"] == 202, job
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(clients[0].live) < 2 or len(clients[1].live) < 1):
            await asyncio.sleep(0.1)
        assert [len(c.live) for c in clients] == [2, 1], worker.output()
        rows = await stored(uids)
        assert sorted(n for _, n in rows[uids[0]]) == [-2, 0] and [n for _, n in rows[uids[1]]] == [-2]
        layer = layer_for(redis_url)
        await layer_round_trip(layer, "with-passwords", timeout=5)
        await layer.close_pools()
        # Presence lives on the master the sentinel named.
        assert {uid for uid, _ in presence_entries(redis_port, uids, password=master_pw)} == set(uids)

        # Without the sentinel password the sentinel refuses the look-up: the API says 503, nothing is stored.
        locked_out = daphne("sentinel-noauth-node", REDIS_URL=base)
        nodes.append(locked_out)
        locked_out.start()
        refused = Pushes(locked_out.port)
        assert await asyncio.to_thread(refused.push, uids[1]) == 503, (refused.refused, locked_out.output())
        # At once: redis-py's default would ask the sentinel three more times, with up to 14 s of backoff.
        assert refused.refused[0][1] < 3, refused.refused
        assert [n for _, n in (await stored([uids[1]]))[uids[1]]] == [-2]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for process in reversed(nodes):
            process.stop()
        for server in reversed(servers):
            server.stop()
