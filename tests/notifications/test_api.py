"""The push API edge: signatures, bodies, limits and errors (PROTOCOL.md section 2)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from channels.db import database_sync_to_async

from notifications.models import PushJob
from notifications.sharding import shard_of, shard_table
from notifications.signing import sign

pytestmark = pytest.mark.django_db(transaction=True)

USER = "/api/notice/userMessage"
COMMENT = "/api/comment/message"
SYSTEM = "/api/notice/systemMessage"


async def test_user_message_is_stored_in_the_uid_shard_and_answered(api, rows, new_uid):
    uid = new_uid()
    status, answer = await api.post(USER, {"uids": [uid], "body": {"title": "hello", "n": 1}})
    assert status == 200
    assert answer["code"] == 200 and answer["msg"] == "SUCCESS"
    assert answer["data"]["stored"] == 1 and answer["data"]["sent"] == 0
    stored = await rows(uid)
    assert len(stored) == 1
    row = stored[0]
    assert row._meta.db_table == shard_table(uid % 128) == shard_table(shard_of(uid))
    assert row.msg_type == 7 and row.from_uid == 0 and row.body == {"title": "hello", "n": 1}
    assert not row.is_sent and not row.is_read
    assert answer["data"]["noce_acks"] == {str(uid): row.noce_ack}


async def test_uid_in_place_of_uids(api, rows, new_uid):
    uid = new_uid()
    status, answer = await api.post(USER, {"uid": uid, "body": {}})
    assert status == 200 and answer["data"]["stored"] == 1
    assert len(await rows(uid)) == 1


async def test_comment_carries_sender_and_type_5(api, rows, new_uid):
    uid, sender = new_uid(), new_uid()
    status, _ = await api.post(COMMENT, {"uids": [uid], "from_uid": sender, "body": {"text": "nice"}})
    assert status == 200
    (row,) = await rows(uid)
    assert row.msg_type == 5 and row.from_uid == sender


async def test_duplicate_uids_store_one_message_each(api, rows, new_uid):
    uid = new_uid()
    status, answer = await api.post(USER, {"uids": [uid, uid, uid], "body": {}})
    assert status == 200 and answer["data"]["stored"] == 1
    assert len(await rows(uid)) == 1


async def test_many_uids_spread_over_their_shards(api, rows, new_uid):
    uids = [new_uid() for _ in range(40)]
    status, answer = await api.post(USER, {"uids": uids, "body": {"k": "v"}})
    assert status == 200 and answer["data"]["stored"] == 40
    for uid in uids:
        (row,) = await rows(uid)
        assert row._meta.db_table == f"user_push_msg_{uid % 128}"
    assert len({uid % 128 for uid in uids}) > 1


async def test_push_config_from_a_named_host_is_cacheable_privately(api, settings):
    settings.ALLOWED_HOSTS = ["testserver"]
    status, answer = await api.call("GET", "/api/push/config", sign=False)
    assert status == 200
    assert answer["ws_url"] == "ws://testserver/ws/push/"
    assert answer["heartbeat"] == 180 and answer["reconnect_delays"] == [60, 120, 180]
    headers = await config_headers()
    assert headers[b"Access-Control-Allow-Origin"] == b"*"
    assert b"max-age=300" in headers[b"Cache-Control"] and b"private" in headers[b"Cache-Control"]
    assert b"public" not in headers[b"Cache-Control"] and b"Host" in headers[b"Vary"]


async def test_push_config_from_the_public_url_is_public(api, settings):
    settings.PUSH_WS_PUBLIC_URL = "wss://push.example.com/ws/push/"
    status, answer = await api.call("GET", "/api/push/config", sign=False, headers={"Host": "evil.example"})
    assert status == 200 and answer["ws_url"] == "wss://push.example.com/ws/push/"
    headers = await config_headers()
    assert b"public" in headers[b"Cache-Control"] and b"max-age=300" in headers[b"Cache-Control"]


async def test_push_config_never_names_a_host_only_a_wildcard_allows(settings):
    from channels.testing import HttpCommunicator

    from pushsite.asgi import application

    settings.ALLOWED_HOSTS = ["*"]
    settings.PUSH_WS_PUBLIC_URL = ""
    communicator = HttpCommunicator(application, "GET", "/api/push/config", headers=[(b"host", b"evil.example")])
    response = await communicator.get_response()
    assert response["status"] == 400, response
    assert b"evil.example" not in response["body"]
    assert b"public" not in dict(response["headers"]).get(b"Cache-Control", b"")


async def config_headers() -> dict[bytes, bytes]:
    from channels.testing import HttpCommunicator

    from pushsite.asgi import application

    communicator = HttpCommunicator(application, "GET", "/api/push/config", headers=[(b"host", b"testserver")])
    response = await communicator.get_response()
    return dict(response["headers"])


# --- signatures -----------------------------------------------------------------


@database_sync_to_async
def nothing_stored_for(uid: int) -> bool:
    from notifications.sharding import model_for_uid

    return not model_for_uid(uid).objects.filter(to_uid=uid).exists()


async def test_missing_signature_is_401_and_stores_nothing(api, new_uid):
    uid = new_uid()
    status, answer = await api.post(USER, {"uids": [uid], "body": {}}, sign=False)
    assert status == 401 and answer["code"] == 401
    assert "X-Push-Signature" in answer["msg"]
    assert await nothing_stored_for(uid)


async def test_wrong_secret_is_401(api, new_uid):
    uid = new_uid()
    status, answer = await api.post(USER, {"uids": [uid], "body": {}}, secret="not-the-secret")
    assert status == 401 and "does not match" in answer["msg"]
    assert await nothing_stored_for(uid)


async def test_signature_of_another_body_is_401(api, new_uid, settings):
    uid = new_uid()
    body = json.dumps({"uids": [uid], "body": {}}).encode()
    ts = str(int(time.time()))
    forged = sign(settings.PUSH_API_SECRET, ts, b'{"uids": [1], "body": {}}')
    status, _ = await api.post(USER, raw=body, sign=False, headers={"X-Push-Timestamp": ts, "X-Push-Signature": forged})
    assert status == 401
    assert await nothing_stored_for(uid)


@pytest.mark.parametrize("skew", [-310, 310, 100_000])
async def test_timestamp_outside_the_window_is_401(api, new_uid, settings, skew):
    uid = new_uid()
    body = json.dumps({"uids": [uid], "body": {}}).encode()
    ts = str(int(time.time()) + skew)
    status, answer = await api.post(
        USER,
        raw=body,
        sign=False,
        headers={"X-Push-Timestamp": ts, "X-Push-Signature": sign(settings.PUSH_API_SECRET, ts, body)},
    )
    assert status == 401 and "300" in answer["msg"]
    assert await nothing_stored_for(uid)


async def test_timestamp_inside_the_window_is_accepted(api, new_uid, settings):
    uid = new_uid()
    body = json.dumps({"uids": [uid], "body": {}}).encode()
    ts = str(int(time.time()) - 250)
    status, _ = await api.post(
        USER,
        raw=body,
        sign=False,
        headers={"X-Push-Timestamp": ts, "X-Push-Signature": sign(settings.PUSH_API_SECRET, ts, body)},
    )
    assert status == 200


async def test_truncated_signature_is_401(api, new_uid, settings):
    uid = new_uid()
    body = json.dumps({"uids": [uid], "body": {}}).encode()
    ts = str(int(time.time()))
    status, _ = await api.post(
        USER,
        raw=body,
        sign=False,
        headers={"X-Push-Timestamp": ts, "X-Push-Signature": sign(settings.PUSH_API_SECRET, ts, body)[:40]},
    )
    assert status == 401


# --- bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "fragment"),
    [
        (USER, {"uids": [], "body": {}}, "empty"),
        (USER, {"uids": [-5], "body": {}}, "uids.0"),
        (USER, {"uids": [0], "body": {}}, "uids.0"),
        (USER, {"uids": ["12"], "body": {}}, "uids.0"),
        (USER, {"uids": [1.5], "body": {}}, "uids.0"),
        (USER, {"uids": [True], "body": {}}, "uids.0"),
        (USER, {"uids": [2**64], "body": {}}, "uids.0"),
        (USER, {"uids": 7, "body": {}}, "uids"),
        (USER, {"uid": -1, "body": {}}, "uid"),
        (USER, {"body": {}}, "exactly one"),
        (USER, {"uid": 1, "uids": [2], "body": {}}, "exactly one"),
        (USER, {"uids": [1]}, "body: required"),
        (USER, {"uids": [1], "body": "text"}, "body"),
        (USER, {"uids": [1], "body": {}, "extra": 1}, "extra: unknown field"),
        (USER, {"uids": [1], "body": {"x": "y" * 17000}}, "larger than"),
        (COMMENT, {"uids": [1], "body": {}}, "from_uid: required"),
        (COMMENT, {"uids": [1], "from_uid": 0, "body": {}}, "from_uid"),
        (SYSTEM, {}, "body: required"),
        (SYSTEM, {"body": []}, "body"),
    ],
)
async def test_bad_bodies_get_400_naming_the_problem(api, path, payload, fragment):
    status, answer = await api.post(path, payload)
    assert status == 400 and answer["code"] == 400
    assert fragment in answer["msg"], answer["msg"]


async def test_too_many_uids_is_400(api, settings):
    settings.PUSH_API_MAX_UIDS = 50
    status, answer = await api.post(USER, {"uids": list(range(1, 52)), "body": {}})
    assert status == 400 and "more than 50" in answer["msg"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [(b"", "empty"), (b"{not json", "not valid JSON"), (b"[1,2]", "JSON object"), (b'"x"', "JSON object")],
)
async def test_non_json_bodies_get_400(api, raw, fragment):
    status, answer = await api.post(USER, raw=raw)
    assert status == 400 and fragment in answer["msg"]


async def test_oversized_request_is_413_and_stores_nothing(api, new_uid):
    uid = new_uid()
    raw = json.dumps({"uids": [uid], "body": {"pad": "x" * (1024 * 1024 + 10)}}).encode()
    status, answer = await api.post(USER, raw=raw)
    assert status == 413 and answer["code"] == 413
    assert await nothing_stored_for(uid)


async def test_unknown_api_path_is_404_json(api):
    status, answer = await api.post("/api/notice/nothingHere", {"body": {}})
    assert status == 404 and answer["code"] == 404 and "/api/notice/nothingHere" in answer["msg"]


@pytest.mark.parametrize("path", [USER, COMMENT, SYSTEM])
async def test_wrong_method_is_405_json(api, path):
    status, answer = await api.call("GET", path)
    assert status == 405 and answer["code"] == 405 and "POST" in answer["msg"]


async def test_job_status_needs_a_signature_and_an_existing_job(api):
    status, _ = await api.call("GET", "/api/push/jobs/123", sign=False)
    assert status == 401
    status, answer = await api.call("GET", "/api/push/jobs/not-a-uuid")
    assert status == 404 and answer["code"] == 404


@database_sync_to_async
def job_count() -> int:
    return PushJob.objects.count()


async def test_push_to_many_uids_becomes_a_job_answered_202(api, settings, new_uid):
    settings.PUSH_API_INLINE_MAX_UIDS = 3
    settings.PUSH_JOBS = "inline"
    before = await job_count()
    uids = [new_uid() for _ in range(5)]
    status, answer = await api.post(USER, {"uids": uids, "body": {"big": True}})
    assert status == 202 and answer["code"] == 202 and answer["msg"] == "ACCEPTED"
    assert answer["data"]["uids"] == 5
    assert await job_count() == before + 1
    # Let the job's thread finish before the test's tables are flushed.
    job_id = answer["data"]["job_id"]
    for _ in range(100):
        if await database_sync_to_async(lambda: PushJob.objects.get(id=job_id).state)() == "done":
            break
        await asyncio.sleep(0.05)


async def test_push_api_refuses_a_host_not_allowed_and_stores_nothing(api, settings, new_uid):
    # The push endpoints skip Django's request cycle (PushApiApp); its Host check must stay.
    settings.ALLOWED_HOSTS = ["testserver"]
    uid = new_uid()
    status, answer = await api.post(USER, {"uid": uid, "body": {}}, headers={"host": "evil.example"})
    assert status == 400 and answer["code"] == 400
    assert await nothing_stored_for(uid)
    status, _ = await api.post(USER, {"uid": uid, "body": {}})
    assert status == 200


async def test_push_api_answer_has_a_length_so_connections_are_kept(new_uid):
    from channels.testing import HttpCommunicator
    from django.conf import settings

    from notifications.signing import signed_headers
    from pushsite.asgi import application

    body = json.dumps({"uid": new_uid(), "body": {}}).encode()
    headers = {"host": "testserver", **signed_headers(settings.PUSH_API_SECRET, body)}
    communicator = HttpCommunicator(
        application, "POST", USER, body=body, headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()]
    )
    response = await communicator.get_response(timeout=10)
    sent = dict(response["headers"])
    assert response["status"] == 200
    assert int(sent[b"Content-Length"]) == len(response["body"])
    assert sent[b"Content-Type"] == b"application/json"


async def test_django_route_of_the_push_api_answers_as_the_fast_path(rows, new_uid):
    """The URL routes stay for anything that calls Django directly; same checks, same answer."""
    from channels.testing import HttpCommunicator
    from django.conf import settings

    from notifications.signing import signed_headers
    from pushsite.asgi import django_asgi_app

    uid = new_uid()
    body = json.dumps({"uid": uid, "body": {"via": "django"}}).encode()

    async def post(headers: dict[str, str]) -> tuple[int, dict]:
        headers = {"host": "testserver", "content-type": "application/json", **headers}
        communicator = HttpCommunicator(
            django_asgi_app,
            "POST",
            USER,
            body=body,
            headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()],
        )
        response = await communicator.get_response(timeout=10)
        return response["status"], json.loads(response["body"])

    status, answer = await post({})
    assert status == 401 and answer["code"] == 401
    status, answer = await post(signed_headers(settings.PUSH_API_SECRET, body))
    assert status == 200 and answer["data"]["stored"] == 1
    (row,) = await rows(uid)
    assert row.body == {"via": "django"} and answer["data"]["noce_acks"] == {str(uid): row.noce_ack}


# --- bodies the store cannot hold -----------------------------------------------


def nested(depth: int) -> dict:
    """A body whose own nesting is ``depth`` objects."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_a_body_nested_40_deep_is_400_and_stores_nothing(api, new_uid, settings):
    uid = new_uid()
    status, answer = await api.post(USER, {"uids": [uid], "body": nested(40)})
    assert status == 400 and answer["code"] == 400
    assert f"deeper than {settings.PUSH_MAX_JSON_DEPTH}" in answer["msg"], answer["msg"]
    assert await nothing_stored_for(uid)


