"""The benchmark at smoke size, so it keeps working (correctness only, no timings)."""

from __future__ import annotations

import json

import pytest
from django.conf import settings

from tests.bench.runner import ROOT, run_bench

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not settings.REDIS_URL, reason="the benchmark runs the real service (MariaDB and Redis)"),
]


def test_benchmark_smoke_run_completes_without_losing_messages(tmp_path):
    run_bench("run.py", "--smoke", "--out", "smoke", timeout=300)
    result = json.loads((ROOT / "bench/results/smoke.json").read_text())
    paths = {row["path"] for row in result["fanout"]}
    assert paths == {"reference", "hub", "layer"}
    for row in result["fanout"]:
        assert row["received"] == row["expected"] and row["logins_per_s"] > 0
    assert [(row["api"], row["keyed"]) for row in result["latency"]] == [
        ("daphne", False),
        ("uvicorn", False),
        ("uvicorn", True),
    ]
    for row in result["latency"]:
        assert row["received"] == row["api_2xx"] == row["pushes"], row
    assert result["storage"]["rows"] == result["storage"]["users"]
    # The two-node case: a push to node A's users reaches node B's bus not at all.
    nodes = result["nodes"]
    assert nodes["sockets"] == 50 and nodes["lost"] == 0 and nodes["received"] == nodes["expected"] > 0
    assert nodes["bus_per_push"] == {"node_a": 1.0, "node_b": 0.0}
    table = (ROOT / "bench/results/smoke.md").read_text()
    assert "| hub |" in table and "| per personal push (users on A) | 1.0 | 0.0 |" in table


def test_idempotency_benchmark_runs_each_push_once(tmp_path):
    run_bench("idempotency.py", "--pushes", "50", "--out", "idempotency-smoke", timeout=300)
    rows = json.loads((ROOT / "bench/results/idempotency-smoke.json").read_text())["idempotency"]
    assert [row["case"] for row in rows] == ["first", "replay", "conflict"]
    assert all(row["calls"] == 50 and row["p99_ms"] >= row["p50_ms"] > 0 for row in rows)


def test_two_node_benchmark_shows_a_push_reaching_only_its_users_node(tmp_path):
    run_bench("nodes.py", "--sockets", "40", "--pushes", "20", "--broadcasts", "2", timeout=300)
    row = json.loads((ROOT / "bench/results/nodes.json").read_text())
    assert row["received"] == row["expected"] == 20 + 40 * 2 and row["lost"] == 0
    assert row["bus_per_push"] == {"node_a": 1.0, "node_b": 0.0}
    # 20 users per node: one chunk each, so one bus message per node per broadcast.
    assert row["bus_per_broadcast"] == {"node_a": 1.0, "node_b": 1.0}
