"""The reconnect-storm benchmark at smoke size, so it keeps working (correctness only, no timings).

bench/storm.py runs its own daphne, API node and clients on MariaDB and Redis
(a database of its own, ``pushsite_storm``), so it needs the real
configuration; in the embedded one (no DATABASE_URL) it is skipped.
"""

from __future__ import annotations

import json

import pytest
from django.conf import settings

from tests.bench.runner import ROOT, run_bench

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not settings.DATABASE_URL, reason="the benchmark runs the real service (MariaDB and Redis)"),
]


def test_storm_smoke_run_brings_every_socket_back_with_each_push_once():
    run_bench("storm.py", "--sockets", "50", "--out", "storm-smoke", timeout=120)
    rows = {row["server"]: row for row in json.loads((ROOT / "bench/results/storm-smoke.json").read_text())["storm"]}
    assert set(rows) == {"reference", "pushsite"}
    for row in rows.values():
        # Both waves completed: every socket logged in, then logged in again after the restart.
        assert row["sockets"] == 50 and row["first_wave_logins_per_s"] > 0 and row["storm_logins_per_s"] > 0, row
    pushsite = rows["pushsite"]
    assert pushsite["pushed"] == len(range(0, 50, pushsite["sample_every"])) > 0
    assert pushsite["api_errors"] == {}
    assert pushsite["received"] == pushsite["pushed"]
    assert pushsite["lost"] == pushsite["duplicated"] == pushsite["unexpected"] == 0
    assert pushsite["x_reference_storm"] > 0
    assert "| pushsite | 50 |" in (ROOT / "bench/results/storm-smoke.md").read_text()
