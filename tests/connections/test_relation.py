"""The uid<->connection relation and node liveness marks (connections/services.py).

Guards the module's invariants: a relation row and its presence entry are
written and removed together; a node's rows are reaped only when its liveness
mark is stale, and only rows not touched since the cutoff.
"""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from connections import services
from connections.hub import get_hub
from connections.models import Connection, Node, UserStatus
from connections.presence import presence
from connections.protocol import ClientType

pytestmark = pytest.mark.django_db(transaction=True)


def login(uid: int, conn_id: str, node: str, client_type: ClientType = ClientType.WEB) -> Connection:
    return services.connection_login(uid=uid, conn_id=conn_id, node=node, client_type=client_type)


def age_node(node: str, seconds: float) -> None:
    Node.objects.filter(node_id=node).update(heartbeat_at=timezone.now() - timedelta(seconds=seconds))


def age_rows(node: str, seconds: float) -> None:
    Connection.objects.filter(node=node).update(update_time=timezone.now() - timedelta(seconds=seconds))


def rows_of(uid: int) -> list[tuple[str, str, int, int]]:
    return sorted(Connection.objects.filter(uid=uid).values_list("conn_id", "node", "user_status", "client_type"))


# --- node liveness ----------------------------------------------------------------


def test_node_heartbeat_creates_the_node_row():
    before = timezone.now()
    services.node_heartbeat(node="node-a")
    node = Node.objects.get(node_id="node-a")
    assert node.pid == os.getpid()
    assert node.hostname == socket.gethostname()[:255]
    assert before <= node.started_at <= timezone.now()
    assert node.heartbeat_at == node.started_at


def test_node_heartbeat_refreshes_the_mark_and_keeps_the_start_time():
    services.node_heartbeat(node="node-a")
    started = Node.objects.get(node_id="node-a").started_at
    age_node("node-a", 60)
    services.node_heartbeat(node="node-a")
    node = Node.objects.get(node_id="node-a")
    assert node.started_at == started
    assert node.heartbeat_at >= started
    assert timezone.now() - node.heartbeat_at < timedelta(seconds=5)
    assert Node.objects.count() == 1


def test_node_id_is_the_configured_one_or_stable_per_process(settings):
    settings.PUSH_NODE_ID = "push-7"
    assert services.node_id() == "push-7"
    settings.PUSH_NODE_ID = ""
    generated = services.node_id()
    assert generated == services.node_id()
    assert str(os.getpid()) in generated
    assert len(generated) <= Node._meta.get_field("node_id").max_length


# --- reaping dead nodes -------------------------------------------------------------


def test_reap_removes_rows_and_presence_of_a_dead_node_only(settings, new_uid):
    settings.PUSH_NODE_DEAD_AFTER = 30
    dead_uid, live_uid, shared_uid = new_uid(), new_uid(), new_uid()
    services.node_heartbeat(node="dead")
    services.node_heartbeat(node="live")
    login(dead_uid, "dead.1", "dead")
    login(shared_uid, "dead.2", "dead", ClientType.APP)
    login(live_uid, "live.1", "live")
    login(shared_uid, "live.2", "live")
    age_node("dead", 60)
    age_rows("dead", 60)
    age_rows("live", 60)  # old rows on a live node are still live sockets

    assert services.node_reap_dead() == 2

    assert rows_of(dead_uid) == []
    assert rows_of(live_uid) == [("live.1", "live", UserStatus.ONLINE, ClientType.WEB)]
    assert rows_of(shared_uid) == [("live.2", "live", UserStatus.ONLINE, ClientType.WEB)]
    assert presence().connections(dead_uid) == {}
    assert set(presence().connections(shared_uid)) == {"live.2"}
    assert set(presence().connections(live_uid)) == {"live.1"}
    assert presence().online([dead_uid, live_uid, shared_uid]) == {live_uid, shared_uid}
    assert not Node.objects.filter(node_id="dead").exists()
    assert Node.objects.filter(node_id="live").exists()


def test_reap_keeps_rows_touched_after_the_cutoff_and_their_node(settings, new_uid):
    settings.PUSH_NODE_DEAD_AFTER = 30
    stale_uid, fresh_uid = new_uid(), new_uid()
    services.node_heartbeat(node="stalled")
    login(stale_uid, "stalled.1", "stalled")
    age_rows("stalled", 60)
    login(fresh_uid, "stalled.2", "stalled")  # a login just now: the node is back
    age_node("stalled", 60)

    assert services.node_reap_dead() == 1

    assert rows_of(stale_uid) == []
    assert [row[0] for row in rows_of(fresh_uid)] == ["stalled.2"]
    assert set(presence().connections(fresh_uid)) == {"stalled.2"}
    # The node keeps its row while it still has rows, so a later reap finds them.
    assert Node.objects.filter(node_id="stalled").exists()


