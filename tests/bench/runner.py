"""Running a benchmark script as a user would, for the smoke tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def run_bench(script: str, *args: str, timeout: float = 300) -> None:
    """Run ``bench/<script>`` with its own database and Redis (none of the suite's); fail on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSH_", "DATABASE_URL", "REDIS_URL"))}
    run = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
