"""From the push API to the sockets: live delivery, offline replay, ack and unread."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async

from connections.protocol import MsgType
from notifications.models import JobState, PushJob
from notifications.services import push_job_run

pytestmark = pytest.mark.django_db(transaction=True)

USER = "/api/notice/userMessage"
COMMENT = "/api/comment/message"
SYSTEM = "/api/notice/systemMessage"


async def eventually(check, timeout: float = 20.0) -> Any:
    """Poll an async check until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


async def logged_in(connect, uid: int):
    sock = await connect()
    reply = await sock.login(f"key-{uid}")
    assert reply["code"] == 200, reply
    return sock


async def test_push_reaches_the_online_user_with_stored_noce_ack(api, connect, verifier, rows, new_uid):
    uid = new_uid()
    sock = await logged_in(connect, uid)
    status, answer = await api.post(USER, {"uids": [uid], "body": {"title": "hi"}})
    assert status == 200 and answer["data"]["sent"] == 1
    frame = await sock.recv()
    assert frame["msg_type"] == MsgType.USER_NOTICE and frame["code"] == 200
    assert frame["uid"] == 0
    assert frame["body"] == {"to_uid": uid, "title": "hi"}
    (row,) = await rows(uid)
    assert frame["noce_ack"] == row.noce_ack == answer["data"]["noce_acks"][str(uid)]

    async def sent():
        return (await rows(uid))[0].is_sent

    assert await eventually(sent)


async def test_every_socket_of_the_user_gets_it_and_nobody_else(api, connect, verifier, new_uid):
    uid, bystander = new_uid(), new_uid()
    tabs = [await logged_in(connect, uid) for _ in range(2)]
    other = await logged_in(connect, bystander)
    anonymous = await connect()
    await api.post(COMMENT, {"uids": [uid], "from_uid": bystander, "body": {"text": "re"}})
    frames = [await tab.recv() for tab in tabs]
    assert frames[0] == frames[1]
    assert frames[0]["msg_type"] == MsgType.COMMENT and frames[0]["uid"] == bystander
    assert await other.nothing()
    assert await anonymous.nothing()


async def test_push_to_online_and_offline_users_goes_only_to_the_online(api, connect, verifier, rows, new_uid):
    # One Redis round trip checks presence and publishes (notifications/publish.py);
    # the offline user's row waits, unsent, for the next login.
    online, offline = new_uid(), new_uid()
    sock = await logged_in(connect, online)
    status, answer = await api.post(USER, {"uids": [offline, online], "body": {"n": 1}})
    assert status == 200 and answer["data"]["stored"] == 2 and answer["data"]["sent"] == 1
    frame = await sock.recv()
    assert frame["body"] == {"to_uid": online, "n": 1}
    assert frame["noce_ack"] == answer["data"]["noce_acks"][str(online)]
    assert await sock.nothing()
    (row,) = await rows(offline)
    assert not row.is_sent


async def test_offline_user_gets_stored_messages_at_login(api, connect, verifier, rows, new_uid):
    uid = new_uid()
    await api.post(USER, {"uids": [uid], "body": {"n": 1}})
    await api.post(COMMENT, {"uids": [uid], "from_uid": 9, "body": {"n": 2}})
    sock = await connect()
    reply = await sock.login(f"key-{uid}")
    assert reply["body"]["unread"] == {"7": 1, "5": 1}
    first, second = await sock.recv(), await sock.recv()
    assert [first["body"]["n"], second["body"]["n"]] == [1, 2]
    assert {first["noce_ack"], second["noce_ack"]} == {r.noce_ack for r in await rows(uid)}
    assert await sock.nothing()

    async def all_sent():
        return all(r.is_sent for r in await rows(uid))

    assert await eventually(all_sent)
    # A second socket logging in later gets no replay: those were sent.
    again = await connect()
    assert (await again.login(f"key-{uid}"))["body"]["unread"] == {"7": 1, "5": 1}
    assert await again.nothing()


