"""What the exactly-once check costs a push: the claim and the recorded answer, against MariaDB.

    .venv/bin/python bench/idempotency.py
    .venv/bin/python bench/idempotency.py --pushes 5000

Every push the API accepts goes through ``notifications.idempotency.push_once``
(keyed by its ``Idempotency-Key``, or by its signature without one): an INSERT
that claims the key before anything is stored, and an UPDATE that records the
answer. This measures that wrapper alone, in one process on the benchmark's
own database, around a push that does nothing (so what is timed is the check,
not the store or the publish):

- **first**: a new key each time: claim, run, record;
- **replay**: the same keys again: the claim meets the row and returns its
  answer, marked duplicate (what a retry or a replayed request costs);
- **conflict**: a key again with another body: 409, nothing run.

Reported per case: wall time per call (p50, p99) and the process's CPU per
call; MariaDB's own CPU is not in it (it runs on this machine too). Writes
bench/results/idempotency.json and .md (``--out``). The latency case of
bench/run.py shows the same check inside a whole push through an API node.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fanout import RESULTS, progress  # noqa: E402
from bench.run import bench_environment, prepare_database  # noqa: E402

SCOPE = "/api/notice/userMessage"


def timed(calls: list[Any]) -> dict[str, float]:
    """Run each call; wall ms per call (p50, p99, mean) and process CPU ms per call."""
    walls = []
    cpu0 = time.process_time()
    for call in calls:
        t0 = time.perf_counter()
        call()
        walls.append((time.perf_counter() - t0) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / len(calls)
    walls.sort()
    return {
        "p50_ms": round(walls[len(walls) // 2], 3),
        "p99_ms": round(walls[min(len(walls) - 1, int(len(walls) * 0.99))], 3),
        "mean_ms": round(statistics.fmean(walls), 3),
        "cpu_ms": round(cpu, 3),
    }


def measure(pushes: int) -> list[dict[str, Any]]:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")
    django.setup()
    from notifications import idempotency
    from notifications.idempotency import Answer

    answer = Answer(200, "ok", {"stored": 1, "sent": 0, "noce_acks": {"1": "x" * 36}})
    run_id = uuid.uuid4().hex[:8]
    keys = [f"bench-{run_id}-{n}" for n in range(pushes)]
    body = b'{"uid": 1, "body": {"bench": true}}'
    ran = []

    def push(key: str, sent_body: bytes) -> Any:
        def call() -> Answer:
            return idempotency.push_once(
                scope=SCOPE, header=key, signature=None, body=sent_body, run=lambda seed: ran.append(seed) or answer
            )

        return call

    def conflict(key: str) -> Any:
        def call() -> None:
            try:
                push(key, b'{"uid": 2}')()
            except idempotency.KeyConflict:
                return
            raise AssertionError(f"{key}: another body was not refused")

        return call

    rows = []
    progress(f"idempotency: {pushes} first requests")
    rows.append({"case": "first", **timed([push(key, body) for key in keys])})
    if len(ran) != pushes:
        raise AssertionError(f"{len(ran)} pushes ran for {pushes} first requests")
    progress(f"idempotency: {pushes} replays")
    rows.append({"case": "replay", **timed([push(key, body) for key in keys])})
    if len(ran) != pushes:
        raise AssertionError(f"a replay ran its push again ({len(ran)} runs for {pushes} keys)")
    progress(f"idempotency: {pushes} conflicts")
    rows.append({"case": "conflict", **timed([conflict(key) for key in keys])})
    for row in rows:
        row["calls"] = pushes
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Idempotency check per push (push_once around a push that does nothing, MariaDB)",
        "",
        "| case | calls | p50 ms | p99 ms | mean ms | process CPU ms/call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['calls']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} | {r['cpu_ms']} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pushes", type=int, default=3000)
    parser.add_argument("--out", default="idempotency")
    args = parser.parse_args()
    bench_environment()
    RESULTS.mkdir(parents=True, exist_ok=True)
    prepare_database()
    rows = measure(args.pushes)
    table = report(rows)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"idempotency": rows}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
