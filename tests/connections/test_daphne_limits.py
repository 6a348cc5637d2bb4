"""Abuse limits over real daphne and the real local verify server (connections/throttle.py).

Proves: a flood of distinct login keys from many sockets makes at most the
bucket's verify calls and the rest get ERROR 429 with ``retry_after``, per
address and per node; a forged X-Forwarded-For from a peer that is not a
trusted proxy changes nothing; past the anonymous-socket cap a new socket gets
KICK 429 and close 1008.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from connections.protocol import CloseCode, Code, MsgType
from tests.connections import test_daphne
from tests.connections.test_daphne import Client

# The daphne fixtures of test_daphne.py, shared rather than copied.
server_base = test_daphne.server_base
start_daphne = test_daphne.start_daphne
ws_connect = test_daphne.ws_connect

pytestmark = pytest.mark.django_db(transaction=True)

BURST = 10
# Loopback is not a trusted proxy here, so X-Forwarded-For from the test client is forged.
UNTRUSTED_LOOPBACK = {"PUSH_TRUSTED_PROXIES": "10.255.255.0/24"}


def calls_with(verify_server: Any, prefix: str) -> int:
    with verify_server.lock:
        return sum(n for key, n in verify_server.calls.items() if key.startswith(prefix))


async def flood(clients: list[Client], prefix: str, per_socket: int) -> list[dict[str, Any]]:
    """Each client tries ``per_socket`` distinct wrong keys, one after another; all replies."""

    async def one(index: int, client: Client) -> list[dict[str, Any]]:
        return [await client.login(f"{prefix}{index}-{n}") for n in range(per_socket)]

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    return [reply for replies in results for reply in replies]


def assert_throttled(replies: list[dict[str, Any]], calls: int, *, rate: float, seconds: float) -> None:
    assert calls <= BURST + rate * seconds + 1, calls
    throttled = [r for r in replies if r["code"] == Code.TOO_MANY]
    assert throttled, "nothing was throttled"
    for reply in throttled:
        assert reply["msg_type"] == MsgType.ERROR
        assert isinstance(reply["body"]["retry_after"], int) and reply["body"]["retry_after"] >= 1, reply
    # Every attempt was answered: refused by the site (401) or by the throttle (429).
    assert {r["code"] for r in replies} <= {Code.LOGIN_REFUSED, Code.TOO_MANY}


async def test_a_flood_of_distinct_keys_from_one_address_makes_at_most_the_buckets_verify_calls(
    start_daphne, ws_connect, verify_server
):
    rate = 0.01
    daphne = start_daphne(
        PUSH_LOGIN_BURST_PER_ADDRESS=str(BURST), PUSH_LOGIN_RATE_PER_ADDRESS=str(rate), **UNTRUSTED_LOOPBACK
    )
    prefix = f"guess-{uuid.uuid4().hex[:8]}-"
    started = time.monotonic()
    # Every socket claims another client address; the peer is not trusted, so none counts.
    clients = [await ws_connect(daphne, additional_headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(30)]
    replies = await flood(clients, prefix, 10)
    assert len(replies) == 300
    assert_throttled(replies, calls_with(verify_server, prefix), rate=rate, seconds=time.monotonic() - started)


async def test_a_flood_from_many_addresses_is_held_by_the_node_bucket(start_daphne, ws_connect, verify_server):
    rate = 0.01
    daphne = start_daphne(PUSH_LOGIN_BURST_PER_NODE=str(BURST), PUSH_LOGIN_RATE_PER_NODE=str(rate))
    prefix = f"guess-{uuid.uuid4().hex[:8]}-"
    started = time.monotonic()
    # Loopback is trusted by default: these are 20 real client addresses behind a proxy.
    clients = [await ws_connect(daphne, additional_headers={"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(20)]
    replies = await flood(clients, prefix, 10)
    assert_throttled(replies, calls_with(verify_server, prefix), rate=rate, seconds=time.monotonic() - started)


async def test_a_good_key_passes_until_the_bucket_is_spent_then_429_names_the_wait(
    start_daphne, ws_connect, verify_server, new_uid
):
    daphne = start_daphne(PUSH_LOGIN_BURST_PER_ADDRESS="3", PUSH_LOGIN_RATE_PER_ADDRESS="0.01", **UNTRUSTED_LOOPBACK)
    client = await ws_connect(daphne)
    prefix = f"guess-{uuid.uuid4().hex[:8]}-"
    assert (await client.login(f"{prefix}0"))["code"] == Code.LOGIN_REFUSED  # costs 2 of 3
    other = await ws_connect(daphne)
    uid = new_uid()
    assert (await other.login(f"key-{uid}"))["code"] == Code.OK  # costs the last one
    refused = await client.login(f"{prefix}1")
    assert refused["code"] == Code.TOO_MANY and refused["body"]["retry_after"] >= 1, refused
    assert calls_with(verify_server, prefix) == 1


async def test_anonymous_sockets_past_the_cap_get_kick_429_and_close_1008(start_daphne, ws_connect, new_uid):
    daphne = start_daphne(PUSH_MAX_ANONYMOUS_PER_ADDRESS="3", **UNTRUSTED_LOOPBACK)
    clients = [await ws_connect(daphne, additional_headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(3)]
    for client in clients:
        assert (await client.request("heartbeat"))["code"] == Code.OK
    extra = await ws_connect(daphne)
    kick = await extra.recv()
    assert kick["msg_type"] == MsgType.KICK and kick["code"] == Code.TOO_MANY, kick
    assert await extra.closed_with() == CloseCode.POLICY_VIOLATION
    # A socket that logs in no longer counts: a new anonymous one is taken.
    assert (await clients[0].login(f"key-{new_uid()}"))["code"] == Code.OK
    newcomer = await ws_connect(daphne)
    assert (await newcomer.request("heartbeat"))["code"] == Code.OK


async def test_the_33rd_socket_of_a_user_kicks_the_oldest(start_daphne, ws_connect, new_uid):
    daphne = start_daphne()  # PUSH_MAX_SOCKETS_PER_USER 32, the default
    uid = new_uid()
    clients = []
    for _ in range(32):
        client = await ws_connect(daphne)
        assert (await client.login(f"key-{uid}"))["code"] == Code.OK
        clients.append(client)
    newest = await ws_connect(daphne)
    reply = await newest.login(f"key-{uid}")
    assert reply["msg_type"] == MsgType.LOGIN and reply["code"] == Code.OK, reply
    kick = await clients[0].recv()
    assert kick["msg_type"] == MsgType.KICK and kick["code"] == CloseCode.SUPERSEDED, kick
    assert await clients[0].closed_with() == CloseCode.SUPERSEDED
    # Only the oldest went: every other socket, and the newest, still answer as the user.
    for client in [*clients[1:], newest]:
        assert (await client.request("heartbeat"))["uid"] == uid


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(start_daphne, ws_connect):
    daphne = start_daphne()
    client = await ws_connect(daphne)
    assert (await client.request("heartbeat"))["code"] == Code.OK
    await client.ws.send(b'{"action": "heartbeat", "x": "\xff\xfe"}', text=True)
    assert await client.closed_with() == 1007
