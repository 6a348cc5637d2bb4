"""Processes SIGKILLed in the middle of a push job: no duplicate row, no lost row.

Real daphne nodes and Celery workers, killed without any chance to clean up,
as in a crash or ``systemctl kill -s KILL``.

Invariants guarded here:
* a broadcast job cut off with its node, run again, leaves exactly one row of
  it per user who was online: none twice, none missing;
* the dead node's relation rows and presence entries are cleared by the
  surviving node, whose own rows stay;
* a job whose worker died is queued again by the safety net
  (``push_jobs_requeue_stale``, the RequeueStaleJobs schedule) only once it
  stopped making progress, and a new worker finishes it: one row per uid, done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from connections.models import Connection, Node
from connections.presence import presence
from notifications.client import PushClient
from notifications.models import JobState, PushJob
from notifications.services import push_jobs_requeue_stale
from notifications.sharding import message_model, uids_by_shard
from pushsite.redis_client import get_redis
from tests.servers import celery_worker, daphne

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not settings.REDIS_URL, reason="needs the real configuration (MariaDB and Redis)"),
]

SOCKETS_PER_NODE = 150
NODE_ENV = {
    "PUSH_JOBS": "inline",
    "PUSH_JOB_BATCH": 20,
    "PUSH_NODE_HEARTBEAT": 1,
    "PUSH_NODE_DEAD_AFTER": 3,
    # The local verify server is one small threaded process; 300 logins queue at it.
    "PUSH_AUTH_VERIFY_TIMEOUT": 10,
}


async def open_socket(port: int, uid: int, gate: asyncio.Semaphore) -> Any:
    async with gate:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/push/", open_timeout=10, max_queue=None)
        await ws.send(json.dumps({"action": "login", "body": {"ukey": f"key-{uid}"}, "seq": 1}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert reply["code"] == 200, reply
    return ws


async def wait_for(condition: Callable[[], Any], timeout: float = 15, step: float = 0.05) -> Any:
    """Poll a database condition until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while not (value := await database_sync_to_async(condition)()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(step)
    return value


def job(job_id: str) -> PushJob:
    return PushJob.objects.get(id=job_id)


def rows_of_job(job_id: str, uids: list[int]) -> Counter[int]:
    """How many rows of the job each uid has (noce_acks derived from the job id)."""
    prefix = uuid.UUID(job_id).hex
    by_shard = uids_by_shard(uids)
    counts: Counter[int] = Counter()
    for shard, shard_uids in by_shard.items():
        counts.update(
            message_model(shard)
            .objects.filter(to_uid__in=shard_uids, noce_ack__startswith=prefix)
            .values_list("to_uid", flat=True)
        )
    return counts


def backdate(job_id: str, *, seconds: int) -> int:
    """Move a job's last progress mark back; returns how many rows it had stored."""
    PushJob.objects.filter(id=job_id).update(updated_at=timezone.now() - timedelta(seconds=seconds))
    return job(job_id).stored


def node_rows(node_id: str) -> int:
    return Connection.objects.filter(node=node_id).count()


async def test_a_node_killed_mid_broadcast_leaves_one_row_per_online_user_after_a_rerun(verifier, settings, new_uid):
    settings.PUSH_JOBS = "inline"  # the re-run happens in this process, standing in for a worker
    ids = [f"kill-{name}-{uuid.uuid4().hex[:6]}" for name in ("a", "b")]
    node_a, node_b = (daphne(f"node-{n}", PUSH_NODE_ID=i, **NODE_ENV) for n, i in zip("ab", ids, strict=True))
    sockets: list[Any] = []
    try:
        node_a.start()
        node_b.start()
        uids_a = [new_uid() for _ in range(SOCKETS_PER_NODE)]
        uids_b = [new_uid() for _ in range(SOCKETS_PER_NODE)]
        gate = asyncio.Semaphore(10)  # the verify server's listen backlog is small
        sockets_b = await asyncio.gather(*(open_socket(node_b.port, uid, gate) for uid in uids_b))
        sockets_a = await asyncio.gather(*(open_socket(node_a.port, uid, gate) for uid in uids_a))
        sockets += [*sockets_a, *sockets_b]
        everyone = uids_a + uids_b

        api = PushClient(f"http://127.0.0.1:{node_a.port}", secret=settings.PUSH_API_SECRET)
        answer = await asyncio.to_thread(api.system_message, {"notice": "killed mid-way"})
        job_id = answer["data"]["job_id"]
        # Kill node a as soon as its job has stored a batch, well before the last.
        await wait_for(lambda: job(job_id).stored > 0, step=0.002)
        node_a.kill()
        cut = await database_sync_to_async(job)(job_id)
        assert cut.state == JobState.RUNNING and 0 < cut.stored < len(everyone), (cut.state, cut.stored)
        counts = await database_sync_to_async(rows_of_job)(job_id, everyone)
        assert max(counts.values()) == 1 and len(counts) < len(everyone)

        # The safety net queues the cut-off job again; it runs before node b reaps a's rows.
        assert await database_sync_to_async(push_jobs_requeue_stale)(older_than=0) == 1
        done = await wait_for(lambda: job(job_id).state == JobState.DONE and job(job_id))
        assert done.attempts == 2
        counts = await database_sync_to_async(rows_of_job)(job_id, everyone)
        assert set(counts) == set(everyone) and set(counts.values()) == {1}

        # Every socket of the surviving node got the notice, with the job's noce_ack.
        for uid, ws in zip(uids_b, sockets_b, strict=True):
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["msg_type"] == 6 and frame["noce_ack"] == f"{uuid.UUID(job_id).hex}-{uid}", frame

        # Node b clears the dead node's rows and presence entries, and keeps its own.
        await wait_for(lambda: node_rows(ids[0]) == 0 and not Node.objects.filter(node_id=ids[0]).exists(), step=0.2)
        assert await database_sync_to_async(node_rows)(ids[1]) == SOCKETS_PER_NODE
        assert await database_sync_to_async(presence().online)(everyone) == set(uids_b)
        assert node_b.proc.poll() is None
    finally:
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close()
        node_a.kill()
        node_b.stop()


@pytest.fixture
def queue() -> Any:
    """A Celery queue of this test's own, which this process sends to as well.

    A message the killed worker took stays unacknowledged in Redis until
    Celery's visibility timeout (an hour); it is removed at the end.
    """
    from pushsite.celery import app

    name = f"pushtest-{uuid.uuid4().hex[:8]}"
    default = app.conf.task_default_queue
    app.conf.task_default_queue = name
    yield name
    app.conf.task_default_queue = default
    client = get_redis()
    for tag, payload in client.hgetall("unacked").items():
        if name in payload:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    client.delete(name)


async def test_a_worker_killed_mid_job_is_replaced_and_the_job_ends_with_one_row_per_uid(verifier, queue, new_uid):
    env = {"PUSH_JOBS": "celery", "PUSH_CELERY_QUEUE": queue, "PUSH_JOB_BATCH": 100}
    node = daphne("node", **env)
    worker = celery_worker("worker-1", **env)
    replacement = celery_worker("worker-2", **env)
    try:
        node.start()
        worker.start()
        uids = [new_uid() for _ in range(5000)]
        api = PushClient(f"http://127.0.0.1:{node.port}", secret=settings.PUSH_API_SECRET, timeout=30)
        answer = await asyncio.to_thread(api.user_message, uids, {"big": True})
        assert answer["code"] == 202
        job_id = answer["data"]["job_id"]

        # As if the job had run for ten minutes: from now on only its progress counts.
        started = await database_sync_to_async(backdate)(job_id, seconds=600)
        await wait_for(lambda: job(job_id).stored > started, step=0.005)
        worker.kill()
        cut = await database_sync_to_async(job)(job_id)
        assert cut.state == JobState.RUNNING and 0 < cut.stored < len(uids), (cut.state, cut.stored)

        replacement.start()
        # It made progress a moment ago: a sweep (the schedule's waits 300 s) leaves it alone...
        assert await database_sync_to_async(push_jobs_requeue_stale)(older_than=60) == 0
        # ...and queues it once it has been idle that long (0 s here, to not wait).
        assert await database_sync_to_async(push_jobs_requeue_stale)(older_than=0) == 1
        done = await wait_for(lambda: job(job_id).state == JobState.DONE and job(job_id), timeout=60, step=0.2)
        assert done.attempts == 2 and not done.error
        counts = await database_sync_to_async(rows_of_job)(job_id, uids)
        assert set(counts) == set(uids) and set(counts.values()) == {1}
        assert "run_push_job" in replacement.output()
    finally:
        replacement.stop()
        worker.kill()
        node.stop()
