"""notifications/rows.py: its statements write and match exactly what the ORM's would, on either database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, connections, router
from django.utils import timezone

from connections.protocol import MsgType
from notifications.models import PushJob, PushRequest
from notifications.rows import insert_row, update_rows
from notifications.sharding import model_for_uid, shard_alias, shard_of

pytestmark = pytest.mark.django_db(transaction=True)

FIELDS = ("noce_ack", "to_uid", "from_uid", "msg_type", "client_type", "body", "is_sent", "is_read", "create_time")


def message(uid: int, noce_ack: str, now=None, **extra):
    now = now or timezone.now()
    return model_for_uid(uid)(
        noce_ack=noce_ack, to_uid=uid, msg_type=int(MsgType.USER_NOTICE), create_time=now, update_time=now, **extra
    )


def test_a_message_row_reads_back_as_the_orm_writes_it(new_uid):
    uid = new_uid()
    alias = shard_alias(shard_of(uid))
    body = {"text": "héllo \"quoted\" \\ 'x'", "nested": {"n": [1, 2.5, None, True]}, "emoji": "🔔"}
    now = timezone.now()
    ours = message(uid, f"ours-{uid}", now, body=body)
    theirs = message(uid, f"orm-{uid}", now, body=body, from_uid=7)
    insert_row(connections[alias], ours)
    theirs.save(force_insert=True, using=alias)
    assert ours.pk is not None and ours.pk != theirs.pk
    stored = {row.noce_ack: row for row in model_for_uid(uid).objects.using(alias).filter(to_uid=uid)}
    assert sorted(stored) == sorted([ours.noce_ack, theirs.noce_ack])
    mine, orm = stored[ours.noce_ack], stored[theirs.noce_ack]
    assert mine.pk == ours.pk
    # Defaults (from_uid, client_type, is_sent, is_read) come from the fields, as in save().
    assert [getattr(mine, f) for f in FIELDS if f not in ("noce_ack", "from_uid")] == [
        getattr(orm, f) for f in FIELDS if f not in ("noce_ack", "from_uid")
    ]
    assert (mine.from_uid, orm.from_uid, mine.body) == (0, 7, body)
    assert mine.create_time == ours.create_time  # an aware datetime survives the round trip


def test_a_duplicate_noce_ack_is_an_integrity_error_and_the_first_row_stays(new_uid):
    uid = new_uid()
    connection = connections[shard_alias(shard_of(uid))]
    insert_row(connection, message(uid, f"dup-{uid}", body={"n": 1}))
    with pytest.raises(IntegrityError):
        insert_row(connection, message(uid, f"dup-{uid}", body={"n": 2}))
    assert [row.body for row in model_for_uid(uid).objects.filter(to_uid=uid)] == [{"n": 1}]


def test_auto_now_fields_are_filled_and_a_given_key_is_kept():
    # PushJob: a UUID key of its own, and created_at/updated_at set by pre_save as save() would.
    job = PushJob(id=uuid.uuid4(), msg_type=int(MsgType.SYSTEM_NOTICE), body={"t": 1}, uids=[1, 2])
    insert_row(connections[router.db_for_write(PushJob)], job)
    row = PushJob.objects.get(id=job.id)
    assert row.created_at is not None and row.updated_at is not None
    assert (row.uids, row.state, row.stored, row.body) == ([1, 2], "pending", 0, {"t": 1})


def test_update_rows_matches_like_filter_update_and_counts_matched_rows():
    connection = connections[router.db_for_write(PushRequest)]
    created = timezone.now() - timedelta(seconds=5)
    claim = PushRequest(scope="/api/test", key=f"key:{uuid.uuid4().hex}", fingerprint="f" * 64, created_at=created)
    insert_row(connection, claim)
    assert claim.pk == PushRequest.objects.get(key=claim.key).pk
    where = {"id": claim.pk, "created_at": created}
    answer = {"msg": "ok", "data": {"noce_acks": {"1": "a-1"}}}
    assert update_rows(connection, PushRequest, where, status=200, answer=answer) == 1
    # The same values again: still one row matched (what the ORM's update() reports too).
    assert update_rows(connection, PushRequest, where, status=200, answer=answer) == 1
    # Another created_at matches nothing, and changes nothing.
    assert (
        update_rows(connection, PushRequest, {**where, "created_at": created + timedelta(microseconds=1)}, status=500)
        == 0
    )
    row = PushRequest.objects.get(pk=claim.pk)
    assert (row.status, row.answer, row.created_at) == (200, answer, created)