async def test_a_body_at_the_depth_limit_is_stored(api, new_uid, settings, rows):
    uid = new_uid()
    # The request object is depth 1, so its body may be one level less deep.
    status, answer = await api.post(USER, {"uids": [uid], "body": nested(settings.PUSH_MAX_JSON_DEPTH - 1)})
    assert status == 200, answer
    assert not await nothing_stored_for(uid)


async def test_a_row_the_database_refuses_is_not_a_503(api, new_uid, settings):
    from django.db import connection

    # Let a 40-deep body past the edge, so the database itself judges it.
    settings.PUSH_MAX_JSON_DEPTH = 100
    uid = new_uid()
    status, answer = await api.post(USER, {"uids": [uid], "body": nested(40)})
    assert status != 503, answer
    if connection.vendor == "mysql":
        # MariaDB's JSON_VALID check refuses it (error 4025): the sender's fault.
        assert status == 400 and "database refused" in answer["msg"], answer
        assert await nothing_stored_for(uid)
    else:
        assert status == 200, answer


@pytest.mark.parametrize(
    "raw",
    [
        b'{"uids": [1], "uids": [2], "body": {}}',
        b'{"uids": [1], "body": {"title": "a", "title": "b"}}',
        b'{"uids": [1], "body": {"deep": {"k": 1, "k": 2}}}',
    ],
)
async def test_duplicate_keys_in_a_body_get_400_and_store_nothing(api, raw):
    # uids 1 and 2 are everybody's: count what they hold rather than expect nothing.
    before = await stored_count(1), await stored_count(2)
    status, answer = await api.post(USER, raw=raw)
    assert status == 400 and "duplicate key" in answer["msg"], answer
    assert (await stored_count(1), await stored_count(2)) == before


@database_sync_to_async
def stored_count(uid: int) -> int:
    from notifications.sharding import model_for_uid

    return model_for_uid(uid).objects.filter(to_uid=uid).count()
