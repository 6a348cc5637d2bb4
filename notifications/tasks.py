"""Celery entry points: thin, they take ids and call one service."""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Task, shared_task
from django.db import DatabaseError

from connections.protocol import MsgType
from pushsite import metrics
from pushsite.errors import BackendUnavailable

from . import periodic
from .services import RUN_PUSH_JOB, push_job_fail, push_job_run, push_jobs_requeue_stale

RETRYABLE = (BackendUnavailable, DatabaseError, ConnectionError)


class CountedTask(Task):
    """A task whose outcomes are counted in pushsite_jobs_total (done, failed, retried)."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        metrics.job("done")

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        metrics.job("retried")

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        metrics.job("failed")


class PushJobTask(CountedTask):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Out of retries (or not retryable): the job is marked failed for operators."""
        super().on_failure(exc, task_id, args, kwargs, einfo)
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id:
            # If the database is what failed, the stale-job sweep sees the job later.
            with contextlib.suppress(DatabaseError):
                push_job_fail(job_id=job_id, error=exc)


@shared_task(
    base=PushJobTask,
    name=RUN_PUSH_JOB,
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


PERIODIC = {
    "base": CountedTask,
    "autoretry_for": RETRYABLE,
    "retry_backoff": 5,
    "retry_backoff_max": 120,
    "max_retries": 3,
}


def _schedule_name(task: Task, default: str) -> str:
    """The beat schedule that fired this run (django-celery-beat sends its name)."""
    request = task.request
    # A worker exposes message headers as attributes; an inline apply() keeps them in .headers.
    return getattr(request, "periodic_task_name", None) or (request.headers or {}).get("periodic_task_name") or default


@shared_task(bind=True, name="notifications.push_unsent", **PERIODIC)
def push_unsent(self: Task, msg_type: int) -> dict[str, Any]:
    """Publish unsent messages of one type to the users online now."""
    name = _schedule_name(self, f"push_unsent({msg_type})")
    return periodic.schedule_run_record(name, lambda: periodic.unsent_deliver(msg_type=MsgType(msg_type)))


@shared_task(bind=True, name="notifications.push_system_notice", **PERIODIC)
def push_system_notice(
    self: Task, body: dict[str, Any], schedule: str = "PushSystemNoticeMsg", run_key: str | None = None
) -> dict[str, Any]:
    """One broadcast run: a system notice to every online user (idempotent per time slot)."""
    name = _schedule_name(self, schedule)

    def run() -> dict[str, Any]:
        key = run_key or periodic.slot_key(name, periodic.schedule_every(name))
        job = periodic.broadcast_job(msg_type=MsgType.SYSTEM_NOTICE, body=body, run_key=key)
        job = push_job_run(job_id=job.id)
        return {"job_id": str(job.id), "stored": job.stored, "sent": job.sent}

    return periodic.schedule_run_record(name, run)


@shared_task(name="notifications.requeue_stale_jobs")
def requeue_stale_jobs() -> int:
    """Queue again accepted jobs whose run was lost."""
    return push_jobs_requeue_stale()