def test_reap_leaves_a_node_whose_mark_is_within_the_limit(settings, new_uid):
    settings.PUSH_NODE_DEAD_AFTER = 30
    uid = new_uid()
    services.node_heartbeat(node="slow")
    login(uid, "slow.1", "slow")
    age_node("slow", 20)
    age_rows("slow", 60)
    assert services.node_reap_dead() == 0
    assert len(rows_of(uid)) == 1
    assert presence().online([uid]) == {uid}


def test_reap_honours_an_explicit_dead_after(settings, new_uid):
    settings.PUSH_NODE_DEAD_AFTER = 3600
    uid = new_uid()
    services.node_heartbeat(node="n")
    login(uid, "n.1", "n")
    age_node("n", 60)
    age_rows("n", 60)
    assert services.node_reap_dead() == 0
    assert services.node_reap_dead(dead_after=30) == 1
    assert rows_of(uid) == []


def test_reap_removes_offline_rows_of_a_dead_node_too(settings, new_uid):
    settings.PUSH_NODE_DEAD_AFTER = 30
    uid = new_uid()
    services.node_heartbeat(node="gone")
    login(uid, "gone.1", "gone")
    services.connection_logout(uid=uid, conn_id="gone.1")
    age_node("gone", 60)
    age_rows("gone", 60)
    assert services.node_reap_dead() == 1
    assert rows_of(uid) == []


def test_reap_deletes_a_dead_node_without_rows():
    services.node_heartbeat(node="empty")
    age_node("empty", 3600)
    assert services.node_reap_dead() == 0
    assert not Node.objects.filter(node_id="empty").exists()


def test_node_leave_removes_every_row_of_the_node(new_uid):
    a, b = new_uid(), new_uid()
    services.node_heartbeat(node="leaving")
    services.node_heartbeat(node="staying")
    login(a, "leaving.1", "leaving")
    login(b, "leaving.2", "leaving")
    login(b, "staying.1", "staying")
    assert services.node_leave(node="leaving") == 2
    assert rows_of(a) == []
    assert [row[0] for row in rows_of(b)] == ["staying.1"]
    assert presence().online([a, b]) == {b}
    assert set(presence().connections(b)) == {"staying.1"}
    assert list(Node.objects.values_list("node_id", flat=True)) == ["staying"]


# --- login, logout, close -------------------------------------------------------------


def test_login_writes_the_row_and_the_presence_entry(new_uid):
    uid = new_uid()
    before = timezone.now().replace(microsecond=0)
    row = login(uid, "n1.1", "n1", ClientType.APP)
    stored = Connection.objects.get(conn_id="n1.1")
    assert stored.pk == row.pk
    assert (stored.uid, stored.node, stored.user_status, stored.client_type) == (
        uid,
        "n1",
        UserStatus.ONLINE,
        ClientType.APP,
    )
    assert stored.login_time == stored.update_time
    assert stored.login_time >= before
    node, client_type, epoch = presence().connections(uid)["n1.1"].split(" ")
    assert (node, client_type) == ("n1", "2")
    assert abs(int(epoch) - int(stored.login_time.timestamp())) <= 1


def test_logout_marks_offline_and_removes_presence_but_keeps_the_row(new_uid):
    uid = new_uid()
    login(uid, "n1.1", "n1")
    login(uid, "n1.2", "n1")
    Connection.objects.filter(conn_id="n1.1").update(update_time=timezone.now() - timedelta(seconds=100))
    services.connection_logout(uid=uid, conn_id="n1.1")
    rows = {r.conn_id: r for r in Connection.objects.filter(uid=uid)}
    assert rows["n1.1"].user_status == UserStatus.OFFLINE
    assert timezone.now() - rows["n1.1"].update_time < timedelta(seconds=5)
    assert rows["n1.2"].user_status == UserStatus.ONLINE
    assert set(presence().connections(uid)) == {"n1.2"}


def test_login_after_logout_on_the_same_socket_reuses_the_row(new_uid):
    first, second = new_uid(), new_uid()
    login(first, "n1.1", "n1")
    services.connection_logout(uid=first, conn_id="n1.1")
    login(second, "n1.1", "n1", ClientType.APP)
    assert Connection.objects.filter(conn_id="n1.1").count() == 1
    assert rows_of(first) == []
    assert rows_of(second) == [("n1.1", "n1", UserStatus.ONLINE, ClientType.APP)]
    assert presence().connections(first) == {}
    assert set(presence().connections(second)) == {"n1.1"}


