"""GET /metrics over real daphne (PROTOCOL.md section 7): every metric of the contract, by name, moving as it should.

Runs in both configurations: the daphne under test has its own SQLite file
embedded, and the test's MariaDB and Redis in the real one. The API node and
worker metrics need Redis (tests/deploy/test_prometheus.py).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pytest
import websockets
from django.conf import settings

from notifications.client import PushClient
from tests.conftest import VERIFY_TOKEN
from tests.scrape import CONTRACT_METRICS, fetch, scrape
from tests.servers import configuration_environment, daphne_with, free_port, prepare_server_database

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

METRICS_TOKEN = "metrics-test-token-0123456789"


@pytest.fixture
def node(verify_server):
    env = configuration_environment(
        Path(tempfile.mkdtemp(prefix="pushsite-metrics-")), verify_url=verify_server.url, verify_token=VERIFY_TOKEN
    )
    env.update(
        {
            "PUSH_JOBS": "inline",
            "PUSH_API_SECRET": settings.PUSH_API_SECRET,
            "PUSH_METRICS_TOKEN": METRICS_TOKEN,
            "PUSH_REDIS_PREFIX": f"metrics-{settings.PUSH_REDIS_PREFIX}",
        }
    )
    prepare_server_database(env)
    server = daphne_with("daphne-metrics", env)
    server.start()
    yield server
    server.stop()


async def login(ws, key: str) -> dict:
    await ws.send(json.dumps({"action": "login", "body": {"ukey": key}, "seq": 1}))
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait for a scrape to show what the test did (sockets leave after their close)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "the metrics never showed it"
        await asyncio.sleep(0.1)


def test_every_metric_of_the_contract_is_there_from_the_start(node):
    samples = scrape(node.port)
    assert set(CONTRACT_METRICS) <= samples.names()
    assert samples.value("pushsite_sockets") == 0
    for result in ("ok", "refused", "error", "overloaded"):
        assert ("pushsite_logins_total", (("result", result),)) in samples
    for backend in ("mysql", "redis", "verify"):
        assert ("pushsite_backend_errors_total", (("backend", backend),)) in samples


async def test_sockets_logins_frames_api_and_store_move_as_they_should(node, new_uid):
    uid = new_uid()
    before = scrape(node.port)
    url = f"ws://127.0.0.1:{node.port}/ws/push/"
    user, stranger, broken = [await websockets.connect(url) for _ in range(3)]
    assert (await login(user, f"key-{uid}"))["code"] == 200
    assert (await login(stranger, "nobody-knows-this-key"))["code"] != 200
    assert (await login(broken, "error"))["code"] == 503  # the verifier answers 500

    samples = scrape(node.port)
    assert samples.value("pushsite_sockets") == 3
    assert samples.value("pushsite_sockets_logged_in") == 1
    for result, moved in (("ok", 1), ("refused", 1), ("error", 1), ("overloaded", 0)):
        assert (
            samples.value("pushsite_logins_total", result=result) - before.value("pushsite_logins_total", result=result)
            == moved
        ), result
    assert (
        samples.value("pushsite_backend_errors_total", backend="verify")
        - before.value("pushsite_backend_errors_total", backend="verify")
        == 1
    )

    client = PushClient(f"http://127.0.0.1:{node.port}", secret=settings.PUSH_API_SECRET, timeout=10)
    for n in range(3):
        await asyncio.to_thread(client.user_message, [uid], {"n": n})
    for n in range(3):
        assert json.loads(await asyncio.wait_for(user.recv(), 10))["body"]["n"] == n

    after = scrape(node.port)
    path = "/api/notice/userMessage"

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("pushsite_frames_sent_total", msg_type="user_notice") == 3
    assert moved("pushsite_frames_sent_total", msg_type="comment") == 0
    assert moved("pushsite_messages_stored_total", msg_type="user_notice") == 3
    assert moved("pushsite_api_requests_total", path=path, code="200") == 3
    assert moved("pushsite_api_request_duration_seconds_count", path=path) == 3
    assert moved("pushsite_api_request_duration_seconds_bucket", path=path, le="+Inf") == 3
    assert after.value("pushsite_api_request_duration_seconds_sum", path=path) > 0
    assert moved("pushsite_bus_messages_total") == 3

    # A refused request is counted under its own code; nothing is stored for it.
    bad = await asyncio.to_thread(fetch_status, node.port, path)
    assert bad == 401
    later = scrape(node.port)
    assert (
        later.value("pushsite_api_requests_total", path=path, code="401")
        - before.value("pushsite_api_requests_total", path=path, code="401")
        == 1
    )
    assert later.value("pushsite_messages_stored_total", msg_type="user_notice") == after.value(
        "pushsite_messages_stored_total", msg_type="user_notice"
    )

    for ws in (user, stranger, broken):
        await ws.close()
    await until(lambda: scrape(node.port).value("pushsite_sockets") == 0)
    assert scrape(node.port).value("pushsite_sockets_logged_in") == 0


def fetch_status(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_client_forwarded_by_a_proxy_is_refused_and_the_token_lets_it_in(node):
    # What nginx on this machine sends for a public client: the peer is loopback
    # (a trusted proxy), the client is the address it forwards.
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    assert fetch(node.port, headers=forwarded)[0] == 403
    assert fetch(node.port, headers={**forwarded, "Authorization": "Bearer wrong-token"})[0] == 403
    status, text = fetch(node.port, headers={**forwarded, "Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200 and "pushsite_sockets" in text
    # Loopback itself needs no token.
    assert fetch(node.port)[0] == 200


def test_a_forged_forwarded_header_from_loopback_reaches_loopback_only_if_it_names_loopback(node):
    # The header is believed from a trusted peer, so naming loopback is allowed:
    # the peer is on loopback already and could read the metrics anyway.
    assert fetch(node.port, headers={"X-Forwarded-For": "127.0.0.1"})[0] == 200
    assert fetch(node.port, headers={"X-Forwarded-For": "127.0.0.1, 198.51.100.1"})[0] == 403


def exported_names() -> set[str]:
    """Every series name this process's registry can export (histograms with their suffixes)."""
    from prometheus_client import REGISTRY

    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("pushsite_"):
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
            if family.type == "counter":
                names.add(f"{family.name}_total")
    return names


