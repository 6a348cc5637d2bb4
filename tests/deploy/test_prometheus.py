"""A real Prometheus (Debian's) with the shipped configuration scrapes two daphne nodes, an API node and a worker.

deploy/prometheus/ is used as shipped, but for its targets (written here,
file service discovery) and a 1 s scrape interval. promtool checks the
configuration and the alert rules, and runs the rules' unit tests
(deploy/prometheus/alerts_test.yml).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from notifications.client import PushClient
from tests.servers import ROOT, ServerProcess, api_node, celery_worker, daphne, free_port, open_socket

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SHIPPED = ROOT / "deploy/prometheus"


def require(tool: str) -> None:
    if not os.path.exists(tool):
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is needed (scripts/setup.sh --dev installs Debian's prometheus)")
        pytest.skip(f"{tool} not installed (scripts/setup.sh --dev installs Debian's prometheus)")


@pytest.mark.parametrize(
    "args",
    [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]],
    ids=["config", "rules", "rule-tests"],
)
def test_promtool_accepts_the_shipped_configuration(args):
    require(PROMTOOL)
    done = subprocess.run([PROMTOOL, *args], cwd=SHIPPED, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def prometheus_dir(targets: dict[str, list[int]]) -> Path:
    """The shipped configuration, with these ports as targets and a 1 s scrape interval."""
    directory = Path(tempfile.mkdtemp(prefix="pushsite-prometheus-"))
    shutil.copytree(SHIPPED, directory / "conf")
    config = directory / "conf/prometheus.yml"
    text = config.read_text()
    assert "scrape_interval: 15s" in text and "evaluation_interval: 15s" in text
    config.write_text(text.replace("interval: 15s", "interval: 1s"))
    for name, ports in targets.items():
        path = directory / "conf/targets" / f"{name}.json"
        assert path.exists(), f"the shipped configuration has no targets/{name}.json"
        path.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}" for port in ports]}]))
    return directory


class Prometheus(ServerProcess):
    def ready(self) -> bool:
        """Prometheus listens before it can answer queries (503 until its storage is open): wait for /-/ready."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:  # refused, or urllib's HTTPError for the 503 of a starting server
            return False

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def until(self, expr: str, expected: float, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = await asyncio.to_thread(self.value, expr)
            if seen == expected:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"{expr} = {seen}, expected {expected}")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not settings.REDIS_URL, reason="nodes, API node and worker share a bus only through Redis")
async def test_prometheus_sees_the_sockets_and_the_pushes_of_the_whole_service(verifier, new_uid):
    require(PROMETHEUS)
    prefix = f"prom-{uuid.uuid4().hex[:8]}"
    common = {"PUSH_REDIS_PREFIX": prefix, "PUSH_JOBS": "celery"}
    node_a = daphne("prom-node-a", PUSH_NODE_ID=f"a-{prefix}", **common)
    node_b = daphne("prom-node-b", PUSH_NODE_ID=f"b-{prefix}", **common)
    api = api_node("prom-api", PUSH_NODE_ID=f"api-{prefix}", **common)
    worker_port = free_port()
    worker = celery_worker("prom-worker", PUSH_METRICS_PORT=worker_port, **common)
    directory = prometheus_dir({"nodes": [node_a.port, node_b.port], "api": [api.port], "workers": [worker_port]})
    prometheus = Prometheus(
        "prometheus",
        [PROMETHEUS, f"--config.file={directory / 'conf/prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{(port := free_port())}"],
        dict(os.environ),
        port=port,
    )  # fmt: skip
    started = [node_a, node_b, api, worker, prometheus]
    sockets = []
    try:
        for process in started:
            process.start()
        await prometheus.until('count(up{job=~"pushsite-.*"} == 1)', 4)

        uids = [new_uid() for _ in range(5)]
        sockets = [await open_socket(node_a, uid) for uid in uids[:3]]
        sockets += [await open_socket(node_b, uid) for uid in uids[3:]]
        await prometheus.until("sum(pushsite_sockets)", 5)
        await prometheus.until("sum(pushsite_sockets_logged_in)", 5)
        await prometheus.until('sum(pushsite_logins_total{result="ok"})', 5)

        client = PushClient(f"http://127.0.0.1:{api.port}", secret=settings.PUSH_API_SECRET, timeout=15)
        for n in range(4):
            await asyncio.to_thread(client.user_message, [uids[0]], {"n": n})
        for _ in range(4):
            json.loads(await asyncio.wait_for(sockets[0].recv(), 10))
        path = "/api/notice/userMessage"
        await prometheus.until(f'sum(pushsite_api_requests_total{{job="pushsite-api",path="{path}",code="200"}})', 4)
        await prometheus.until(
            f'sum(pushsite_api_request_duration_seconds_count{{job="pushsite-api",path="{path}"}})', 4
        )
        await prometheus.until('sum(pushsite_messages_stored_total{job="pushsite-api",msg_type="user_notice"})', 4)
        await prometheus.until('sum(pushsite_frames_sent_total{job="pushsite-node",msg_type="user_notice"})', 4)

        # 150 uids: a job, which the worker stores and publishes.
        many = [new_uid() for _ in range(150)]
        answer = await asyncio.to_thread(client.user_message, many, {"job": True})
        assert answer["data"]["job_id"], answer
        await prometheus.until('sum(pushsite_jobs_total{job="pushsite-worker",state="done"})', 1)
        await prometheus.until('sum(pushsite_messages_stored_total{job="pushsite-worker"})', 150)

        for ws in sockets[3:]:
            await ws.close()
        await prometheus.until("sum(pushsite_sockets)", 3)
    finally:
        for ws in sockets:
            await ws.close()
        for process in reversed(started):
            process.stop()
