"""Periodic runs, broadcast runs and the operator commands (issue: periodic runs)."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.core.management import call_command
from django.core.management.base import CommandError
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from connections.protocol import MsgType
from notifications import periodic, services
from notifications.models import JobState, PushJob, ScheduleRun
from notifications.services import push_job_run
from notifications.sharding import model_for_uid
from notifications.store import NewMessage, messages_store
from notifications.tasks import push_system_notice, push_unsent

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def rows_of(uid: int, msg_type: int | None = None) -> list:
    rows = model_for_uid(uid).objects.filter(to_uid=uid)
    if msg_type is not None:
        rows = rows.filter(msg_type=msg_type)
    return list(rows.order_by("id"))


@database_sync_to_async
def store_quietly(uid: int, msg_type: MsgType, body: dict) -> str:
    """Stored but never published: as if the live push had been lost."""
    message = NewMessage(to_uid=uid, msg_type=msg_type, body=body)
    messages_store(messages=[message])
    return message.noce_ack


async def logged_in(connect, uid: int):
    sock = await connect()
    assert (await sock.login(f"key-{uid}"))["code"] == 200
    return sock


# --- schedules ------------------------------------------------------------------


def test_register_is_idempotent_and_keeps_operator_changes():
    first = periodic.schedules_register()
    assert {name for name, what in first if what == "created"} >= {
        "PushUserNoticeMsg",
        "PushCommentMsg",
        "PushSystemNoticeMsg",
    }
    task = PeriodicTask.objects.get(name="PushUserNoticeMsg")
    assert task.interval.every == 360 and task.interval.period == IntervalSchedule.SECONDS
    assert json.loads(task.kwargs) == {"msg_type": 7}
    assert PeriodicTask.objects.get(name="PushSystemNoticeMsg").interval.every == 3 * 3600

    task.enabled = False
    task.interval, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    task.save()
    again = periodic.schedules_register()
    assert all(what == "kept as configured" for _, what in again)
    assert PeriodicTask.objects.count() == len(periodic.SCHEDULES)
    task.refresh_from_db()
    assert not task.enabled and task.interval.every == 60

    periodic.schedules_register(reset=True)
    task.refresh_from_db()
    assert task.enabled and task.interval.every == 360


def test_schedules_command_lists_pauses_resumes_and_refuses_unknown(capsys):
    call_command("schedules", "register")
    call_command("schedules", "pause", "PushCommentMsg")
    assert not PeriodicTask.objects.get(name="PushCommentMsg").enabled
    call_command("schedules", "list")
    out = capsys.readouterr().out
    assert "PushCommentMsg" in out and "paused" in out and "every 360 seconds" in out
    call_command("schedules", "resume", "PushCommentMsg")
    assert PeriodicTask.objects.get(name="PushCommentMsg").enabled
    with pytest.raises(CommandError, match="no schedule named"):
        call_command("schedules", "pause", "NoSuchSchedule")


# --- runs -----------------------------------------------------------------------


async def test_unsent_run_delivers_to_online_users_only_that_type(connect, verifier, new_uid):
    uid, offline = new_uid(), new_uid()
    sock = await logged_in(connect, uid)
    notice = await store_quietly(uid, MsgType.USER_NOTICE, {"n": 1})
    await store_quietly(uid, MsgType.COMMENT, {"n": 2})
    await store_quietly(offline, MsgType.USER_NOTICE, {"n": 3})

    result = await database_sync_to_async(push_unsent.apply)(kwargs={"msg_type": 7})
    assert result.successful(), result.result
    assert result.result["published"] == 1
    frame = await sock.recv()
    assert frame["noce_ack"] == notice and frame["msg_type"] == 7
    assert await sock.nothing()
    run = await database_sync_to_async(ScheduleRun.objects.latest)("started_at")
    assert run.state == ScheduleRun.State.OK and run.name == "push_unsent(7)"


async def test_broadcast_run_stores_for_all_pushes_only_to_those_without_unread(connect, verifier, new_uid):
    fresh, waiting, offline = new_uid(), new_uid(), new_uid()
    fresh_sock = await logged_in(connect, fresh)
    waiting_sock = await logged_in(connect, waiting)
    await store_quietly(waiting, MsgType.SYSTEM_NOTICE, {"old": True})

    result = await database_sync_to_async(push_system_notice.apply)(
        kwargs={"body": {"notice": "new"}, "run_key": "test-run-1"}
    )
    assert result.successful(), result.result
    frame = await fresh_sock.recv()
    assert frame["msg_type"] == 6 and frame["body"] == {"to_uid": fresh, "notice": "new"}
    assert await waiting_sock.nothing()
    assert len(await rows_of(waiting, 6)) == 2  # stored for, not pushed
    assert await rows_of(offline) == []

    # The same run fired again (a second beat tick, a retry) adds nothing.
    again = await database_sync_to_async(push_system_notice.apply)(
        kwargs={"body": {"notice": "new"}, "run_key": "test-run-1"}
    )
    assert again.successful()
    assert len(await rows_of(fresh, 6)) == 1 and len(await rows_of(waiting, 6)) == 2
    assert await fresh_sock.nothing()


async def test_broadcast_run_cut_off_resumes_without_duplicates(connect, verifier, new_uid):
    uids = [new_uid() for _ in range(5)]
    for uid in uids:
        await logged_in(connect, uid)
    job = await database_sync_to_async(periodic.broadcast_job)(
        msg_type=MsgType.SYSTEM_NOTICE, body={"cut": 1}, run_key=f"cut-{uids[0]}"
    )

    def die_after_first_batch(users: int, stored: int, sent: int) -> None:
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        await database_sync_to_async(push_job_run)(job_id=job.id, batch_size=2, progress=die_after_first_batch)
    cut = await database_sync_to_async(PushJob.objects.get)(id=job.id)
    assert cut.state == JobState.RUNNING and cut.stored == 2 and cut.cursor > 0

    done = await database_sync_to_async(push_job_run)(job_id=job.id, batch_size=2)
    assert done.state == JobState.DONE and done.stored == 5
    for uid in uids:
        assert len(await rows_of(uid, 6)) == 1


async def test_broadcast_run_cut_off_between_storing_and_progress_stores_no_duplicate(
    connect, verifier, new_uid, monkeypatch
):
    uids = [new_uid() for _ in range(5)]
    for uid in uids:
        await logged_in(connect, uid)
    job = await database_sync_to_async(periodic.broadcast_job)(
        msg_type=MsgType.SYSTEM_NOTICE, body={"cut": 2}, run_key=f"cut-stored-{uids[0]}"
    )

    def die_after_storing(*, messages: list) -> int:
        raise RuntimeError("worker died with its first batch stored, before its progress was saved")

    monkeypatch.setattr(services, "publish_stored", die_after_storing)
    with pytest.raises(RuntimeError):
        await database_sync_to_async(push_job_run)(job_id=job.id, batch_size=2)
    cut = await database_sync_to_async(PushJob.objects.get)(id=job.id)
    assert (cut.state, cut.stored, cut.cursor) == (JobState.RUNNING, 0, 0)
    assert sum([len(await rows_of(uid, 6)) for uid in uids]) == 2

    monkeypatch.undo()  # the job re-queued: it stores its first batch again
    done = await database_sync_to_async(push_job_run)(job_id=job.id, batch_size=2)
    assert done.state == JobState.DONE and done.attempts == 2
    for uid in uids:
        assert len(await rows_of(uid, 6)) == 1


def test_a_failing_run_is_recorded_and_shown_by_push_status(capsys):
    periodic.schedules_register()

    def broken() -> dict:
        raise ConnectionError("broker went away")

    with pytest.raises(ConnectionError):
        periodic.schedule_run_record("PushCommentMsg", broken)
    call_command("push_status")
    out = capsys.readouterr().out
    assert "PushCommentMsg" in out and "failed" in out and "broker went away" in out
    call_command("push_status", "--json")
    status = json.loads(capsys.readouterr().out)
    comment = next(s for s in status["schedules"] if s["name"] == "PushCommentMsg")
    assert comment["last_run"]["state"] == "failed"
    assert set(status) >= {"nodes", "relation_rows", "online_users", "queue_depth", "schedules", "jobs"}


async def test_push_status_counts_users_and_sockets_per_node(connect, verifier, new_uid, capsys):
    uid = new_uid()
    await logged_in(connect, uid)
    await logged_in(connect, uid)
    await database_sync_to_async(call_command)("push_status", "--json")
    status = json.loads(capsys.readouterr().out)
    from connections.hub import get_hub

    node = next(n for n in status["nodes"] if n["node"] == get_hub().node)
    assert node["alive"] and node["users"] == 1 and node["online_sockets"] == 2


# --- run_broadcast ----------------------------------------------------------------


async def test_run_broadcast_command_with_progress_and_rerun(connect, verifier, new_uid, capsys):
    uids = [new_uid() for _ in range(3)]
    socks = [await logged_in(connect, uid) for uid in uids]
    await database_sync_to_async(call_command)(
        "run_broadcast", "--type", "user", "--body", '{"title": "hello"}', "--batch-size", "2", "--run-key", "k1"
    )
    out = capsys.readouterr().out
    assert "3/3 users" in out and "stored 3" in out
    for uid, sock in zip(uids, socks, strict=True):
        frame = await sock.recv()
        assert frame["msg_type"] == 7 and frame["body"] == {"to_uid": uid, "title": "hello"}
    await database_sync_to_async(call_command)(
        "run_broadcast", "--type", "user", "--body", '{"title": "hello"}', "--run-key", "k1"
    )
    assert "stored 3" in capsys.readouterr().out  # the same run: nothing new
    for uid in uids:
        assert len(await rows_of(uid)) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--body", "not json"], "--body refused"),
        (["--body", "[1]"], "--body refused"),
        (["--body", json.dumps({"x": "y" * 17000})], "larger than"),
        (["--body", "{}", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_run_broadcast_refuses_bad_input_before_storing(args, fragment, new_uid):
    before = PushJob.objects.count()
    with pytest.raises(CommandError, match=fragment):
        call_command("run_broadcast", *args)
    assert PushJob.objects.count() == before


def test_run_broadcast_dry_run_stores_nothing(capsys):
    before = PushJob.objects.count()
    call_command("run_broadcast", "--body", '{"a": 1}', "--dry-run")
    assert "nothing stored" in capsys.readouterr().out
    assert PushJob.objects.count() == before


def test_periodic_broadcast_body_is_validated_before_storing():
    with pytest.raises(ValueError, match="body"):
        periodic.broadcast_job(msg_type=MsgType.SYSTEM_NOTICE, body={"x": "y" * 17000}, run_key="too-big")
    assert not PushJob.objects.filter(body__has_key="x").exists()


async def test_schedules_run_now_delivers_inline(connect, verifier, new_uid, capsys):
    uid = new_uid()
    sock = await logged_in(connect, uid)
    noce_ack = await store_quietly(uid, MsgType.USER_NOTICE, {"now": True})
    await database_sync_to_async(periodic.schedules_register)()
    await database_sync_to_async(call_command)("schedules", "run", "PushUserNoticeMsg", "--inline")
    assert "PushUserNoticeMsg" in capsys.readouterr().out
    assert (await sock.recv())["noce_ack"] == noce_ack


def test_a_failing_schedule_is_retried_with_a_bound_then_reported(new_uid, capsys):
    from django.db import connections

    from connections.models import Connection
    from notifications.sharding import message_model, shard_alias, shard_of
    from notifications.store import shard_tables_create

    periodic.schedules_register()
    uid = new_uid()
    Connection.objects.create(
        uid=uid, conn_id=f"n.{uid}", node="n", user_status=1, client_type=1,
        login_time="2026-01-01T00:00:00Z", update_time="2026-01-01T00:00:00Z",
    )  # fmt: skip
    model = message_model(shard_of(uid))
    with connections[shard_alias(shard_of(uid))].schema_editor() as editor:
        editor.delete_model(model)  # a real failure: the shard table is gone
    try:
        result = push_unsent.apply(kwargs={"msg_type": 7}, headers={"periodic_task_name": "PushUserNoticeMsg"})
        assert result.failed()
    finally:
        shard_tables_create()
    runs = list(ScheduleRun.objects.filter(name="PushUserNoticeMsg").values_list("state", flat=True))
    assert runs == ["failed"] * (1 + push_unsent.max_retries)
    call_command("push_status")
    line = next(line for line in capsys.readouterr().out.splitlines() if "PushUserNoticeMsg" in line)
    assert "failed" in line and "user_push_msg_" in line
