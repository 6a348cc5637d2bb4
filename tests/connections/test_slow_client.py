"""A client that does not read: the others are not delayed, server memory stays bounded.

Real daphne, real sockets: the slow client has a tiny receive buffer and
never reads, while pushes of 15 KB each flow to it and to a normal client.
Such a client that then sends its close frame leaves a socket whose close
has begun: what is pushed to it is dropped and counted (reason "closed").
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
from pathlib import Path

import pytest
import websockets
from django.conf import settings

from notifications.client import PushClient
from tests.conftest import VERIFY_TOKEN
from tests.scrape import scrape
from tests.servers import configuration_environment, daphne_with, prepare_server_database

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# 500 x 15 KB = 7.5 MB for the slow client: more than the kernel's socket
# buffers take (up to 4 MiB send plus the receiver's), so the rest would wait
# in the server process.
PUSHES = 500
PAD = 15000
PENDING_LIMIT = 256 * 1024


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(verify_server):
    env = configuration_environment(
        Path(tempfile.mkdtemp(prefix="pushsite-slow-")), verify_url=verify_server.url, verify_token=VERIFY_TOKEN
    )
    env.update({"PUSH_JOBS": "inline", "PUSH_MAX_PENDING_BYTES": str(PENDING_LIMIT), "PUSH_REDIS_PREFIX": "slowtest"})
    env["PUSH_API_SECRET"] = settings.PUSH_API_SECRET
    prepare_server_database(env)
    node = daphne_with("daphne-slow", env)
    node.start()
    yield node
    node.stop()


async def login(ws, uid: int) -> None:
    await ws.send(json.dumps({"action": "login", "body": {"ukey": f"key-{uid}"}, "seq": 1}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["code"] == 200


async def drain(ws) -> None:
    """Read until the connection ends."""
    while True:
        await asyncio.wait_for(ws.recv(), 10)


async def test_a_client_that_does_not_read_is_dropped_and_delays_nobody(server, new_uid):
    fast_uid, slow_uid = new_uid(), new_uid()
    url = f"ws://127.0.0.1:{server.port}/ws/push/"
    fast = await websockets.connect(url, max_queue=None)
    await login(fast, fast_uid)

    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    # max_queue=1: once one frame waits unread, the client stops reading the socket.
    slow = await websockets.connect(url, sock=raw, max_queue=1)
    await login(slow, slow_uid)

    api = PushClient(f"http://127.0.0.1:{server.port}", secret=settings.PUSH_API_SECRET, timeout=15)
    rss_before = rss_kib(server.proc.pid)
    body = {"pad": "x" * PAD}

    async def pusher() -> None:
        for n in range(PUSHES):
            await asyncio.to_thread(api.user_message, [slow_uid, fast_uid], {**body, "n": n})

    async def reader() -> list[int]:
        seen = []
        while len(seen) < PUSHES:
            frame = json.loads(await asyncio.wait_for(fast.recv(), 30))
            seen.append(frame["body"]["n"])
        return seen

    _, seen = await asyncio.gather(pusher(), reader())
    assert seen == list(range(PUSHES))  # every frame, in order, to the client that reads

    # The slow client was cut off rather than buffered without end.
    assert "does not read" in server.log.read_text()
    assert scrape(server.port).value("pushsite_frames_dropped_total", reason="slow_client") >= 1
    with pytest.raises(websockets.ConnectionClosed):
        await drain(slow)
    # Held for it unbounded, a few MiB would stay in the process; with the limit
    # the growth is what serving 500 requests costs.
    assert rss_kib(server.proc.pid) - rss_before < 32 * 1024
    await fast.close()


# A masked client close frame, code 1000 (RFC 6455 5.5.1): written to the raw
# socket by hand, because a client library closing would read the frames first.
CLOSE_1000 = bytes([0x88, 0x82, 1, 2, 3, 4]) + bytes(b ^ m for b, m in zip((0x03, 0xE8), (1, 2), strict=True))


@pytest.fixture
def roomy_server(verify_server):
    """A daphne that holds up to 256 MiB for a client that does not read (so it never drops one)."""
    env = configuration_environment(
        Path(tempfile.mkdtemp(prefix="pushsite-closing-")), verify_url=verify_server.url, verify_token=VERIFY_TOKEN
    )
    env.update({"PUSH_JOBS": "inline", "PUSH_MAX_PENDING_BYTES": str(256 * 1024 * 1024)})
    env.update({"PUSH_REDIS_PREFIX": "closingtest", "PUSH_API_SECRET": settings.PUSH_API_SECRET})
    prepare_server_database(env)
    node = daphne_with("daphne-closing", env)
    node.start()
    yield node
    node.stop()


async def test_a_frame_to_a_socket_whose_close_has_begun_is_dropped_and_counted(roomy_server, new_uid):
    # The client sends its close frame while the server still holds frames it
    # has not read: the close handshake has begun, but the server cannot finish
    # it (its close reply waits behind those frames), so the socket is still
    # the user's. A push to it now cannot arrive: dropped, reason "closed".
    server, uid = roomy_server, new_uid()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    slow = await websockets.connect(f"ws://127.0.0.1:{server.port}/ws/push/", sock=raw, max_queue=1)
    await login(slow, uid)
    api = PushClient(f"http://127.0.0.1:{server.port}", secret=settings.PUSH_API_SECRET, timeout=15)
    pad = {"pad": "x" * PAD}
    # 9 MB: more than the kernel's buffers on both sides (4 MiB send, and the
    # client's 4 KiB), so the rest waits in the server.
    for first in range(0, 600, 8):
        await asyncio.gather(
            *(asyncio.to_thread(api.user_message, [uid], {**pad, "n": n}) for n in range(first, first + 8))
        )

    def dropped() -> float:
        return scrape(server.port).value("pushsite_frames_dropped_total", reason="closed")

    assert dropped() == 0
    raw.send(CLOSE_1000)
    for _ in range(100):  # until the server has read the close frame
        answer = await asyncio.to_thread(api.user_message, [uid], {"after": "close"})
        assert answer["data"]["stored"] == 1  # stored all the same: unread for the next login
        if dropped():
            break
        await asyncio.sleep(0.1)
    assert dropped() == 1
    await asyncio.to_thread(api.user_message, [uid], {"after": "close", "again": True})
    assert dropped() == 2  # one more push, one more frame dropped: one socket
    assert scrape(server.port).value("pushsite_frames_dropped_total", reason="slow_client") == 0
    raw.close()
