"""Celery entry points: thin, they take ids and call one service."""

from __future__ import annotations

from celery import shared_task
from django.db import DatabaseError

from pushsite.errors import BackendUnavailable

from .services import push_job_run

RETRYABLE = (BackendUnavailable, DatabaseError, ConnectionError)


@shared_task(
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
