"""The admin of sharded messages and push jobs (notifications/admin.py).

Guards the module's invariants: a page reads the shard its ``uid`` or
``shard`` names (shard 0 by default) and keeps that choice in its links; a
noce_ack search without one finds the row in any shard; message ids name their
shard; bad parameters give a message, not a 500; pages are read-only; actions
call services and reach a live socket.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission

from connections.protocol import MsgType
from notifications import services
from notifications.models import JobState, PushJob
from notifications.sharding import SHARD_COUNT, message_model, shard_of
from notifications.store import NewMessage, messages_ack, messages_mark_sent, messages_store

MESSAGES = "/admin/notifications/pushmessage/"
JOBS = "/admin/notifications/pushjob/"

# These markers name every alias themselves: tests/conftest.py appends a widened
# copy of a test's marker, but pytest-django reads a function's own marker first.
in_db = pytest.mark.django_db(databases="__all__")
in_committed_db = pytest.mark.django_db(transaction=True, databases="__all__")


def uid_in_shard(new_uid: Callable[[], int], shard: int) -> int:
    """A fresh uid whose messages live in the given shard."""
    return new_uid() * SHARD_COUNT + shard


def store(uid: int, msg_type: MsgType = MsgType.USER_NOTICE, noce_ack: str | None = None, **body: Any) -> NewMessage:
    extra = {"noce_ack": noce_ack} if noce_ack else {}
    message = NewMessage(to_uid=uid, msg_type=msg_type, body=body or {"title": "hello"}, **extra)
    messages_store(messages=[message])
    return message


def row_of(message: NewMessage) -> Any:
    return message_model(shard_of(message.to_uid)).objects.get(noce_ack=message.noce_ack)


def detail_url(message: NewMessage) -> str:
    return f"{MESSAGES}{shard_of(message.to_uid)}-{row_of(message).pk}/change/"


def shown(response: Any) -> set[str]:
    """The noce_acks on a changelist page."""
    assert response.status_code == 200, response.status_code
    return {row.noce_ack for row in response.context["cl"].result_list}


def page_messages(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def action(name: str, ids: list[int]) -> dict[str, Any]:
    return {"action": name, "_selected_action": [str(i) for i in ids], "index": "0"}


# --- reading -----------------------------------------------------------------


@in_db
def test_default_page_reads_shard_0_and_links_rows_by_shard_and_id(admin_client, new_uid):
    in_zero, in_five = store(uid_in_shard(new_uid, 0)), store(uid_in_shard(new_uid, 5))
    response = admin_client.get(MESSAGES)
    acks = shown(response)
    assert in_zero.noce_ack in acks and in_five.noce_ack not in acks
    content = response.content.decode()
    assert "Shard 0 (table user_push_msg_0" in content
    assert f'href="{detail_url(in_zero)}"' in content


@in_db
def test_shard_parameter_reads_that_shard_and_sticks_to_filters_and_search(admin_client, new_uid):
    in_zero, in_five = store(uid_in_shard(new_uid, 0)), store(uid_in_shard(new_uid, 5))
    response = admin_client.get(MESSAGES, {"shard": 5})
    acks = shown(response)
    assert in_five.noce_ack in acks and in_zero.noce_ack not in acks
    content = response.content.decode()
    assert "Shard 5 (table user_push_msg_5" in content
    assert f'href="{detail_url(in_five)}' in content
    # Filter links, the search form and the action form all keep the shard.
    filter_link = response.context["cl"].get_query_string({"is_read__exact": "1"})
    assert "shard=5" in filter_link and filter_link.replace("&", "&amp;") in content
    assert '<input type="hidden" name="shard" value="5">' in content
    assert shown(admin_client.get(MESSAGES, {"shard": 5, "is_read__exact": "0"})) >= {in_five.noce_ack}


@in_db
def test_uid_parameter_lists_that_users_rows_only(admin_client, new_uid):
    uid = uid_in_shard(new_uid, 9)
    neighbour = uid + SHARD_COUNT  # same shard, another user
    mine = [store(uid, n=1), store(uid, MsgType.COMMENT, n=2)]
    store(neighbour)
    response = admin_client.get(MESSAGES, {"uid": uid})
    assert shown(response) == {m.noce_ack for m in mine}
    assert f"Messages to uid {uid}, shard 9" in response.content.decode()
    # The same shard given twice is not a conflict.
    assert shown(admin_client.get(MESSAGES, {"uid": uid, "shard": 9})) == {m.noce_ack for m in mine}


@in_db
def test_filters_by_named_msg_type_read_and_sent(admin_client, new_uid):
    uid = uid_in_shard(new_uid, 17)
    comment = store(uid, MsgType.COMMENT)
    notice = store(uid, MsgType.USER_NOTICE)
    system = store(uid, MsgType.SYSTEM_NOTICE)
    messages_ack(uid=uid, noce_acks=[notice.noce_ack])
    messages_mark_sent(pairs=[(uid, system.noce_ack)])

    page = admin_client.get(MESSAGES, {"uid": uid})
    content = page.content.decode()
    assert all(name in content for name in ("COMMENT", "SYSTEM_NOTICE", "USER_NOTICE"))
    assert shown(admin_client.get(MESSAGES, {"uid": uid, "msg_type": "5"})) == {comment.noce_ack}
    assert shown(admin_client.get(MESSAGES, {"uid": uid, "msg_type": "6"})) == {system.noce_ack}
    assert shown(admin_client.get(MESSAGES, {"uid": uid, "is_read__exact": "1"})) == {notice.noce_ack}
    assert shown(admin_client.get(MESSAGES, {"uid": uid, "is_sent__exact": "1"})) == {system.noce_ack}
    unsent_unread = admin_client.get(MESSAGES, {"uid": uid, "is_sent__exact": "0", "is_read__exact": "0"})
    assert shown(unsent_unread) == {comment.noce_ack}
    counts = admin_client.get(MESSAGES, {"uid": uid, "_facets": "True"}).content.decode()
    assert "COMMENT (1)" in counts and f"is_read__exact=1&amp;uid={uid}" in counts
    # A msg_type that is no stored notification is refused like any bad lookup.
    assert admin_client.get(MESSAGES, {"uid": uid, "msg_type": "1"}).status_code == 302


@in_db
def test_noce_ack_search_finds_a_row_in_any_shard_without_choosing_one(admin_client, new_uid):
    far = store(uid_in_shard(new_uid, 77))
    response = admin_client.get(MESSAGES, {"q": far.noce_ack})
    assert shown(response) == {far.noce_ack}
    content = response.content.decode()
    assert "is in shard 77" in content and f'href="{detail_url(far)}' in content

    # A derived noce_ack (a job's) names its uid, hence its shard.
    uid = uid_in_shard(new_uid, 99)
    derived = store(uid, noce_ack=f"{uuid.uuid4().hex}-{uid}")
    assert shown(admin_client.get(MESSAGES, {"q": derived.noce_ack})) == {derived.noce_ack}

    missing = admin_client.get(MESSAGES, {"q": "no-such-noce-ack"})
    assert shown(missing) == set() and "No shard holds noce_ack" in missing.content.decode()
    # With a shard chosen, the search stays in it.
    assert shown(admin_client.get(MESSAGES, {"shard": 3, "q": far.noce_ack})) == set()
    assert shown(admin_client.get(MESSAGES, {"shard": 77, "q": far.noce_ack})) == {far.noce_ack}


@in_db
def test_detail_page_shows_the_row_of_its_shard_read_only(admin_client, new_uid):
    message = store(uid_in_shard(new_uid, 42), MsgType.COMMENT, marker="detail-body-marker")
    response = admin_client.get(detail_url(message))
    assert response.status_code == 200
    content = response.content.decode()
    assert "detail-body-marker" in content and message.noce_ack in content and "COMMENT" in content
    assert "user_push_msg_42" in content
    assert 'name="_save"' not in content and "/history/" not in content


@in_db
@pytest.mark.parametrize("object_id", ["abc", "7", "128-1", "5-999999999999"])
def test_unknown_message_ids_redirect_with_a_message(admin_client, object_id):
    response = admin_client.get(f"{MESSAGES}{object_id}/change/", follow=True)
    assert response.status_code == 200
    assert any("doesn\N{RIGHT SINGLE QUOTATION MARK}t exist" in m for m in page_messages(response))


@in_db
@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"uid": "abc"}, "uid must be a whole number"),
        ({"uid": "-5"}, "uid must be a whole number"),
        ({"uid": str(2**64)}, "uid must be a whole number"),
        ({"shard": "999"}, "shard must be a whole number from 0 to 127"),
        ({"shard": "x"}, "shard must be a whole number from 0 to 127"),
        ({"uid": "130", "shard": "3"}, "uid 130 lives in shard 2"),
    ],
)
def test_malformed_scope_gives_an_error_message_and_no_rows(admin_client, new_uid, params, error):
    store(uid_in_shard(new_uid, 0))
    response = admin_client.get(MESSAGES, params)
    assert shown(response) == set()
    assert any(error in m for m in page_messages(response))
    assert error.lower() in response.content.decode().lower()  # shown capitalised


# --- read-only -----------------------------------------------------------------


@in_db
def test_add_change_and_delete_are_refused(admin_client, new_uid):
    message = store(uid_in_shard(new_uid, 11), title="keep")
    url = detail_url(message)
    assert admin_client.get(f"{MESSAGES}add/").status_code == 403
    assert admin_client.post(f"{MESSAGES}add/", {"noce_ack": "x", "to_uid": 1}).status_code == 403
    assert admin_client.post(url, {"is_read": "on", "body": "{}"}).status_code == 403
    assert admin_client.post(url.replace("/change/", "/delete/"), {"post": "yes"}).status_code == 403
    response = admin_client.post(f"{MESSAGES}?shard=11", action("delete_selected", [row_of(message).pk]), follow=True)
    assert response.status_code == 200
    row = row_of(message)
    assert row.body == {"title": "keep"} and not row.is_read


@in_db
def test_actions_need_the_change_permission(client, django_user_model, new_uid):
    message = store(uid_in_shard(new_uid, 12))
    viewer = django_user_model.objects.create_user("viewer", password="unused-password", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_pushmessage", "view_pushjob"]))
    client.force_login(viewer)
    page = client.get(MESSAGES, {"shard": 12})
    assert message.noce_ack in shown(page) and "resend_to_online" not in page.content.decode()
    assert "run_again" not in client.get(JOBS).content.decode()
    refused = client.post(f"{MESSAGES}?shard=12", action("resend_to_online", [row_of(message).pk]), follow=True)
    assert not any("went to users online" in m for m in page_messages(refused))


@in_db
def test_anonymous_users_are_sent_to_the_admin_login(client, new_uid):
    message = store(uid_in_shard(new_uid, 1))
    urls = [
        MESSAGES,
        f"{MESSAGES}?shard=1",
        f"{MESSAGES}?uid={message.to_uid}",
        f"{MESSAGES}?q={message.noce_ack}",
        detail_url(message),
        f"{MESSAGES}add/",
        JOBS,
        "/admin/",
    ]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url
    response = client.post(f"{MESSAGES}?shard=1", action("resend_to_online", [row_of(message).pk]))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


# --- actions through a real socket -----------------------------------------------


async def logged_in(connect: Callable[..., Any], uid: int) -> Any:
    sock = await connect()
    reply = await sock.login(f"key-{uid}")
    assert reply["code"] == 200, reply
    return sock


@database_sync_to_async
def stored(*messages: NewMessage) -> list[int]:
    messages_store(messages=list(messages))
    return [row_of(m).pk for m in messages]


@in_committed_db
async def test_resend_action_reaches_the_online_user_and_skips_read_rows(admin_client, connect, verifier, new_uid):
    uid = new_uid()
    sock = await logged_in(connect, uid)
    assert await sock.nothing()
    unread = NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={"title": "again"}, from_uid=3)
    read = NewMessage(to_uid=uid, msg_type=MsgType.COMMENT, body={"title": "seen"})
    ids = await stored(unread, read)
    await database_sync_to_async(messages_ack)(uid=uid, noce_acks=[read.noce_ack])

    post = database_sync_to_async(admin_client.post)
    response = await post(f"{MESSAGES}?uid={uid}", action("resend_to_online", ids), follow=True)
    assert response.status_code == 200
    frame = await sock.recv()
    assert frame["noce_ack"] == unread.noce_ack and frame["msg_type"] == MsgType.USER_NOTICE
    assert frame["uid"] == 3 and frame["body"] == {"to_uid": uid, "title": "again"}
    assert await sock.nothing()
    assert any("1 of 2 selected messages went to users online now" in m for m in page_messages(response))


@in_committed_db
async def test_resend_to_an_offline_user_sends_nothing(admin_client, new_uid):
    uid = new_uid()
    ids = await stored(NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={}))
    post = database_sync_to_async(admin_client.post)
    response = await post(f"{MESSAGES}?uid={uid}", action("resend_to_online", ids), follow=True)
    assert any("0 of 1 selected messages" in m for m in page_messages(response))


def inline_jobs_finished() -> None:
    """Wait until the inline runner has run everything queued so far.

    It is one thread taking jobs in order, so a no-op queued now runs after
    them. Polling the job row instead would race the runner for SQLite's
    shared-cache table locks in the embedded configuration.
    """
    services._inline_runner().submit(lambda: None).result(timeout=10)


@in_committed_db
def test_run_again_runs_a_failed_job_and_leaves_done_ones(admin_client, settings, new_uid):
    settings.PUSH_JOBS = "inline"
    uid = new_uid()
    failed = PushJob.objects.create(
        id=uuid.uuid4(), msg_type=int(MsgType.USER_NOTICE), body={"job": "again"}, uids=[uid], state=JobState.FAILED
    )
    done = PushJob.objects.create(id=uuid.uuid4(), msg_type=int(MsgType.COMMENT), body={}, state=JobState.DONE)
    listing = admin_client.get(JOBS, {"state__exact": "failed"}).context["cl"].result_list
    assert failed in listing and done not in listing

    assert admin_client.post(JOBS, action("run_again", [failed.pk, done.pk])).status_code == 302
    inline_jobs_finished()
    failed.refresh_from_db()
    assert (failed.state, failed.stored, failed.attempts) == (JobState.DONE, 1, 1)
    (row,) = message_model(shard_of(uid)).objects.filter(to_uid=uid)
    assert row.noce_ack == failed.noce_ack_for(uid) and row.body == {"job": "again"}
    done.refresh_from_db()
    assert done.attempts == 0
    notes = page_messages(admin_client.get(JOBS))
    assert any("1 job(s) queued to run again. 1 running or done job(s) left alone." in m for m in notes)


@in_db
def test_job_pages_are_read_only(admin_client, new_uid):
    job = PushJob.objects.create(id=uuid.uuid4(), msg_type=int(MsgType.COMMENT), body={"b": 1}, uids=[new_uid()])
    page = admin_client.get(JOBS, {"msg_type": "5"})
    assert job in page.context["cl"].result_list and "COMMENT" in page.content.decode()
    detail = admin_client.get(f"{JOBS}{job.pk}/change/")
    assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()
    assert admin_client.post(f"{JOBS}{job.pk}/change/", {"state": "done"}).status_code == 403
    assert admin_client.post(f"{JOBS}{job.pk}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.get(f"{JOBS}add/").status_code == 403
    job.refresh_from_db()
    assert job.state == JobState.PENDING
