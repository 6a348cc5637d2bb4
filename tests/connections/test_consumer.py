"""The WebSocket session of PROTOCOL.md section 1, through the real ASGI app."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from connections.hub import get_hub
from connections.models import Connection, UserStatus
from connections.presence import presence
from connections.protocol import CloseCode, Code, MsgType

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def relation_rows(uid: int) -> list[tuple[int, int]]:
    return list(Connection.objects.filter(uid=uid).values_list("user_status", "client_type"))


@database_sync_to_async
def presence_of(uid: int) -> dict[str, str]:
    return presence().connections(uid)


async def test_anonymous_heartbeat_is_answered_with_server_time_and_seq(connect):
    sock = await connect()
    reply = await sock.request("heartbeat")
    assert reply["msg_type"] == MsgType.HEARTBEAT
    assert reply["code"] == 200 and reply["msg"] == "SUCCESS"
    assert isinstance(reply["body"]["ts"], int) and reply["body"]["ts"] > 1_700_000_000_000
    assert set(reply) == {"msg_type", "code", "msg", "uid", "body", "noce_ack", "seq"}


async def test_login_with_ukey_records_web_relation_and_presence(connect, verifier, new_uid):
    uid = new_uid()
    sock = await connect()
    reply = await sock.login(f"key-{uid}")
    assert reply["msg_type"] == MsgType.LOGIN and reply["code"] == 200
    assert reply["body"] == {"uid": uid, "unread": {}}
    assert await relation_rows(uid) == [(UserStatus.ONLINE, 1)]
    assert len(await presence_of(uid)) == 1
    assert uid in get_hub().users


async def test_login_with_token_records_app_client_type(connect, verifier, new_uid):
    uid = new_uid()
    sock = await connect()
    reply = await sock.request("login", {"token": f"key-{uid}"})
    assert reply["code"] == 200
    assert await relation_rows(uid) == [(UserStatus.ONLINE, 2)]


async def test_unknown_login_key_gets_401_and_socket_stays_usable(connect, verifier):
    sock = await connect()
    reply = await sock.login("nobody-knows-me")
    assert reply["msg_type"] == MsgType.ERROR and reply["code"] == Code.LOGIN_REFUSED
    assert (await sock.request("heartbeat"))["code"] == 200


async def test_main_site_error_gets_503_and_socket_stays_usable(connect, verifier):
    sock = await connect()
    for key in ("error", "garbage"):
        reply = await sock.login(key)
        assert reply["msg_type"] == MsgType.ERROR and reply["code"] == Code.UNAVAILABLE, reply
        assert "login service" in reply["msg"]
    assert (await sock.request("heartbeat"))["code"] == 200


async def test_slow_main_site_gets_503_within_the_timeout(connect, verifier, settings, new_uid):
    settings.PUSH_AUTH_VERIFY_TIMEOUT = 0.5
    sock = await connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await sock.login(f"slow-{new_uid()}")
    assert reply["code"] == Code.UNAVAILABLE
    assert loop.time() - started < 2.5
    assert (await sock.request("heartbeat"))["code"] == 200


async def test_main_site_down_gets_503(connect, verifier, settings):
    settings.PUSH_AUTH_VERIFY_URL = "http://127.0.0.1:9/verify"  # discard port: nothing listens
    sock = await connect()
    reply = await sock.login("key-5")
    assert reply["code"] == Code.UNAVAILABLE


async def test_verified_login_is_cached_so_reconnects_do_not_hit_the_site(connect, verifier, new_uid):
    uid = new_uid()
    for _ in range(3):
        sock = await connect()
        assert (await sock.login(f"key-{uid}"))["code"] == 200
    assert verifier.calls[f"key-{uid}"] == 1


async def test_concurrent_logins_with_one_key_share_one_verify_call(connect, verifier, new_uid):
    uid = new_uid()
    socks = [await connect() for _ in range(5)]
    replies = await asyncio.gather(*(s.login(f"key-{uid}") for s in socks))
    assert [r["code"] for r in replies] == [200] * 5
    assert verifier.calls[f"key-{uid}"] == 1


async def test_login_without_configured_verifier_outside_local_is_503(connect, settings):
    settings.PUSH_ENV = "test"
    settings.PUSH_AUTH_VERIFY_URL = ""
    sock = await connect()
    reply = await sock.login("dev-42")
    assert reply["code"] == Code.UNAVAILABLE
    assert "PUSH_AUTH_VERIFY_URL" in reply["msg"]


async def test_development_verifier_in_local_profile(connect, settings, new_uid):
    settings.PUSH_ENV = "local"
    settings.PUSH_AUTH_VERIFY_URL = ""
    uid = new_uid()
    sock = await connect()
    assert (await sock.login(f"dev-{uid}"))["body"]["uid"] == uid
    other = await connect()
    assert (await other.login("not-a-dev-key"))["code"] == Code.LOGIN_REFUSED


async def test_one_user_may_hold_many_sockets(connect, verifier, new_uid):
    uid = new_uid()
    socks = [await connect() for _ in range(3)]
    for sock in socks:
        assert (await sock.login(f"key-{uid}"))["code"] == 200
    assert len(await relation_rows(uid)) == 3
    assert len(await presence_of(uid)) == 3
    assert len(get_hub().users[uid]) == 3


async def test_logout_leaves_delivery_marks_offline_and_keeps_socket(connect, verifier, new_uid):
    uid = new_uid()
    sock = await connect()
    await sock.login(f"key-{uid}")
    reply = await sock.request("logout")
    assert reply["msg_type"] == MsgType.LOGOUT and reply["code"] == 200
    assert await relation_rows(uid) == [(UserStatus.OFFLINE, 1)]
    assert await presence_of(uid) == {}
    assert uid not in get_hub().users
    assert (await sock.request("ack", {"noce_ack": "x"}))["code"] == Code.LOGIN_REQUIRED
    assert (await sock.login(f"key-{uid}"))["code"] == 200


async def test_close_clears_relation_presence_and_membership(connect, verifier, new_uid):
    uid = new_uid()
    sock = await connect()
    await sock.login(f"key-{uid}")
    await sock.communicator.disconnect()
    assert await relation_rows(uid) == []
    assert await presence_of(uid) == {}
    assert uid not in get_hub().users
    assert get_hub().sockets == {}


async def test_close_after_logout_deletes_the_offline_row(connect, verifier, new_uid):
    uid = new_uid()
    sock = await connect()
    await sock.login(f"key-{uid}")
    await sock.request("logout")
    await sock.communicator.disconnect()
    assert await relation_rows(uid) == []


async def test_second_login_on_a_logged_in_socket_is_refused(connect, verifier, new_uid):
    uid, other = new_uid(), new_uid()
    sock = await connect()
    await sock.login(f"key-{uid}")
    reply = await sock.login(f"key-{other}")
    assert reply["code"] == Code.BAD_REQUEST and "logout" in reply["msg"]
    assert await relation_rows(other) == []


@pytest.mark.parametrize("action", ["logout", "ack", "unread"])
async def test_actions_that_need_login_get_403(connect, action):
    sock = await connect()
    body = {"noce_ack": "abc"} if action == "ack" else None
    reply = await sock.request(action, body)
    assert reply["msg_type"] == MsgType.ERROR and reply["code"] == Code.LOGIN_REQUIRED
    assert action in reply["msg"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"login"', "JSON object"),
        ('{"action": "dance", "seq": 3}', "unknown action"),
        ('{"action": 7}', "action"),
        ('{"seq": 1}', "action"),
        ('{"action": "login", "seq": 4}', "needs a body"),
        ('{"action": "login", "body": {}}', "needs a body"),
        ('{"action": "login", "body": {"ukey": 5}}', "body.ukey"),
        ('{"action": "login", "body": {"ukey": "a", "token": "b"}}', "exactly one"),
        ('{"action": "login", "body": {"ukey": "  "}}', "body.ukey"),
        ('{"action": "login", "body": "ukey"}', "body must be a JSON object"),
        ('{"action": "heartbeat", "body": {"x": 1}}', "body.x: unknown field"),
        ('{"action": "heartbeat", "extra": 1}', "unknown field: extra"),
        ('{"action": "heartbeat", "seq": "7"}', "seq"),
        ('{"action": "heartbeat", "seq": -1}', "seq"),
        ('{"action": "heartbeat", "seq": true}', "seq"),
        ('{"action": "ack", "body": {"noce_acks": []}}', "body.noce_acks"),
        ('{"action": "unread", "body": {"limit": 0}}', "body.limit"),
        ('{"action": "unread", "body": {"msg_type": 1}}', "body.msg_type"),
    ],
)
async def test_malformed_frames_get_400_naming_the_problem(connect, text, fragment):
    sock = await connect()
    await sock.send_text(text)
    reply = await sock.recv()
    assert reply["msg_type"] == MsgType.ERROR and reply["code"] == Code.BAD_REQUEST
    assert fragment in reply["msg"], reply["msg"]
    assert "Traceback" not in reply["msg"]
    assert (await sock.request("heartbeat"))["code"] == 200


async def test_error_reply_echoes_seq_when_it_is_valid(connect):
    sock = await connect()
    await sock.send_text('{"action": "dance", "seq": 99}')
    assert (await sock.recv())["seq"] == 99


async def test_binary_frame_is_refused(connect):
    sock = await connect()
    await sock.communicator.send_to(bytes_data=b"\x00\x01")
    reply = await sock.recv()
    assert reply["code"] == Code.BAD_REQUEST and "binary" in reply["msg"]


async def test_frame_over_64_kib_gets_413_and_socket_stays_open(connect):
    sock = await connect()
    await sock.send_text(json.dumps({"action": "heartbeat", "pad": "x" * (64 * 1024)}))
    reply = await sock.recv()
    assert reply["code"] == Code.TOO_LARGE
    assert (await sock.request("heartbeat"))["code"] == 200


async def test_multibyte_frame_over_64_kib_in_bytes_gets_413(connect):
    sock = await connect()
    await sock.send_text(json.dumps({"action": "heartbeat", "pad": "é" * 40000}, ensure_ascii=False))
    assert (await sock.recv())["code"] == Code.TOO_LARGE


async def test_flood_of_frames_gets_429_and_socket_recovers(connect, settings):
    settings.PUSH_FRAME_BURST = 5
    settings.PUSH_FRAME_RATE = 5
    sock = await connect()
    for _ in range(10):
        await sock.send("heartbeat")
    replies = [await sock.recv() for _ in range(10)]
    codes = [reply["code"] for reply in replies]
    assert codes.count(200) >= 5 and codes.count(Code.TOO_MANY) >= 4
    assert codes[:5] == [200] * 5
    assert [reply["seq"] for reply in replies] == list(range(1, 11))
    await asyncio.sleep(0.5)
    assert (await sock.request("heartbeat"))["code"] == 200


async def test_idle_socket_is_kicked_with_4000(connect, settings, verifier, new_uid):
    settings.PUSH_IDLE_TIMEOUT = 1
    uid = new_uid()
    sock = await connect()
    await sock.login(f"key-{uid}")
    kick = await sock.recv(timeout=4)
    assert kick["msg_type"] == MsgType.KICK and kick["code"] == CloseCode.IDLE_TIMEOUT
    closed = await sock.close_frame()
    assert closed == {"type": "websocket.close", "code": CloseCode.IDLE_TIMEOUT}
    assert await relation_rows(uid) == []
    assert uid not in get_hub().users


async def test_frames_keep_a_socket_alive(connect, settings):
    settings.PUSH_IDLE_TIMEOUT = 1
    sock = await connect()
    for _ in range(6):
        await asyncio.sleep(0.3)
        assert (await sock.request("heartbeat"))["code"] == 200


async def test_connection_limit_kicks_with_503_and_closes_1013(connect, settings):
    settings.PUSH_MAX_CONNECTIONS = 2
    await connect()
    await connect()
    third = await connect()
    kick = await third.recv()
    assert kick["msg_type"] == MsgType.KICK and kick["code"] == Code.UNAVAILABLE
    assert await third.close_frame() == {"type": "websocket.close", "code": CloseCode.TRY_AGAIN_LATER}
    assert len(get_hub().sockets) == 2


async def test_hub_housekeeping_stops_when_the_last_socket_closes(connect):
    sock = await connect()
    await sock.request("heartbeat")
    hub = get_hub()
    assert hub._tasks
    await sock.communicator.disconnect()
    assert hub._tasks == [] and hub.sockets == {}


async def test_a_login_past_the_sockets_per_user_kicks_the_oldest_socket(connect, verifier, settings, new_uid):
    settings.PUSH_MAX_SOCKETS_PER_USER = 2
    uid = new_uid()
    first = await connect()
    await first.login(f"key-{uid}")
    second = await connect()
    await second.login(f"key-{uid}")
    third = await connect()
    reply = await third.login(f"key-{uid}")
    assert reply["msg_type"] == MsgType.LOGIN and reply["code"] == 200, reply
    kick = await first.recv()
    assert kick["msg_type"] == MsgType.KICK and kick["code"] == CloseCode.SUPERSEDED, kick
    assert (await first.close_frame())["code"] == CloseCode.SUPERSEDED
    assert len(await relation_rows(uid)) == 2
    assert (await second.request("heartbeat"))["uid"] == uid
    assert (await third.request("heartbeat"))["uid"] == uid
