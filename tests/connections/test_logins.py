"""The login pipeline (connections/logins.py, connections/batching.py) and admission control.

Logins that wait together are verified, written and read as one batch; the
answers are the same as one login at a time would get, a refused login
writes nothing, and a node whose logins wait too long tells new sockets to
come back later (PROTOCOL.md section 8).
"""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connections as db_connections
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY

from connections import logins, services
from connections.batching import Batcher, loop_batchers
from connections.inbox import inbox
from connections.logins import CLOSES, SESSIONS
from connections.models import Connection
from connections.presence import presence
from connections.protocol import ClientType, CloseCode, Code, MsgType
from notifications.selectors import unread_counts, unsent_for_user
from notifications.store import NewMessage, messages_store

pytestmark = pytest.mark.django_db(transaction=True)


# --- Batcher -------------------------------------------------------------------


async def test_a_lone_item_is_processed_at_once_and_waiting_items_form_the_next_batch():
    seen: list[list[int]] = []
    release = asyncio.Event()

    async def process(items: list[int]) -> list[int]:
        seen.append(items)
        if len(seen) == 1:
            await release.wait()
        return [i * 10 for i in items]

    batcher = Batcher(process, max_batch=3, name="t")
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == [[1]]  # no timer: it went alone
    await asyncio.sleep(0.05)
    assert len(batcher) == 0 and batcher.oldest_wait() >= 0.05  # the running item is not answered yet
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 7)]
    await asyncio.sleep(0.01)
    assert len(batcher) == 5 and batcher.oldest_wait() >= 0.06  # counted from the oldest, the running one
    release.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40, 50, 60]
    assert seen == [[1], [2, 3, 4], [5, 6]]
    assert len(batcher) == 0 and batcher.oldest_wait() == 0


async def test_each_caller_gets_its_own_exception_and_a_failed_batch_fails_only_its_items():
    async def process(items: list[int]) -> list[int | BaseException]:
        if 99 in items:
            raise ConnectionError("down")
        return [ValueError(i) if i % 2 else i for i in items]

    batcher = Batcher(process, max_batch=10, name="t")
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, int, ValueError]
    with pytest.raises(ConnectionError):
        await batcher.submit(99)
    assert await batcher.submit(4) == 4  # a failed batch does not stop the batcher


async def test_a_caller_that_goes_away_does_not_stop_the_batch():
    gate = asyncio.Event()
    processed: list[int] = []

    async def process(items: list[int]) -> list[int]:
        await gate.wait()
        processed.extend(items)
        return items

    batcher = Batcher(process, max_batch=10, name="t")
    keep = asyncio.ensure_future(batcher.submit(1))
    leave = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    leave.cancel()
    gate.set()
    assert await keep == 1
    assert processed == [1, 2]


# --- one batch, real database and Redis -----------------------------------------


def _stored_for(uids: list[int]) -> None:
    messages = []
    for n, uid in enumerate(uids):
        messages += [NewMessage(to_uid=uid, msg_type=7, body={"n": i}) for i in range(n % 3)]
        messages += [NewMessage(to_uid=uid, msg_type=5, body={"c": 1}, from_uid=9)] * (n % 2)
    # Every message needs its own noce_ack: NewMessage makes one per instance.
    messages_store(messages=[NewMessage(to_uid=m.to_uid, msg_type=m.msg_type, body=m.body) for m in messages])


def _queries_by_alias(run):
    contexts = {alias: CaptureQueriesContext(db_connections[alias]) for alias in db_connections}
    for context in contexts.values():
        context.__enter__()
    try:
        result = run()
    finally:
        for context in contexts.values():
            context.__exit__(None, None, None)
    return result, {alias: len(c.captured_queries) for alias, c in contexts.items()}


