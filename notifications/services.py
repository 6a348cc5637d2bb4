"""Push actions: what the API, the tasks and the admin ask for.

Invariants:
* stored before published: every action commits its rows, then calls
  ``publish.publish_stored``; nothing reaches a socket that is not stored;
* an inline push whose rows are committed reports them stored, even when the
  publish fails (Redis gone in between): it never raises after storing;
* a push to a few uids is stored and published inline; larger ones and system
  notices become a ``PushJob`` committed before anything is queued, so an
  accepted push survives a lost queue message (``push_jobs_requeue_stale``);
* running a job twice, or resuming one cut off, stores no duplicate row: its
  noce_acks are derived from the job id and the uid, and a batch is stored
  with INSERT IGNORE on the unique noce_ack, so no row is read first;
* a request run twice (notifications.idempotency) stores nothing twice: given
  a seed, its noce_acks and its job id are derived from it;
* a job is queued again only after ``older_than`` seconds without progress,
  not while a worker moves it on batch by batch;
* an admin resend publishes rows that exist, under their own noce_acks, and
  never a row the user has read.

Guarded by tests/notifications/test_api.py, tests/notifications/test_delivery.py,
tests/notifications/test_periodic.py, tests/notifications/test_admin.py (resend),
tests/notifications/test_idempotency.py and tests/faults/test_kills.py (a node or a worker killed mid-job).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from celery import current_app
from django.conf import settings
from django.db import IntegrityError, close_old_connections, transaction
from django.db.models import F
from django.utils import timezone

from connections import bus
from connections.protocol import MsgType
from connections.selectors import online_uid_batches
from pushsite.errors import BackendUnavailable

from .idempotency import seeded_job_id, seeded_noce_ack
from .models import JobState, PushJob
from .publish import publish_stored
from .selectors import still_unread_of_type
from .sharding import message_model, shard_of
from .store import NewMessage, messages_store, messages_store_batch

log = logging.getLogger(__name__)

RUN_PUSH_JOB = "notifications.run_push_job"


@dataclass(frozen=True)
class InlineResult:
    stored: int
    sent: int
    noce_acks: dict[int, str]


def notifications_push(
    *, msg_type: MsgType, uids: list[int], body: dict[str, Any], from_uid: int, seed: str | None = None
) -> InlineResult:
    """Store one notification per uid, then publish it to whoever is online.

    With a ``seed`` (notifications.idempotency) each noce_ack is derived from
    it and the uid, and a message whose noce_ack is stored already is not
    stored again: a request run a second time stores nothing twice.
    """
    bus.check_available()
    if seed is None:
        messages = [NewMessage(to_uid=uid, msg_type=msg_type, body=body, from_uid=from_uid) for uid in uids]
        stored = messages_store(messages=messages)
    else:
        messages = [
            NewMessage(to_uid=uid, msg_type=msg_type, body=body, from_uid=from_uid, noce_ack=seeded_noce_ack(seed, uid))
            for uid in uids
        ]
        stored = _store_seeded(messages)
    try:
        sent = publish_stored(messages=messages)
    except (BackendUnavailable, redis.RedisError) as error:
        # The rows are committed: an error answer would say nothing was stored
        # and invite a duplicate. They stay unsent and go out at the user's
        # next login or the next periodic run.
        log.warning("stored %d messages but could not publish them: %s", stored, error)
        sent = 0
    return InlineResult(stored=stored, sent=sent, noce_acks={m.to_uid: m.noce_ack for m in messages})


def _store_seeded(messages: list[NewMessage]) -> int:
    """Store messages with derived noce_acks; the ones stored already (an earlier run) are skipped."""
    if len(messages) > 1:
        return messages_store(messages=messages, ignore_existing=True)
    # One row stays one INSERT, the common case's single round trip; a clash
    # on the unique noce_ack means an earlier run stored it.
    try:
        return messages_store(messages=messages)
    except IntegrityError:
        (message,) = messages
        if message_model(shard_of(message.to_uid)).objects.filter(noce_ack=message.noce_ack).exists():
            return 0
        raise


def push_job_create(
    *,
    msg_type: MsgType,
    uids: list[int] | None,
    body: dict[str, Any],
    from_uid: int,
    seed: str | None = None,
) -> PushJob:
    """Accept a push for a worker: the job is durable before it is queued.

    With a ``seed`` the job's id is derived from it; when that job exists (an
    earlier run of the same request), it is the answer and nothing new is
    queued: a job left unfinished is queued again by push_jobs_requeue_stale.
    """
    bus.check_available()
    job_id = uuid.uuid4() if seed is None else seeded_job_id(seed)
    try:
        with transaction.atomic():
            job = PushJob.objects.create(id=job_id, msg_type=int(msg_type), from_uid=from_uid, body=body, uids=uids)
            transaction.on_commit(lambda: push_job_enqueue(job_id=job.id))
    except IntegrityError:
        if seed is None:
            raise
        return PushJob.objects.get(id=job_id)
    return job


def push_job_enqueue(*, job_id: uuid.UUID) -> None:
    """Queue a job for a Celery worker, or run it in this process (PUSH_JOBS=inline)."""
    if settings.PUSH_JOBS == "inline":
        _inline_runner().submit(_run_inline, job_id)
        return
    try:
        # By name: the task module imports this one, and the name is the
        # contract between the API and the workers (notifications/tasks.py).
        current_app.send_task(RUN_PUSH_JOB, args=[str(job_id)])
    except Exception as error:  # the job row is durable; the periodic sweep re-queues it
        log.warning("could not queue job %s (%s); it will be re-queued", job_id, error)


_runner: ThreadPoolExecutor | None = None
_runner_lock = threading.Lock()


def _inline_runner() -> ThreadPoolExecutor:
    global _runner
    with _runner_lock:
        if _runner is None:
            _runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pushsite-job")
        return _runner


def _run_inline(job_id: uuid.UUID) -> None:
    try:
        push_job_run(job_id=job_id)
    except Exception as error:
        log.exception("job %s failed", job_id)
        push_job_fail(job_id=job_id, error=error)
    finally:
        close_old_connections()


def push_job_fail(*, job_id: uuid.UUID | str, error: BaseException) -> None:
    """Give up on a job: it stays failed (rows it stored are kept and delivered)."""
    PushJob.objects.filter(id=job_id).exclude(state=JobState.DONE).update(
        state=JobState.FAILED, error=f"{error.__class__.__name__}: {error}"[:2000], finished_at=timezone.now()
    )


def push_job_run(
    *,
    job_id: uuid.UUID | str,
    batch_size: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> PushJob:
    """Store and publish a job's messages, batch by batch; safe to run again.

    ``progress(users, stored, sent)`` is called after each batch.
    """
    batch_size = batch_size or settings.PUSH_JOB_BATCH
    job = PushJob.objects.get(id=job_id)
    if job.state == JobState.DONE:
        return job
    # ``update()`` skips auto_now: updated_at is set by hand, as the mark of
    # progress that push_jobs_requeue_stale reads.
    PushJob.objects.filter(id=job.id).update(
        state=JobState.RUNNING, attempts=F("attempts") + 1, updated_at=timezone.now()
    )
    msg_type = MsgType(job.msg_type)
    try:
        for uids in _job_batches(job, batch_size):
            messages = [
                NewMessage(
                    to_uid=uid,
                    msg_type=msg_type,
                    body=job.body,
                    from_uid=job.from_uid,
                    noce_ack=job.noce_ack_for(uid),
                )
                for uid in uids
            ]
            stored = messages_store_batch(messages=messages)
            if job.periodic:
                # A periodic run stores the notice for everyone but pushes it
                # only to users who have read the earlier ones of its type.
                waiting = still_unread_of_type(uids=uids, msg_type=job.msg_type, excluding_prefix=job.id.hex)
                messages = [m for m in messages if m.to_uid not in waiting]
            sent = publish_stored(messages=messages)
            PushJob.objects.filter(id=job.id).update(
                stored=F("stored") + stored, sent=F("sent") + sent, cursor=job.cursor, updated_at=timezone.now()
            )
            if progress is not None:
                progress(len(uids), stored, sent)
    except Exception as error:
        PushJob.objects.filter(id=job.id).update(error=f"{error.__class__.__name__}: {error}"[:2000])
        raise
    PushJob.objects.filter(id=job.id).update(state=JobState.DONE, finished_at=timezone.now(), error="")
    job.refresh_from_db()
    return job


def _job_batches(job: PushJob, batch_size: int):
    """Target uids in batches; for a system job, online users walked by relation id.

    The cursor is saved only after a batch is stored, so a job cut off resumes
    where it stopped.
    """
    if job.uids is not None:
        uids = list(job.uids)
        for start in range(0, len(uids), batch_size):
            yield uids[start : start + batch_size]
        return
    for cursor, uids in online_uid_batches(batch_size=batch_size, after=job.cursor):
        job.cursor = cursor
        if uids:
            yield uids
        else:
            PushJob.objects.filter(id=job.id).update(cursor=cursor, updated_at=timezone.now())


def push_jobs_requeue_stale(*, older_than: int = 300) -> int:
    """Queue again the unfinished jobs that made no progress for ``older_than`` seconds.

    A job still running moves its ``updated_at`` with every batch, so a long
    broadcast is not queued a second time while a worker works on it.
    """
    cutoff = timezone.now() - timedelta(seconds=older_than)
    stale = list(
        PushJob.objects.filter(state__in=[JobState.PENDING, JobState.RUNNING], updated_at__lt=cutoff).values_list(
            "id", flat=True
        )
    )
    for job_id in stale:
        push_job_enqueue(job_id=job_id)
    return len(stale)


def messages_resend(*, shard: int, ids: list[int]) -> int:
    """Publish again the selected rows of one shard that are not read; returns how many were online.

    Nothing is stored: the rows exist and keep their noce_acks, so a client
    that did get one the first time recognises the repeat. A row marked sent
    is resent too, because sent means handed to a socket, not seen.
    """
    bus.check_available()
    rows = message_model(shard).objects.filter(id__in=ids, is_read=False).order_by("id")
    return publish_stored(messages=[NewMessage.from_row(row) for row in rows])