async def test_logout_stops_delivery_to_that_socket(api, connect, verifier, new_uid):
    uid = new_uid()
    sock = await logged_in(connect, uid)
    await sock.request("logout")
    status, answer = await api.post(USER, {"uids": [uid], "body": {}})
    assert status == 200 and answer["data"]["sent"] == 0
    assert await sock.nothing()


async def test_ack_marks_own_messages_read_and_refuses_others(api, connect, verifier, rows, new_uid):
    owner, intruder = new_uid(), new_uid()
    _, answer = await api.post(USER, {"uids": [owner], "body": {}})
    owners_ack = answer["data"]["noce_acks"][str(owner)]
    sock = await logged_in(connect, intruder)
    reply = await sock.request("ack", {"noce_ack": owners_ack})
    assert reply["msg_type"] == MsgType.ACK and reply["body"] == {"acked": 0}
    (row,) = await rows(owner)
    assert not row.is_read

    mine = await logged_in(connect, owner)
    await mine.recv()  # the replayed message
    reply = await mine.request("ack", {"noce_acks": [owners_ack, "unknown-ack"]})
    assert reply["body"] == {"acked": 1}
    (row,) = await rows(owner)
    assert row.is_read
    assert (await mine.request("ack", {"noce_ack": owners_ack}))["body"] == {"acked": 0}


async def test_unread_lists_newest_first_with_counts_and_filters(api, connect, verifier, new_uid):
    uid = new_uid()
    for n in range(3):
        await api.post(USER, {"uids": [uid], "body": {"n": n}})
    await api.post(COMMENT, {"uids": [uid], "from_uid": 5, "body": {"n": 9}})
    sock = await connect()
    await sock.login(f"key-{uid}")
    for _ in range(4):
        await sock.recv()
    reply = await sock.request("unread")
    assert reply["msg_type"] == MsgType.UNREAD
    assert [item["body"]["n"] for item in reply["body"]["items"]] == [9, 2, 1, 0]
    assert reply["body"]["counts"] == {"7": 3, "5": 1}
    item = reply["body"]["items"][0]
    assert item["msg_type"] == 5 and item["uid"] == 5 and item["body"]["to_uid"] == uid
    reply = await sock.request("unread", {"msg_type": 7, "limit": 2})
    assert [item["body"]["n"] for item in reply["body"]["items"]] == [2, 1]
    await sock.request("ack", {"noce_acks": [i["noce_ack"] for i in reply["body"]["items"]]})
    assert (await sock.request("unread"))["body"]["counts"] == {"7": 1, "5": 1}


async def test_unread_never_shows_another_users_messages(api, connect, verifier, new_uid):
    uid, other = new_uid(), new_uid()
    await api.post(USER, {"uids": [other], "body": {"secret": True}})
    sock = await logged_in(connect, uid)
    reply = await sock.request("unread")
    assert reply["body"] == {"items": [], "counts": {}}


async def test_stock_layer_path_delivers_the_same_frame(api, connect, verifier, settings, rows, new_uid):
    settings.PUSH_FANOUT = "layer"
    uid = new_uid()
    sock = await logged_in(connect, uid)
    await api.post(USER, {"uids": [uid], "body": {"via": "layer"}})
    frame = await sock.recv()
    assert frame["body"] == {"to_uid": uid, "via": "layer"}

    async def sent():
        return (await rows(uid))[0].is_sent

    assert await eventually(sent)


@database_sync_to_async
def job_state(job_id: str) -> PushJob:
    return PushJob.objects.get(id=job_id)


