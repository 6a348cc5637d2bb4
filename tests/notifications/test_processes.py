"""Across real processes: two daphne nodes on one Redis, and a real Celery worker."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from connections.models import Connection
from connections.presence import presence
from connections.protocol import MsgType
from connections.services import presence_info
from notifications.client import PushClient
from notifications.models import ScheduleRun
from notifications.publish import publish_stored
from notifications.sharding import model_for_uid
from notifications.store import NewMessage, messages_store
from tests.scrape import scrape
from tests.servers import celery_beat, celery_worker, daphne, open_socket

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not settings.REDIS_URL, reason="processes share a bus only through Redis"),
]


async def next_frame(ws, timeout: float = 5) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def client_for(node) -> PushClient:
    return PushClient(f"http://127.0.0.1:{node.port}", secret=settings.PUSH_API_SECRET)


@pytest.fixture
def nodes(verifier):
    started = [daphne(f"node{i}", PUSH_JOBS="inline", PUSH_NODE_ID=f"node{i}-{uuid.uuid4().hex[:6]}") for i in (1, 2)]
    try:
        for node in started:
            node.start()
        yield started
    finally:
        for node in started:
            node.stop()


@database_sync_to_async
def nodes_of(uids: list[int]) -> set[str]:
    return set(Connection.objects.filter(uid__in=uids).values_list("node", flat=True))


async def test_broadcast_and_user_push_reach_sockets_on_both_nodes(nodes, new_uid):
    node_a, node_b = nodes
    uids = [new_uid() for _ in range(4)]
    sockets = {uid: await open_socket(node_a if i % 2 else node_b, uid) for i, uid in enumerate(uids)}
    second_tab = await open_socket(node_a, uids[0])  # uids[0] lives on node b too
    try:
        assert len(await nodes_of(uids)) == 2

        answer = await asyncio.to_thread(client_for(node_a).system_message, {"notice": "both"})
        assert answer["code"] == 202
        for uid, ws in [*sockets.items(), (uids[0], second_tab)]:
            frame = await next_frame(ws)
            assert frame["msg_type"] == 6 and frame["body"] == {"to_uid": uid, "notice": "both"}

        target = uids[0]
        answer = await asyncio.to_thread(client_for(node_a).user_message, [target], {"only": "you"})
        assert answer["data"]["sent"] == 1
        for ws in (sockets[target], second_tab):
            assert (await next_frame(ws))["body"] == {"to_uid": target, "only": "you"}
        for uid in uids[1:]:
            with pytest.raises(TimeoutError):
                await next_frame(sockets[uid], timeout=0.3)
    finally:
        for ws in [*sockets.values(), second_tab]:
            await ws.close()


def bus_received(node) -> float:
    return scrape(node.port).value("pushsite_bus_messages_total")


async def test_pushes_to_a_user_reach_only_the_node_that_holds_the_user(nodes, new_uid):
    node_a, node_b = nodes
    uid = new_uid()
    ws = await open_socket(node_a, uid)
    try:
        before_a, before_b = bus_received(node_a), bus_received(node_b)
        for n in range(20):
            # Half through each node's API: where a push enters does not matter.
            answer = await asyncio.to_thread(client_for(nodes[n % 2]).user_message, [uid], {"n": n})
            assert answer["data"]["sent"] == 1
            assert (await next_frame(ws))["body"] == {"to_uid": uid, "n": n}
        assert bus_received(node_a) - before_a == 20
        assert bus_received(node_b) - before_b == 0

        # A system notice reaches every node that holds any online user.
        other = new_uid()
        ws_b = await open_socket(node_b, other)
        try:
            answer = await asyncio.to_thread(client_for(node_b).system_message, {"notice": "all"})
            assert answer["code"] == 202
            assert (await next_frame(ws))["body"] == {"to_uid": uid, "notice": "all"}
            assert (await next_frame(ws_b))["body"] == {"to_uid": other, "notice": "all"}
            assert bus_received(node_b) - before_b >= 1
        finally:
            await ws_b.close()
    finally:
        await ws.close()


@database_sync_to_async
def leave_a_stale_entry(uid: int, node: str) -> None:
    """A presence entry naming ``node`` for a socket it does not hold (as a node killed mid-session leaves)."""
    presence().add(uid, f"{node}.999999", presence_info(node=node, client_type=1, login_time=timezone.now()))


@database_sync_to_async
def unsent_bodies(uid: int) -> list[dict[str, Any]]:
    return [row.body for row in model_for_uid(uid).objects.filter(to_uid=uid, is_sent=False)]


async def test_a_push_to_a_node_that_no_longer_holds_the_socket_stays_unsent_for_the_next_login(nodes, new_uid):
    node_a, node_b = nodes
    uid = new_uid()
    await leave_a_stale_entry(uid, node_b.env["PUSH_NODE_ID"])
    bystander = await open_socket(node_b, new_uid())  # node B is up and subscribed, holding another user
    before_b = bus_received(node_b)

    answer = await asyncio.to_thread(client_for(node_a).user_message, [uid], {"left": "unsent"})
    assert answer["code"] == 200, answer
    # Node B gets it, holds no such socket, and changes nothing: the row stays unsent.
    for _ in range(50):
        if bus_received(node_b) > before_b:
            break
        await asyncio.sleep(0.1)
    assert bus_received(node_b) - before_b == 1
    assert node_b.proc.poll() is None, node_b.output()
    await asyncio.sleep(0.3)
    assert await unsent_bodies(uid) == [{"left": "unsent"}]
    with pytest.raises(TimeoutError):
        await next_frame(bystander, timeout=0.3)
    await bystander.close()

    # The user's next login, on either node, gets it.
    ws = await open_socket(node_a, uid)
    try:
        assert (await next_frame(ws))["body"] == {"to_uid": uid, "left": "unsent"}
    finally:
        await ws.close()


@database_sync_to_async
def store_and_publish(messages: list[NewMessage]) -> int:
    messages_store(messages=messages)
    return publish_stored(messages=messages)


async def test_a_publish_of_mixed_messages_is_split_by_node(nodes, new_uid):
    """The two-step path (messages that do not share a body): each node gets its own users only."""
    node_a, node_b = nodes
    on_a, on_b, offline = new_uid(), new_uid(), new_uid()
    ws_a, ws_b = await open_socket(node_a, on_a), await open_socket(node_b, on_b)
    try:
        before_a, before_b = bus_received(node_a), bus_received(node_b)
        messages = [
            NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={"for": uid}) for uid in (on_a, on_b, offline)
        ]
        assert await store_and_publish(messages) == 2
        assert (await next_frame(ws_a))["body"] == {"to_uid": on_a, "for": on_a}
        assert (await next_frame(ws_b))["body"] == {"to_uid": on_b, "for": on_b}
        for ws in (ws_a, ws_b):
            with pytest.raises(TimeoutError):
                await next_frame(ws, timeout=0.3)
        assert bus_received(node_a) - before_a == 1
        assert bus_received(node_b) - before_b == 1
    finally:
        await ws_a.close()
        await ws_b.close()


async def test_real_celery_worker_runs_a_large_push_to_a_socket(verifier, new_uid):
    queue = f"pushtest-{uuid.uuid4().hex[:8]}"
    node = daphne("node", PUSH_JOBS="celery", PUSH_API_INLINE_MAX_UIDS=1, PUSH_CELERY_QUEUE=queue)
    worker = celery_worker("worker", PUSH_CELERY_QUEUE=queue)
    try:
        node.start()
        worker.start()
        uid, offline = new_uid(), new_uid()
        ws = await open_socket(node, uid)
        answer = await asyncio.to_thread(client_for(node).user_message, [uid, offline], {"via": "celery"})
        assert answer["code"] == 202
        frame = await next_frame(ws, timeout=15)
        assert frame["msg_type"] == 7 and frame["body"] == {"to_uid": uid, "via": "celery"}
        job = await asyncio.to_thread(client_for(node).job, answer["data"]["job_id"])
        for _ in range(50):
            if job["data"]["state"] == "done":
                break
            await asyncio.sleep(0.1)
            job = await asyncio.to_thread(client_for(node).job, answer["data"]["job_id"])
        assert job["data"]["state"] == "done" and job["data"]["stored"] == 2 and job["data"]["sent"] == 1
        assert "run_push_job" in worker.output()
        await ws.close()
    finally:
        worker.stop()
        node.stop()


@database_sync_to_async
def every_second_schedule(name: str) -> None:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name=name, task="notifications.push_unsent", interval=interval, kwargs=json.dumps({"msg_type": 7})
    )


@database_sync_to_async
def store_quietly(uid: int) -> str:
    message = NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={"via": "beat"})
    messages_store(messages=[message])
    return message.noce_ack


async def test_real_beat_and_worker_deliver_a_scheduled_run_to_a_socket(verifier, new_uid):
    queue = f"pushtest-{uuid.uuid4().hex[:8]}"
    await every_second_schedule("TestPushUserNotice")
    node = daphne("node", PUSH_CELERY_QUEUE=queue)
    worker = celery_worker("worker", PUSH_CELERY_QUEUE=queue)
    beat = celery_beat("beat", PUSH_CELERY_QUEUE=queue)
    try:
        node.start()
        worker.start()
        uid = new_uid()
        ws = await open_socket(node, uid)
        # Stored but never published, as if the live push had been lost.
        noce_ack = await store_quietly(uid)
        beat.start()
        frame = await next_frame(ws, timeout=30)
        assert frame["noce_ack"] == noce_ack and frame["body"] == {"to_uid": uid, "via": "beat"}
        run = await database_sync_to_async(ScheduleRun.objects.filter(name="TestPushUserNotice").first)()
        assert run is not None and run.state in {"ok", "running"}
        assert "notifications.push_unsent" in worker.output()
        await ws.close()
    finally:
        beat.stop()
        worker.stop()
        node.stop()


async def test_push_command_signs_and_posts_to_a_running_pushsite(verifier, new_uid, capsys):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    node = daphne("node", PUSH_JOBS="inline")
    try:
        node.start()
        uid = new_uid()
        ws = await open_socket(node, uid)
        url = f"http://127.0.0.1:{node.port}"
        await asyncio.to_thread(
            call_command, "push", "comment", "--uid", str(uid), "--from-uid", "7", "--body", '{"t": 1}', "--url", url
        )
        answer = json.loads(capsys.readouterr().out)
        assert answer["code"] == 200 and answer["data"]["sent"] == 1
        frame = await next_frame(ws)
        assert frame["msg_type"] == 5 and frame["uid"] == 7 and frame["body"] == {"to_uid": uid, "t": 1}
        with pytest.raises(CommandError, match="401"):
            await asyncio.to_thread(
                call_command, "push", "user", "--uid", str(uid), "--url", url, "--secret", "not-the-secret"
            )
        with pytest.raises(CommandError, match="needs at least one --uid"):
            call_command("push", "user", "--url", url)
        await ws.close()
    finally:
        node.stop()