def test_close_deletes_the_row_and_the_presence_entry(new_uid):
    uid = new_uid()
    login(uid, "n1.1", "n1")
    login(uid, "n1.2", "n1")
    services.connection_close(uid=uid, conn_id="n1.1")
    assert [row[0] for row in rows_of(uid)] == ["n1.2"]
    assert set(presence().connections(uid)) == {"n1.2"}
    services.connection_close(uid=uid, conn_id="n1.2")
    assert rows_of(uid) == []
    assert presence().connections(uid) == {}
    assert presence().online([uid]) == set()


def test_close_of_an_unknown_socket_is_harmless(new_uid):
    uid = new_uid()
    login(uid, "n1.1", "n1")
    services.connection_close(uid=uid, conn_id="n1.404")
    assert len(rows_of(uid)) == 1
    assert set(presence().connections(uid)) == {"n1.1"}


def test_presence_and_rows_agree_after_a_mixed_sequence(new_uid):
    uids = [new_uid() for _ in range(3)]
    for index, uid in enumerate(uids):
        for socket_no in range(3):
            login(uid, f"mix.{index}.{socket_no}", "mix")
    services.connection_logout(uid=uids[0], conn_id="mix.0.0")
    services.connection_close(uid=uids[1], conn_id="mix.1.1")
    services.connection_close(uid=uids[2], conn_id="mix.2.0")
    services.connection_logout(uid=uids[2], conn_id="mix.2.1")
    for uid in uids:
        online_rows = set(
            Connection.objects.filter(uid=uid, user_status=UserStatus.ONLINE).values_list("conn_id", flat=True)
        )
        assert set(presence().connections(uid)) == online_rows


def test_presence_restore_writes_back_the_online_rows_of_its_node_only(new_uid):
    kept, logged_out, elsewhere = new_uid(), new_uid(), new_uid()
    login(kept, "n1.1", "n1", ClientType.APP)
    login(logged_out, "n1.2", "n1")
    login(elsewhere, "n2.1", "n2")
    services.connection_logout(uid=logged_out, conn_id="n1.2")
    entry = presence().connections(kept)
    # As after a Redis restart: the entries are gone, the rows are not.
    presence().remove([(kept, "n1.1"), (elsewhere, "n2.1")])

    assert services.node_presence_restore(node="n1") == 1
    assert presence().connections(kept) == entry
    assert presence().connections(logged_out) == {}
    assert presence().connections(elsewhere) == {}  # node n2 restores its own
    assert services.node_presence_restore(node="n1") == 1  # and again: nothing changes
    assert presence().connections(kept) == entry


# --- through a consumer ---------------------------------------------------------------


@database_sync_to_async
def consumer_rows(uid: int) -> list[tuple[str, str]]:
    return list(Connection.objects.filter(uid=uid).values_list("conn_id", "node"))


@database_sync_to_async
def node_row(node: str) -> Node | None:
    return Node.objects.filter(node_id=node).first()


async def wait_for_node_row(node: str) -> Node:
    for _ in range(100):
        row = await node_row(node)
        if row is not None:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"no Node row for {node}")


async def test_consumer_relation_row_carries_the_hub_node_and_the_node_is_alive(connect, verifier, new_uid):
    uid = new_uid()
    sock = await connect()
    assert (await sock.login(f"key-{uid}"))["code"] == 200
    hub = get_hub()
    [(conn_id, node)] = await consumer_rows(uid)
    assert node == hub.node
    assert conn_id.startswith(f"{hub.node}.")
    assert hub.sockets[conn_id] is not None
    assert presence().connections(uid)[conn_id].startswith(f"{hub.node} 1 ")
    row = await wait_for_node_row(hub.node)
    assert row.pid == os.getpid()
    assert timezone.now() - row.heartbeat_at < timedelta(seconds=10)
    await sock.communicator.disconnect()
    assert await consumer_rows(uid) == []


async def test_two_sockets_of_one_node_have_distinct_conn_ids(connect, verifier, new_uid):
    uid = new_uid()
    first, second = await connect(), await connect()
    await first.login(f"key-{uid}")
    await second.login(f"key-{uid}")
    rows = await consumer_rows(uid)
    assert len({conn_id for conn_id, _ in rows}) == 2
    assert {node for _, node in rows} == {get_hub().node}


def test_a_node_restarted_under_the_same_id_clears_what_its_earlier_process_left(settings):
    earlier = services.PROCESS_STARTED_AT - timedelta(minutes=5)
    services.connection_login(uid=4242, conn_id="node-r.1", node="node-r", client_type=ClientType.WEB)
    Connection.objects.filter(conn_id="node-r.1").update(login_time=earlier, update_time=earlier)
    services.connection_login(uid=4243, conn_id="node-r.2", node="node-r", client_type=ClientType.WEB)
    assert services.node_start(node="node-r") == 1
    assert list(Connection.objects.filter(node="node-r").values_list("conn_id", flat=True)) == ["node-r.2"]
    assert presence().connections(4242) == {}
    assert Node.objects.filter(node_id="node-r").exists()