async def test_system_notice_reaches_every_online_user_once(api, connect, verifier, settings, rows, new_uid):
    settings.PUSH_JOBS = "inline"
    online = [new_uid() for _ in range(3)]
    offline = new_uid()
    socks = [await logged_in(connect, uid) for uid in online]
    second_tab = await logged_in(connect, online[0])
    status, answer = await api.post(SYSTEM, {"body": {"notice": "maintenance"}})
    assert status == 202
    for uid, sock in zip(online, socks, strict=True):
        frame = await sock.recv()
        assert frame["msg_type"] == MsgType.SYSTEM_NOTICE and frame["body"] == {"to_uid": uid, "notice": "maintenance"}
        assert len(await rows(uid)) == 1
    assert (await second_tab.recv())["msg_type"] == MsgType.SYSTEM_NOTICE
    assert await rows(offline) == []

    async def done():
        job = await job_state(answer["data"]["job_id"])
        return job if job.state == JobState.DONE else None

    job = await eventually(done)
    assert job.stored >= 3 and job.sent >= 3


async def test_job_run_again_stores_no_duplicate(api, connect, verifier, settings, rows, new_uid):
    settings.PUSH_JOBS = "inline"
    settings.PUSH_API_INLINE_MAX_UIDS = 1
    uids = [new_uid() for _ in range(4)]
    status, answer = await api.post(USER, {"uids": uids, "body": {"bulk": 1}})
    assert status == 202

    async def done():
        job = await job_state(answer["data"]["job_id"])
        return job if job.state == JobState.DONE else None

    assert (await eventually(done)).stored == 4
    job = await database_sync_to_async(push_job_run)(job_id=answer["data"]["job_id"])
    assert job.stored == 4
    # Forcing a second full run (as a retried worker would) stores nothing new.
    await database_sync_to_async(PushJob.objects.filter(id=job.id).update)(state=JobState.RUNNING)
    await database_sync_to_async(push_job_run)(job_id=job.id, batch_size=3)
    for uid in uids:
        assert len(await rows(uid)) == 1
    assert (await job_state(job.id)).stored == 4


async def test_a_publish_larger_than_a_bus_chunk_reaches_only_the_online_sockets(connect, verifier, rows, new_uid):
    # A job's batch is one group of thousands of users, published a bus chunk
    # per presence script call: online users in the first and the last chunk
    # get their frame once, offline ones nothing, and the count is the online.
    from notifications.publish import BUS_CHUNK, publish_stored
    from notifications.store import NewMessage, messages_store_batch

    first, last, bystander = new_uid(), new_uid(), new_uid()
    socks = [await logged_in(connect, uid) for uid in (first, last, bystander)]
    offline = [new_uid() for _ in range(2 * BUS_CHUNK + 100)]
    body = {"notice": "big"}
    messages = [
        NewMessage(to_uid=uid, msg_type=MsgType.SYSTEM_NOTICE, body=body, noce_ack=f"big-{uid}")
        for uid in [first, *offline, last]
    ]
    await database_sync_to_async(messages_store_batch)(messages=messages)
    assert await database_sync_to_async(publish_stored)(messages=messages) == 2
    for uid, sock in zip((first, last), socks[:2], strict=True):
        frame = await sock.recv()
        assert frame["noce_ack"] == f"big-{uid}" and frame["body"] == {"to_uid": uid, "notice": "big"}
        assert await sock.nothing()
    assert await socks[2].nothing()


async def test_a_replayed_message_published_late_reaches_the_socket_once(connect, verifier, rows, new_uid, settings):
    # The API stores, then publishes; on a loaded node the publish can trail
    # a login that already replayed the row. However late it comes, the
    # socket gets the message once; a publish after that (a resend) arrives.
    from notifications.publish import publish_stored
    from notifications.store import NewMessage, messages_store

    uid = new_uid()
    message = NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={"late": True}, noce_ack=f"late-{uid}")
    await database_sync_to_async(messages_store)(messages=[message])
    sock = await logged_in(connect, uid)
    replayed = await sock.recv()
    assert replayed["noce_ack"] == message.noce_ack
    assert (await sock.request("heartbeat"))["uid"] == uid  # time and frames pass before the publish

    await database_sync_to_async(publish_stored)(messages=[message])
    assert await sock.nothing(), "the late live copy of a replayed message is dropped"
    await database_sync_to_async(publish_stored)(messages=[message])
    assert (await sock.recv())["noce_ack"] == message.noce_ack, "a later publish (a resend) goes through"
