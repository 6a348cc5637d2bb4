"""The embedded default's Celery broker works across processes (no Redis, no RabbitMQ)."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from django.conf import settings

from tests.servers import BIN, ROOT, WorkerProcess, configuration_environment, prepare_server_database

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(settings.REDIS_URL), reason="the embedded default has no REDIS_URL"),
]


def test_a_task_queued_by_one_process_runs_in_a_worker_process():
    env = configuration_environment(Path(tempfile.mkdtemp(prefix="pushsite-embedded-")))
    assert "REDIS_URL" not in env and "CELERY_BROKER_URL" not in env
    prepare_server_database(env)
    worker = WorkerProcess(
        "embedded-worker",
        [str(BIN / "celery"), "-A", "pushsite", "worker", "--pool=solo", "--loglevel=INFO", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        env,
    )  # fmt: skip
    worker.start()
    try:
        queued = subprocess.run(
            [str(BIN / "python"), "manage.py", "shell", "-c",
             "from notifications.tasks import requeue_stale_jobs; print(requeue_stale_jobs.delay().id)"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        task_id = queued.stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and f"[{task_id}] succeeded" not in worker.log.read_text():
            time.sleep(0.2)
        log = worker.log.read_text()
        assert "transport:   filesystem://" in log  # the embedded broker, not Redis
        assert f"notifications.requeue_stale_jobs[{task_id}] succeeded" in log, worker.output()
    finally:
        worker.stop()
