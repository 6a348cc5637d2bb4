"""wss straight from daphne, with a certificate and no proxy in front."""

from __future__ import annotations

import asyncio
import json
import ssl
import tempfile
from pathlib import Path

import pytest
import websockets
from django.conf import settings

from tests.deploy.test_nginx import require_tools, self_signed
from tests.servers import BIN, ServerProcess, free_port, server_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"),
    reason="the server process shares the test database only in the real configuration",
)
async def test_daphne_serves_wss_with_a_certificate(verifier, new_uid):
    require_tools()
    work = Path(tempfile.mkdtemp(prefix="pushsite-tls-"))
    cert, key = self_signed(work)
    port = free_port()
    endpoint = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    node = ServerProcess(
        "daphne-tls", [str(BIN / "daphne"), "-e", endpoint, "pushsite.asgi:application"], server_env(), port=port
    )
    node.start()
    try:
        tls = ssl.create_default_context(cafile=str(cert))
        uid = new_uid()
        async with websockets.connect(f"wss://127.0.0.1:{port}/ws/push/", ssl=tls) as ws:
            await ws.send(json.dumps({"action": "login", "body": {"ukey": f"key-{uid}"}, "seq": 1}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["code"] == 200 and reply["body"]["uid"] == uid
        with pytest.raises((ssl.SSLError, OSError)):
            # The same port refuses a client that does not trust the certificate.
            async with websockets.connect(f"wss://127.0.0.1:{port}/ws/push/", open_timeout=5):
                pass
    finally:
        node.stop()
