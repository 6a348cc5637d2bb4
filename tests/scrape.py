"""Reading a process's GET /metrics in tests, with prometheus_client's own parser."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

CONTRACT_METRICS = (
    "pushsite_sockets",
    "pushsite_sockets_logged_in",
    "pushsite_logins_total",
    "pushsite_frames_sent_total",
    "pushsite_frames_dropped_total",
    "pushsite_bus_messages_total",
    "pushsite_api_requests_total",
    "pushsite_api_request_duration_seconds_bucket",
    "pushsite_api_request_duration_seconds_count",
    "pushsite_messages_stored_total",
    "pushsite_backend_errors_total",
    "pushsite_jobs_total",
)


class Samples(dict):
    """(name, sorted label items) -> value."""

    def value(self, name: str, **labels: str) -> float:
        return self.get((name, tuple(sorted(labels.items()))), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self}


def fetch(port: int, *, headers: dict[str, str] | None = None, host: str = "127.0.0.1") -> tuple[int, str]:
    request = urllib.request.Request(f"http://{host}:{port}/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int, **kwargs: object) -> Samples:
    status, text = fetch(port, **kwargs)  # type: ignore[arg-type]
    assert status == 200, (status, text)
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