def test_a_batch_of_logins_reads_what_one_at_a_time_would_with_a_bounded_number_of_statements(new_uid, settings):
    uids = [new_uid() for _ in range(60)]  # consecutive: 60 shards
    _stored_for(uids)
    logins = [
        services.LoginRequest(uid=u, conn_id=f"batch-node.{u}", node="batch-node", client_type=ClientType.WEB)
        for u in uids
    ]
    views, queries = _queries_by_alias(lambda: services.sessions_login(logins=logins))
    for uid, view in zip(uids, views, strict=True):
        assert view.unread_counts == unread_counts(uid=uid)
        assert view.unsent == unsent_for_user(uid=uid, limit=100)
    assert sum(bool(v.unsent) for v in views) > 30
    # One upsert for the rows, and two reads per shard database, however many logins.
    shard_aliases = set(settings.PUSH_SHARD_DATABASES)
    for alias, count in queries.items():
        expected = (1 if alias == "default" else 0) + (2 if alias in shard_aliases else 0)
        assert count <= expected + (2 if alias == "default" else 0), (alias, count)  # SQLite's savepoints
    rows = set(Connection.objects.filter(node="batch-node").values_list("uid", flat=True))
    assert rows == set(uids)
    assert presence().online(uids) == set(uids)


def test_the_replay_limit_holds_per_user_in_a_batch(new_uid):
    uids = [new_uid() for _ in range(24)]
    _stored_for(uids)  # 0 to 3 unsent each
    views = inbox().logins_read(uids=uids, replay_limit=2)
    for uid in uids:
        assert views[uid].unsent == unsent_for_user(uid=uid, limit=2)
        assert views[uid].unread_counts == unread_counts(uid=uid)
    assert {len(v.unsent) for v in views.values()} == {0, 1, 2}
    assert inbox().logins_read(uids=uids, replay_limit=0)[uids[5]].unsent == []


def test_a_login_past_the_socket_limit_is_taken_and_the_oldest_sockets_are_named(new_uid, settings):
    settings.PUSH_MAX_SOCKETS_PER_USER = 2
    uid, other = new_uid(), new_uid()
    logins = [
        services.LoginRequest(uid=uid, conn_id=f"lim.{n}", node="lim", client_type=ClientType.WEB) for n in range(3)
    ] + [services.LoginRequest(uid=other, conn_id="lim.other", node="lim", client_type=ClientType.APP)]
    results = services.sessions_login(logins=logins)
    assert [type(r).__name__ for r in results] == ["LoginView"] * 4
    assert set(presence().connections(uid)) == {"lim.0", "lim.1", "lim.2"}
    # The oldest goes: by login time, then by socket number (lim.10 is newer than lim.9).
    assert services.oldest_sockets(uid, 1) == ["lim.0"]
    assert services.oldest_sockets(other, 1) == ["lim.other"]


def test_logging_in_again_after_logout_updates_the_socket_row(new_uid):
    uid = new_uid()
    login = services.LoginRequest(uid=uid, conn_id="again.1", node="again", client_type=ClientType.WEB)
    services.sessions_login(logins=[login])
    services.connection_logout(uid=uid, conn_id="again.1")
    assert not presence().online([uid])
    services.sessions_login(logins=[login])
    assert list(Connection.objects.filter(conn_id="again.1").values_list("uid", "user_status")) == [(uid, 1)]
    assert presence().online([uid]) == {uid}


# --- through the socket ---------------------------------------------------------


async def test_concurrent_logins_share_batches_and_each_socket_gets_its_own_replay_once(connect, verifier, new_uid):
    uids = [new_uid() for _ in range(40)]
    await database_sync_to_async(_stored_for)(uids)
    socks = [await connect() for _ in uids]
    for sock, uid in zip(socks, uids, strict=True):
        await sock.send("login", {"ukey": f"key-{uid}"})
    for n, (sock, uid) in enumerate(zip(socks, uids, strict=True)):
        reply = await sock.recv()
        assert reply["msg_type"] == MsgType.LOGIN and reply["body"]["uid"] == uid, reply
        expected = await database_sync_to_async(unread_counts)(uid=uid)
        assert reply["body"]["unread"] == expected
        replayed = [await sock.recv() for _ in range(n % 3 + n % 2)]
        assert len({f["noce_ack"] for f in replayed}) == len(replayed)
        assert all(f["body"]["to_uid"] == uid for f in replayed)
        assert await sock.nothing(0.05)
    sessions = next(b for b in loop_batchers() if b.name == SESSIONS)
    assert sessions.items >= 40 and sessions.batches < sessions.items


@pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("mysql"), reason="holds a table lock of MariaDB's"
)
async def test_logins_stuck_past_the_bound_send_new_sockets_away_with_retry_after(connect, verifier, new_uid, settings):
    settings.PUSH_LOGIN_MAX_WAIT = 0.2
    settings.PUSH_LOGIN_RETRY_AFTER_MAX = 7
    locked, unlock = threading.Event(), threading.Event()

    def hold_the_relation_table() -> None:
        # Another client of MariaDB holds the table: logins wait for real.
        from django.db import connections as thread_connections

        with thread_connections["default"].cursor() as cursor:
            cursor.execute("LOCK TABLES push_user_connection WRITE")
            locked.set()
            unlock.wait(10)
            cursor.execute("UNLOCK TABLES")
        thread_connections["default"].close()

    holder = threading.Thread(target=hold_the_relation_table)
    holder.start()
    try:
        assert locked.wait(5)
        uids = [new_uid() for _ in range(3)]
        waiting = [await connect() for _ in uids]
        for sock, uid in zip(waiting, uids, strict=True):
            await sock.send("login", {"ukey": f"key-{uid}"})
        await asyncio.sleep(0.6)
        overloaded = REGISTRY.get_sample_value("pushsite_logins_total", {"result": "overloaded"})
        late = await connect()
        kick = await late.recv()
        assert kick["msg_type"] == MsgType.KICK and kick["code"] == Code.UNAVAILABLE
        assert REGISTRY.get_sample_value("pushsite_logins_total", {"result": "overloaded"}) == overloaded + 1
        assert 1 <= kick["body"]["retry_after"] <= 7
        assert (await late.close_frame())["code"] == CloseCode.TRY_AGAIN_LATER
    finally:
        unlock.set()
        await asyncio.get_running_loop().run_in_executor(None, holder.join)
    for sock, uid in zip(waiting, uids, strict=True):
        assert (await sock.recv(timeout=10))["body"]["uid"] == uid  # the queued logins still go through
    fresh = await connect()
    assert (await fresh.login(f"key-{new_uid()}"))["code"] == 200  # and the node takes sockets again


async def test_sockets_closing_together_are_cleaned_up_in_shared_batches(connect, verifier, new_uid):
    uids = [new_uid() for _ in range(30)]
    socks = [await connect() for _ in uids]
    for sock, uid in zip(socks, uids, strict=True):
        assert (await sock.login(f"key-{uid}"))["code"] == 200
    await asyncio.gather(*(sock.communicator.disconnect(timeout=5) for sock in socks))

    @database_sync_to_async
    def left() -> tuple[int, set[int]]:
        return Connection.objects.filter(uid__in=uids).count(), presence().online(uids)

    assert await left() == (0, set())
    closes = next(b for b in loop_batchers() if b.name == CLOSES)
    assert closes.items >= 30 and closes.batches < closes.items


async def test_a_storm_relaxes_the_garbage_collector_until_it_is_over(
    connect, verifier, new_uid, monkeypatch, settings
):
    settings.PUSH_GC_THRESHOLD = ()
    # How large the batches of 24 logins come out depends on how fast the
    # verifier answers; any batch of two is a storm here, and fewer batches
    # than logins (asserted below) means there was one.
    monkeypatch.setattr(logins, "STORM_BATCH", 2)
    monkeypatch.setattr(logins, "STORM_CALM_AFTER", 1.0)
    logins._storm_over()  # an earlier test's storm ended with its event loop
    normal = gc.get_threshold()
    uids = [new_uid() for _ in range(24)]
    socks = [await connect() for _ in uids]
    for sock, uid in zip(socks, uids, strict=True):
        await sock.send("login", {"ukey": f"key-{uid}"})
    for sock in socks:
        assert (await sock.recv())["code"] == 200
    sessions = next(b for b in loop_batchers() if b.name == SESSIONS)
    assert sessions.batches < len(uids)
    assert gc.get_threshold() == logins.STORM_GC_THRESHOLD
    await asyncio.sleep(1.5)
    assert gc.get_threshold() == normal
