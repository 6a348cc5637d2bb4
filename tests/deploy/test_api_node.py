"""An API node (uvicorn + httptools, ``--ws none``) beside a daphne node, as deployed.

The push API on an API node stores the push and publishes it on the Redis bus;
the frame arrives on the daphne node's socket. The API node answers the
contract's codes itself, serves Django's other pages, and refuses a WebSocket
handshake (deploy/README.md, docs/performance.md "Choice of server").

Real configuration only: the embedded in-process bus cannot reach another process.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings

from notifications.client import PushClient, PushError
from notifications.sharding import model_for_uid
from notifications.signing import signed_headers
from tests.servers import api_node, daphne, open_socket

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not settings.REDIS_URL, reason="an API node reaches daphne's sockets only through Redis"),
]


@pytest.fixture
def nodes(verifier):
    env = {"PUSH_JOBS": "inline"}
    ws_node = daphne("ws-node", PUSH_NODE_ID=f"ws-{uuid.uuid4().hex[:6]}", **env)
    api = api_node("api-node", PUSH_NODE_ID=f"api-{uuid.uuid4().hex[:6]}", **env)
    try:
        ws_node.start()
        api.start()
        yield ws_node, api
    finally:
        api.stop()
        ws_node.stop()


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/notice/userMessage",
        data=body,
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@database_sync_to_async
def stored_for(uid: int) -> list[dict[str, Any]]:
    return list(model_for_uid(uid).objects.filter(to_uid=uid).values("noce_ack", "msg_type", "body", "is_sent"))


async def nothing_arrives(ws: Any, seconds: float = 1.0) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


async def test_push_to_the_api_node_is_stored_and_reaches_a_socket_on_the_daphne_node(nodes, new_uid):
    ws_node, api = nodes
    uid = new_uid()
    ws = await open_socket(ws_node, uid)
    try:
        client = PushClient(f"http://127.0.0.1:{api.port}", secret=settings.PUSH_API_SECRET)
        answer = await asyncio.to_thread(client.user_message, [uid], {"via": "api-node"})
        assert answer["code"] == 200 and answer["data"]["stored"] == 1 and answer["data"]["sent"] == 1, answer

        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert frame["msg_type"] == 7 and frame["body"] == {"to_uid": uid, "via": "api-node"}
        rows = await stored_for(uid)
        assert [(row["noce_ack"], row["msg_type"]) for row in rows] == [(answer["data"]["noce_acks"][str(uid)], 7)]
        await nothing_arrives(ws)
    finally:
        await ws.close()


async def test_api_node_refuses_a_forged_signature_and_a_malformed_body_with_the_contracts_codes(nodes, new_uid):
    ws_node, api = nodes
    uid = new_uid()
    ws = await open_socket(ws_node, uid)
    try:
        body = json.dumps({"uid": uid, "body": {"forged": True}}).encode()
        forged = {**signed_headers(settings.PUSH_API_SECRET, body), "X-Push-Signature": "0" * 64}
        status, answer = await asyncio.to_thread(post, api.port, body, forged)
        assert (status, answer["code"]) == (401, 401), answer

        broken = b'{"uid": ' + str(uid).encode()
        status, answer = await asyncio.to_thread(
            post, api.port, broken, signed_headers(settings.PUSH_API_SECRET, broken)
        )
        assert (status, answer["code"]) == (400, 400), answer

        wrong = PushClient(f"http://127.0.0.1:{api.port}", secret="not-the-secret")
        with pytest.raises(PushError) as refused:
            await asyncio.to_thread(wrong.user_message, [uid], {"forged": True})
        assert refused.value.status == 401

        await nothing_arrives(ws)
        assert await stored_for(uid) == []
    finally:
        await ws.close()


async def test_api_node_refuses_a_websocket_handshake_and_serves_djangos_other_pages(nodes):
    _ws_node, api = nodes
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{api.port}/ws/push/", open_timeout=5)
    assert refused.value.response.status_code == 421
    assert json.loads(refused.value.response.body)["code"] == 421

    status, health = await asyncio.to_thread(get, api.port, "/healthz")
    assert status == 200 and json.loads(health)["code"] == 200
    status, config = await asyncio.to_thread(get, api.port, "/api/push/config")
    assert status == 200 and json.loads(config)["heartbeat"] == 180
    status, _page = await asyncio.to_thread(get, api.port, "/admin/login/")
    assert status == 200