def test_the_dashboard_and_the_alerts_name_only_metrics_that_exist():
    import re

    import notifications.views  # noqa: F401 (creates the route series)
    from tests.servers import ROOT

    dashboard = json.loads((ROOT / "deploy/grafana/pushsite.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs.append((ROOT / "deploy/prometheus/alerts.yml").read_text())
    named = {name for expr in exprs for name in re.findall(r"\bpushsite_[a-z_]+", expr)}
    assert named, "no metric named at all"
    assert named <= exported_names(), named - exported_names()
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Sockets per node", "Logins/s by result", "Frames/s", "Push API latency", "Backend errors/s"):
        assert wanted in titles


async def test_push_status_and_the_admin_show_the_numbers_the_node_exports(node, new_uid, settings, admin_client):
    from io import StringIO

    from asgiref.sync import sync_to_async
    from django.core.management import call_command

    url = f"ws://127.0.0.1:{node.port}/ws/push/"
    sockets = [await websockets.connect(url) for _ in range(2)]
    try:
        assert (await login(sockets[0], f"key-{new_uid()}"))["code"] == 200
        dead = f"127.0.0.1:{free_port()}"
        out = StringIO()
        await sync_to_async(call_command)(
            "push_status", "--json", f"--metrics=127.0.0.1:{node.port},{dead}", stdout=out
        )
        rows = json.loads(out.getvalue())["metrics"]
        exported = scrape(node.port)
        assert rows[0]["error"] is None
        assert rows[0]["sockets"] == exported.value("pushsite_sockets") == 2
        assert rows[0]["logged_in"] == exported.value("pushsite_sockets_logged_in") == 1
        assert rows[0]["logins_ok"] == exported.value("pushsite_logins_total", result="ok")
        assert rows[1]["target"] == dead and rows[1]["error"]

        settings.PUSH_METRICS_TARGETS = [f"127.0.0.1:{node.port}"]
        page = await sync_to_async(admin_client.get)("/admin/connections/node/")
        assert page.status_code == 200
        assert page.context["process_metrics"][0]["sockets"] == 2
        assert b'<td class="sockets">2</td>' in page.content
    finally:
        for ws in sockets:
            await ws.close()
