"""Celery entry points: thin, they take ids and call one service."""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Task, shared_task
from django.db import DatabaseError

from pushsite.errors import BackendUnavailable

from .services import push_job_fail, push_job_run

RETRYABLE = (BackendUnavailable, DatabaseError, ConnectionError)


class PushJobTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Out of retries (or not retryable): the job is marked failed for operators."""
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id:
            # If the database is what failed, the stale-job sweep sees the job later.
            with contextlib.suppress(DatabaseError):
                push_job_fail(job_id=job_id, error=exc)


@shared_task(
    base=PushJobTask,
    name="notifications.run_push_job",
    autoretry_for=RETRYABLE,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=5,
    acks_late=True,
)
def run_push_job(job_id: str) -> dict[str, object]:
    """Store and publish one accepted push job (idempotent)."""
    job = push_job_run(job_id=job_id)
    return {"job_id": str(job.id), "state": job.state, "stored": job.stored, "sent": job.sent}
