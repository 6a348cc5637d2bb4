"""Two daphne nodes and an API node behind the shipped nginx site, over wss with a self-signed certificate.

The push API goes through nginx's /api/ to the API node (uvicorn). Delivery
crosses nodes, and when one node is killed its relation rows are cleared by
the survivor and its clients reconnect through nginx to the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings

from connections.models import Connection
from notifications.client import PushClient
from tests.servers import ROOT, ServerProcess, api_node, daphne, free_port

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not settings.REDIS_URL, reason="nodes share a bus only through Redis"),
]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def require_tools() -> None:
    missing = [tool for tool in (NGINX, shutil.which("openssl")) if not tool or not os.path.exists(tool)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail("nginx and openssl are needed (scripts/setup.sh --dev installs them)")
        pytest.skip("nginx or openssl not installed (scripts/setup.sh --dev installs them)")


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def site_config(nodes: list[int], api_nodes: list[int], https_port: int, http_port: int, cert: Path, key: Path) -> str:
    """The shipped site with this test's ports, certificate and no IPv6."""
    site = (ROOT / "deploy/nginx/pushsite.conf").read_text()
    servers = "\n".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;" for port in nodes)
    site = re.sub(r"(upstream pushsite_nodes \{\n    ip_hash;\n)(?:    server .*\n)+", rf"\g<1>{servers}\n", site)
    servers = "\n".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;" for port in api_nodes)
    site = re.sub(r"(upstream pushsite_api \{\n)(?:    server .*\n)+", rf"\g<1>{servers}\n", site)
    site = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", site)
    site = site.replace("listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl").replace(
        "listen 80;", f"listen 127.0.0.1:{http_port};"
    )
    site = site.replace("/etc/ssl/pushsite/fullchain.pem", str(cert)).replace("/etc/ssl/pushsite/privkey.pem", str(key))
    assert f"server 127.0.0.1:{nodes[1]}" in site and f"server 127.0.0.1:{api_nodes[0]}" in site and str(cert) in site
    return site


class Nginx(ServerProcess):
    pass


def start_nginx(prefix: Path, site: str, port: int) -> Nginx:
    (prefix / "site.conf").write_text(site)
    (prefix / "nginx.conf").write_text(
        f"""
daemon off;
worker_processes 1;
{"user root;" if os.geteuid() == 0 else ""}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/site.conf;
}}
"""
    )
    proc = Nginx("nginx", [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], dict(os.environ), port=port)
    return proc.start()


@pytest.fixture
def cluster(verifier):
    require_tools()
    work = Path(tempfile.mkdtemp(prefix="pushsite-nginx-"))
    cert, key = self_signed(work)
    env = {"PUSH_JOBS": "inline", "PUSH_NODE_HEARTBEAT": 1, "PUSH_NODE_DEAD_AFTER": 3}
    nodes = [daphne("node-a", PUSH_NODE_ID="node-a", **env), daphne("node-b", PUSH_NODE_ID="node-b", **env)]
    api = api_node("api", PUSH_NODE_ID="api", **env)
    https_port, http_port = free_port(), free_port()
    nginx = None
    try:
        for node in nodes:
            node.start()
        api.start()
        site = site_config([n.port for n in nodes], [api.port], https_port, http_port, cert, key)
        nginx = start_nginx(work, site, https_port)
        tls = ssl.create_default_context(cafile=str(cert))
        yield {"nodes": nodes, "port": https_port, "tls": tls}
    finally:
        if nginx is not None:
            nginx.stop()
        api.stop()
        for node in nodes:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)


