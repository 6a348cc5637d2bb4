"""PUSH_LOG_FORMAT=json over real daphne: one JSON object per line, session fields, no secrets in any line."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from pathlib import Path

import pytest
import websockets
from django.conf import settings

from notifications.client import PushClient
from pushsite.logs import JsonFormatter, TextFormatter
from tests.conftest import VERIFY_TOKEN
from tests.servers import configuration_environment, daphne_with, prepare_server_database

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def record(**extra) -> logging.LogRecord:
    rec = logging.LogRecord("pushsite.test", logging.INFO, __file__, 1, "session %s", ("login",), None)
    rec.__dict__.update(extra)
    return rec


def test_the_json_format_writes_the_session_fields_as_keys():
    line = JsonFormatter().format(record(event="login", node="n1", uid=7, conn_id="n1.3"))
    entry = json.loads(line)
    assert entry["msg"] == "session login"
    assert (entry["node"], entry["uid"], entry["conn_id"], entry["level"]) == ("n1", 7, "n1.3", "INFO")
    assert "code" not in entry  # absent fields are left out, not null


def test_the_text_format_appends_them():
    line = TextFormatter("%(message)s").format(record(event="kick", uid=7, code=4001))
    assert line == "session login event=kick uid=7 code=4001"


async def test_a_json_daphne_logs_sessions_with_their_ids_and_never_a_key(verify_server, new_uid):
    env = configuration_environment(
        Path(tempfile.mkdtemp(prefix="pushsite-logs-")), verify_url=verify_server.url, verify_token=VERIFY_TOKEN
    )
    env.update(
        {
            "PUSH_JOBS": "inline",
            "PUSH_API_SECRET": settings.PUSH_API_SECRET,
            "PUSH_LOG_FORMAT": "json",
            "PUSH_NODE_ID": "logs-node",
            "PUSH_REDIS_PREFIX": f"logs-{settings.PUSH_REDIS_PREFIX}",
        }
    )
    prepare_server_database(env)
    node = daphne_with("daphne-logs", env)
    node.start()
    uid = new_uid()
    wrong_key = "wrong-key-that-must-not-be-logged"
    try:
        url = f"ws://127.0.0.1:{node.port}/ws/push/"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"action": "login", "body": {"ukey": f"key-{uid}"}, "seq": 1}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["code"] == 200
            client = PushClient(f"http://127.0.0.1:{node.port}", secret=settings.PUSH_API_SECRET, timeout=10)
            await asyncio.to_thread(client.user_message, [uid], {"n": 1})
            await asyncio.wait_for(ws.recv(), 10)
            await ws.send(json.dumps({"action": "logout", "seq": 2}))
            await asyncio.wait_for(ws.recv(), 10)
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"action": "login", "body": {"ukey": wrong_key}, "seq": 1}))
            await asyncio.wait_for(ws.recv(), 10)
        await asyncio.sleep(0.5)
    finally:
        node.stop()
    lines = [line for line in node.log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    sessions = [entry for entry in entries if entry.get("event")]
    events = [(entry["event"], entry.get("uid")) for entry in sessions]
    assert ("login", uid) in events and ("logout", uid) in events
    assert "login_refused" in [event for event, _ in events]
    for entry in sessions:
        assert entry["node"] == "logs-node" and entry["conn_id"].startswith("logs-node.")
    # Django's and pushsite's lines are all JSON once Django is set up.
    assert any(entry["logger"].startswith(("connections", "notifications", "pushsite")) for entry in entries)
    for line in lines:
        for secret in (f"key-{uid}", wrong_key, VERIFY_TOKEN, settings.PUSH_API_SECRET):
            assert secret not in line, line
