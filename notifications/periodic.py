"""Periodic runs: the schedules, and the runs they start.

The three schedules of the seed, registered in django-celery-beat (database
scheduler, editable and switchable in the admin):

* ``PushUserNoticeMsg`` every 6 minutes: personal notices not yet sent go to
  the users online now;
* ``PushCommentMsg`` every 6 minutes: the same for comment notifications;
* ``PushSystemNoticeMsg`` every 3 hours: a system notice to every online user.

Invariants:
* ``schedules_register`` is idempotent and never overwrites what an operator
  changed (interval, arguments, enabled) unless asked to reset;
* a broadcast run is a ``PushJob`` whose id is derived from the schedule and
  its time slot, so the same run fired twice, retried or resumed after a
  worker died stores and pushes nothing twice;
* a periodic broadcast stores the notice for every online user but pushes it
  only to those with no earlier unread notice of that type.

Guarded by tests/notifications/test_periodic.py.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from connections.protocol import MsgType
from connections.selectors import online_uid_batches
from pushsite import metrics

from . import envelopes
from .models import PushJob, ScheduleRun
from .publish import publish_stored
from .sharding import message_model, uids_by_shard
from .store import NewMessage

log = logging.getLogger(__name__)

RUN_NAMESPACE = uuid.UUID("5b0c9a6e-4f0e-4c86-9f3e-0f1c2d3b4a59")


@dataclass(frozen=True)
class Schedule:
    name: str
    task: str
    every_seconds: int
    kwargs: dict[str, Any]
    description: str


SCHEDULES = (
    Schedule(
        "PushUserNoticeMsg",
        "notifications.push_unsent",
        360,
        {"msg_type": int(MsgType.USER_NOTICE)},
        "personal notices not yet sent go to users now online",
    ),
    Schedule(
        "PushCommentMsg",
        "notifications.push_unsent",
        360,
        {"msg_type": int(MsgType.COMMENT)},
        "comment notifications not yet sent go to users now online",
    ),
    Schedule(
        "PushSystemNoticeMsg",
        "notifications.push_system_notice",
        3 * 3600,
        {"body": {"title": "System notice", "text": "Welcome back."}, "schedule": "PushSystemNoticeMsg"},
        "a system notice to every online user (edit its body in the admin)",
    ),
    # Not in the seed: the safety nets that keep "accepted is never lost" true
    # when a queue message or a whole node disappears.
    Schedule(
        "RequeueStaleJobs",
        "notifications.requeue_stale_jobs",
        300,
        {},
        "queue again accepted push jobs whose run was lost",
    ),
    Schedule(
        "ReapDeadNodes",
        "connections.reap_dead_nodes",
        60,
        {},
        "clear relation rows of server processes whose liveness mark went stale",
    ),
)


def schedules_register(*, reset: bool = False) -> list[tuple[str, str]]:
    """Create the missing schedules (or restore all defaults); returns (name, what happened)."""
    done = []
    for schedule in SCHEDULES:
        interval, _ = IntervalSchedule.objects.get_or_create(
            every=schedule.every_seconds, period=IntervalSchedule.SECONDS
        )
        defaults = {
            "task": schedule.task,
            "interval": interval,
            "kwargs": json.dumps(schedule.kwargs),
            "description": schedule.description,
            "enabled": True,
        }
        existing = PeriodicTask.objects.filter(name=schedule.name).first()
        if existing is None:
            PeriodicTask.objects.create(name=schedule.name, **defaults)
            done.append((schedule.name, "created"))
        elif reset:
            for field, value in defaults.items():
                setattr(existing, field, value)
            existing.save()
            done.append((schedule.name, "reset to defaults"))
        else:
            done.append((schedule.name, "kept as configured"))
    return done


def schedule_every(name: str, default: int = 3 * 3600) -> int:
    """A schedule's interval in seconds, as configured now."""
    task = PeriodicTask.objects.filter(name=name).select_related("interval").first()
    if task is None or task.interval is None:
        return default
    return int(task.interval.schedule.run_every.total_seconds())


def schedule_set_enabled(*, name: str, enabled: bool) -> None:
    task = PeriodicTask.objects.get(name=name)
    task.enabled = enabled
    task.save(update_fields=["enabled"])


# --- runs ---------------------------------------------------------------------


def unsent_deliver(*, msg_type: MsgType, batch_size: int = 1000) -> dict[str, int]:
    """Publish every unsent, unread message of a type to the users online now."""
    users = published = 0
    for _, uids in online_uid_batches(batch_size=batch_size):
        users += len(uids)
        by_shard = uids_by_shard(uids)
        messages = []
        for shard, shard_uids in by_shard.items():
            rows = message_model(shard).objects.filter(
                to_uid__in=shard_uids, msg_type=int(msg_type), is_sent=False, is_read=False
            )
            messages.extend(NewMessage.from_row(row) for row in rows.order_by("id"))
        published += publish_stored(messages=messages)
    return {"online_users": users, "published": published}


def broadcast_job(*, msg_type: MsgType, body: dict[str, Any], run_key: str | None = None) -> PushJob:
    """The job of one broadcast run; the same run_key always gives the same job."""
    envelopes.SystemMessage.model_validate({"body": body})  # refuse a bad body before storing anything
    job_id = uuid.uuid5(RUN_NAMESPACE, run_key) if run_key else uuid.uuid4()
    with transaction.atomic():
        job, _ = PushJob.objects.get_or_create(
            id=job_id,
            defaults={"msg_type": int(msg_type), "from_uid": 0, "body": body, "uids": None, "periodic": True},
        )
    return job


def manual_run_key(schedule: str) -> str:
    """A run started by hand is its own run, whatever the time slot."""
    return f"{schedule}:manual:{uuid.uuid4().hex}"


def slot_key(schedule: str, every_seconds: int, now: float | None = None) -> str:
    """Names a schedule's time slot: runs fired twice within one slot are one run."""
    slot = int((time.time() if now is None else now) // max(every_seconds, 1))
    return f"{schedule}:{slot}"


# --- run records ----------------------------------------------------------------


def schedule_run_record(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn and keep its outcome for push_status; re-raises after recording a failure."""
    run = ScheduleRun.objects.create(name=name, state=ScheduleRun.State.RUNNING)
    try:
        result = fn()
    except Exception as error:
        ScheduleRun.objects.filter(id=run.id).update(
            state=ScheduleRun.State.FAILED,
            detail=f"{error.__class__.__name__}: {error}"[:2000],
            finished_at=timezone.now(),
        )
        raise
    ScheduleRun.objects.filter(id=run.id).update(
        state=ScheduleRun.State.OK, detail=json.dumps(result, default=str)[:2000], finished_at=timezone.now()
    )
    metrics.periodic_succeeded(name, schedule_every(name))
    return result


def schedule_last_runs() -> dict[str, ScheduleRun]:
    """The latest run of each schedule name."""
    latest: dict[str, ScheduleRun] = {}
    for run in ScheduleRun.objects.order_by("-started_at")[:500]:
        latest.setdefault(run.name, run)
    return latest