async def wss_login(cluster: dict[str, Any], uid: int, source: str) -> Any:
    ws = await websockets.connect(
        f"wss://127.0.0.1:{cluster['port']}/ws/push/", ssl=cluster["tls"], local_addr=(source, 0), open_timeout=10
    )
    await ws.send(json.dumps({"action": "login", "body": {"ukey": f"key-{uid}"}, "seq": 1}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert reply["code"] == 200, reply
    return ws


async def frame(ws: Any, timeout: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


@database_sync_to_async
def node_of(uid: int) -> str | None:
    return Connection.objects.filter(uid=uid).values_list("node", flat=True).first()


@database_sync_to_async
def rows_on(node: str) -> int:
    return Connection.objects.filter(node=node).count()


async def test_two_nodes_behind_nginx_over_wss_deliver_and_recover(cluster, new_uid):
    api = PushClient(
        f"https://127.0.0.1:{cluster['port']}", secret=settings.PUSH_API_SECRET, ssl_context=cluster["tls"]
    )
    # ip_hash looks at the first three octets: spread clients over 127.0.N.1
    # until both nodes have some.
    clients: dict[str, list[tuple[int, str, Any]]] = {"node-a": [], "node-b": []}
    for n in range(1, 40):
        uid, source = new_uid(), f"127.0.{n}.1"
        ws = await wss_login(cluster, uid, source)
        clients[await node_of(uid)].append((uid, source, ws))
        if all(len(v) >= 2 for v in clients.values()):
            break
    assert all(clients.values()), "ip_hash sent every client to one node"

    answer = await asyncio.to_thread(api.system_message, {"notice": "everyone"})
    assert answer["code"] == 202
    for uid, _, ws in clients["node-a"] + clients["node-b"]:
        assert (await frame(ws))["body"] == {"to_uid": uid, "notice": "everyone"}

    uid_b, _, ws_b = clients["node-b"][0]
    answer = await asyncio.to_thread(api.user_message, [uid_b], {"only": "b"})
    assert answer["data"]["sent"] == 1
    assert (await frame(ws_b))["body"] == {"to_uid": uid_b, "only": "b"}

    # Kill node a: no clean-up of its own; node b must clear its rows.
    cluster["nodes"][0].kill()
    for _, _, ws in clients["node-a"]:
        with pytest.raises(websockets.ConnectionClosed):
            await frame(ws, timeout=10)
    deadline = time.monotonic() + 15
    while await rows_on("node-a") and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    assert await rows_on("node-a") == 0

    # Its clients reconnect through nginx, land on node b and get what is pushed.
    back = [(uid, await wss_login(cluster, uid, source)) for uid, source, _ in clients["node-a"]]
    for uid, _ in back:
        assert await node_of(uid) == "node-b"
    answer = await asyncio.to_thread(api.user_message, [uid for uid, _ in back], {"after": "failover"})
    assert answer["data"]["sent"] == len(back)
    for uid, ws in back:
        # Delivery is at least once: a notice node a wrote just before it died,
        # but had not yet marked sent, is replayed at the new login. Only such
        # repeats may come before the new push.
        got = await frame(ws)
        while got["body"].get("after") is None:
            assert got["body"] == {"to_uid": uid, "notice": "everyone"}, got
            got = await frame(ws)
        assert got["body"] == {"to_uid": uid, "after": "failover"}
    for ws in [ws for _, ws in back] + [ws for _, _, ws in clients["node-b"]]:
        await ws.close()


def status_of(url: str, tls: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10, context=tls) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_nginx_does_not_expose_metrics_that_each_node_serves_on_its_own_port(cluster):
    # The nodes answer Prometheus on their own address (loopback here)...
    for node in cluster["nodes"]:
        assert status_of(f"http://127.0.0.1:{node.port}/metrics") == 200
    # ...and the public side does not pass it on, whatever the path's spelling.
    public = f"https://127.0.0.1:{cluster['port']}"
    assert status_of(f"{public}/metrics", cluster["tls"]) == 404
    assert status_of(f"{public}/metrics?x=1", cluster["tls"]) == 404
    # A spelling nginx passes on reaches a node as a forwarded public client: refused, never the numbers.
    assert status_of(f"{public}/metrics/", cluster["tls"]) in {403, 404}
    assert status_of(f"{public}/api/push/config", cluster["tls"]) == 200  # the site itself is served
