"""Prometheus metrics of this process (PROTOCOL.md section 7), with prometheus_client.

Every metric of the contract is defined here, once, with its labels' known
values created at import so that a scrape shows them at 0 before they move.
Callers increment them; nothing else builds metric names.

Cost on the per-frame path: a pushed frame is counted once per bus message
group (``frames_sent(msg_type, n)``), not with one ``inc()`` per socket, and
the socket gauges are read from the hubs when scraped, not kept in step on
every join and leave (bench/README.md, "metrics").

Workers (Celery prefork) run several processes: when ``PUSH_METRICS_PORT`` is
set, pushsite/celery.py points ``PROMETHEUS_MULTIPROC_DIR`` at a directory of
its own before anything imports this module, and the worker's main process
serves the sum over its children (``serve_worker_metrics``).

Guarded by tests/test_metrics.py and tests/deploy/test_prometheus.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# A *_created series per counter child doubles what is scraped and says nothing here.
disable_created_metrics()

LOGIN_RESULTS = ("ok", "refused", "error", "overloaded")
DROP_REASONS = ("slow_client", "closed")
BACKENDS = ("mysql", "redis", "verify")
JOB_STATES = ("done", "failed", "retried")
# msg_type label values: the contract's numbers (section 2) by name.
MSG_TYPE_NAMES = {5: "comment", 6: "system_notice", 7: "user_notice"}
MSG_TYPES = tuple(MSG_TYPE_NAMES.values())

LOGINS = Counter("pushsite_logins_total", "Login attempts, by result.", ["result"])
FRAMES_SENT = Counter("pushsite_frames_sent_total", "Pushed notification frames written to sockets.", ["msg_type"])
FRAMES_DROPPED = Counter("pushsite_frames_dropped_total", "Frames not written, by reason.", ["reason"])
BUS_MESSAGES = Counter("pushsite_bus_messages_total", "Bus messages this process received.")
API_REQUESTS = Counter("pushsite_api_requests_total", "Push API requests answered.", ["path", "code"])
API_DURATION = Histogram(
    "pushsite_api_request_duration_seconds",
    "Push API answer time.",
    ["path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
MESSAGES_STORED = Counter("pushsite_messages_stored_total", "Rows written to the shard tables.", ["msg_type"])
BACKEND_ERRORS = Counter("pushsite_backend_errors_total", "Failed backend calls.", ["backend"])
JOBS = Counter("pushsite_jobs_total", "Push jobs and periodic runs, by outcome.", ["state"])
# For the "no periodic run for twice its period" alert (deploy/prometheus/alerts.yml).
PERIODIC_LAST_SUCCESS = Gauge(
    "pushsite_periodic_last_success_timestamp_seconds",
    "When a schedule's run last succeeded (Unix time).",
    ["schedule"],
    multiprocess_mode="max",
)
PERIODIC_PERIOD = Gauge(
    "pushsite_periodic_period_seconds", "A schedule's configured interval.", ["schedule"], multiprocess_mode="max"
)

for _result in LOGIN_RESULTS:
    LOGINS.labels(_result)
for _reason in DROP_REASONS:
    FRAMES_DROPPED.labels(_reason)
for _backend in BACKENDS:
    BACKEND_ERRORS.labels(_backend)
for _state in JOB_STATES:
    JOBS.labels(_state)
for _msg_type in MSG_TYPES:
    FRAMES_SENT.labels(_msg_type)
    MESSAGES_STORED.labels(_msg_type)

# Pre-bound children of the hot paths: labels() is a dict look-up under a lock.
_frames_sent = {number: FRAMES_SENT.labels(name) for number, name in MSG_TYPE_NAMES.items()}
_logins = {result: LOGINS.labels(result) for result in LOGIN_RESULTS}
_backend_errors = {backend: BACKEND_ERRORS.labels(backend) for backend in BACKENDS}


def msg_type_name(msg_type: int) -> str:
    return MSG_TYPE_NAMES.get(int(msg_type), str(msg_type))


def frames_sent(msg_type: int, n: int = 1) -> None:
    """n frames of one msg_type written (count a bus message's frames, then call once)."""
    if n:
        child = _frames_sent.get(msg_type) or FRAMES_SENT.labels(msg_type_name(msg_type))
        child.inc(n)


def frame_dropped(reason: str) -> None:
    FRAMES_DROPPED.labels(reason).inc()


def login(result: str, n: int = 1) -> None:
    _logins[result].inc(n)


def backend_error(backend: str) -> None:
    _backend_errors[backend].inc()


def messages_stored(msg_type: int, n: int) -> None:
    if n:
        MESSAGES_STORED.labels(msg_type_name(msg_type)).inc(n)


def job(state: str) -> None:
    JOBS.labels(state).inc()


def periodic_succeeded(schedule: str, every: float) -> None:
    PERIODIC_LAST_SUCCESS.labels(schedule).set_to_current_time()
    PERIODIC_PERIOD.labels(schedule).set(every)


# --- socket gauges, read from whoever holds the sockets ------------------------

# name -> callable returning (open sockets, logged in); connections.hub registers one.
_socket_sources: dict[str, Callable[[], tuple[int, int]]] = {}


def count_sockets_with(name: str, source: Callable[[], tuple[int, int]]) -> None:
    """Register what the socket gauges read at scrape time."""
    _socket_sources[name] = source


class SocketCollector(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily]:
        open_, logged_in = 0, 0
        for source in list(_socket_sources.values()):
            a, b = source()
            open_ += a
            logged_in += b
        yield GaugeMetricFamily("pushsite_sockets", "Open sockets of this process.", value=open_)
        yield GaugeMetricFamily(
            "pushsite_sockets_logged_in", "Open sockets of this process that are logged in.", value=logged_in
        )


if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    REGISTRY.register(SocketCollector())


def exposition() -> tuple[bytes, str]:
    """This process's metrics in the text format, and its content type."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def _registry() -> Any:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def serve_worker_metrics(port: int) -> None:
    """A worker's /metrics on ``port`` (all addresses, same access rule as the nodes), in a thread."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            from pushsite.clientaddr import resolve

            forwarded = self.headers.get_all("X-Forwarded-For") or []
            client = resolve(self.client_address[0], forwarded)
            if self.path.split("?", 1)[0] != "/metrics":
                self._answer(404, b"not found\n", "text/plain")
            elif not allowed(client, self.headers.get("Authorization", "")):
                self._answer(403, b"metrics are readable from loopback or with the metrics token\n", "text/plain")
            else:
                body, content_type = exposition()
                self._answer(200, body, content_type)

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not worth a log line

    server = ThreadingHTTPServer(("", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pushsite-metrics", daemon=True).start()


def allowed(client: str, authorization: str) -> bool:
    """The access rule of /metrics: a loopback client, or the Bearer PUSH_METRICS_TOKEN."""
    import hmac

    from django.conf import settings

    from pushsite.clientaddr import is_loopback

    token = settings.PUSH_METRICS_TOKEN
    if token and authorization.startswith("Bearer ") and hmac.compare_digest(authorization[7:].strip(), token):
        return True
    return is_loopback(client)


class MetricsApp:
    """ASGI: ``GET /metrics`` of this process, under the access rule; anything else goes to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics":
            await self.inner(scope, receive, send)
            return
        from pushsite.clientaddr import scope_client

        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        if scope["method"] not in ("GET", "HEAD"):
            status, body, content_type = 405, b"use GET\n", "text/plain"
        elif not allowed(scope_client(scope), authorization):
            status, body, content_type = (
                403,
                b"metrics are readable from loopback or with the metrics token\n",
                "text/plain",
            )
        else:
            status = 200
            body, content_type = exposition()
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


# --- what push_status and the admin show: the nodes' own numbers ---------------

# The figures a status page shows per target, from the same series Prometheus scrapes.
SUMMARY = (
    ("sockets", "pushsite_sockets", {}),
    ("logged_in", "pushsite_sockets_logged_in", {}),
    ("logins_ok", "pushsite_logins_total", {"result": "ok"}),
    ("logins_refused", "pushsite_logins_total", {"result": "refused"}),
    ("logins_overloaded", "pushsite_logins_total", {"result": "overloaded"}),
    ("frames_sent", "pushsite_frames_sent_total", None),
    ("frames_dropped", "pushsite_frames_dropped_total", None),
    ("stored", "pushsite_messages_stored_total", None),
    ("backend_errors", "pushsite_backend_errors_total", None),
)


def summarize(text: str) -> dict[str, float]:
    """The SUMMARY figures of one exposition (a label set of None: summed over all labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    figures = dict.fromkeys((name for name, _, _ in SUMMARY), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for figure, series, labels in SUMMARY:
                if sample.name == series and (
                    labels is None or all(sample.labels.get(k) == v for k, v in labels.items())
                ):
                    figures[figure] += sample.value
    return figures


def read_targets(targets: Iterable[str], *, timeout: float = 2.0) -> list[dict[str, Any]]:
    """GET /metrics of each host:port (with PUSH_METRICS_TOKEN if set); an unreachable one says why."""
    import httpx
    from django.conf import settings

    headers = {"Authorization": f"Bearer {settings.PUSH_METRICS_TOKEN}"} if settings.PUSH_METRICS_TOKEN else {}
    rows: list[dict[str, Any]] = []
    for target in targets:
        url = target if target.startswith(("http://", "https://")) else f"http://{target}/metrics"
        try:
            response = httpx.get(url, headers=headers, timeout=timeout)
            response.raise_for_status()
            rows.append({"target": target, "error": None, **summarize(response.text)})
        except (httpx.HTTPError, ValueError) as error:
            rows.append({"target": target, "error": f"{error.__class__.__name__}: {error}"[:200]})
    return rows
