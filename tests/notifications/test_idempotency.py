"""Exactly-once pushes (PROTOCOL.md section 6): retries and replays store nothing.

The in-process tests run in both configurations; the ones across real
daphne nodes and an API node need MariaDB and Redis.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
import redis
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from notifications.client import PushClient, PushError
from notifications.idempotency import push_requests_purge
from notifications.models import JobState, PushJob, PushRequest
from notifications.signing import signed_headers
from tests.servers import api_node, daphne

pytestmark = pytest.mark.django_db(transaction=True)

USER = "/api/notice/userMessage"
SYSTEM = "/api/notice/systemMessage"


def resigned(body: dict, *, later: float = 0.0, key: str | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    headers = signed_headers(settings.PUSH_API_SECRET, raw, now=time.time() + later)
    if key is not None:
        headers["Idempotency-Key"] = key
    return raw, headers


async def test_a_replayed_signed_request_stores_nothing(api, rows, new_uid):
    uid = new_uid()
    raw, headers = resigned({"uids": [uid], "body": {"n": 1}})
    answers = [await api.post(USER, raw=raw, sign=False, headers=headers) for _ in range(3)]
    assert [status for status, _ in answers] == [200, 200, 200]
    first = answers[0][1]["data"]
    assert "duplicate" not in first
    for _, answer in answers[1:]:
        assert answer["data"] == {**first, "duplicate": True}
    assert len(await rows(uid)) == 1


async def test_a_keyed_retry_signed_again_later_stores_one_row_with_the_same_noce_acks(api, rows, new_uid):
    uid = new_uid()
    body = {"uids": [uid], "body": {"n": 2}}
    raw, headers = resigned(body, key="order-17:notice")
    status, first = await api.post(USER, raw=raw, sign=False, headers=headers)
    raw, headers = resigned(body, later=2, key="order-17:notice")
    status_again, again = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert (status, status_again) == (200, 200)
    assert again["data"] == {**first["data"], "duplicate": True}
    (row,) = await rows(uid)
    assert row.noce_ack == first["data"]["noce_acks"][str(uid)]


async def test_the_same_key_with_another_body_gets_409_and_stores_nothing(api, rows, new_uid):
    uid, other = new_uid(), new_uid()
    raw, headers = resigned({"uids": [uid], "body": {"n": 3}}, key="k-409")
    assert (await api.post(USER, raw=raw, sign=False, headers=headers))[0] == 200
    raw, headers = resigned({"uids": [other], "body": {"n": 3}}, key="k-409")
    status, answer = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert (status, answer["code"]) == (409, 409), answer
    assert len(await rows(uid)) == 1
    assert await rows(other) == []


@pytest.mark.parametrize("key", ["", "has space", "x" * 101, "semi;colon", "slash/"])
async def test_a_malformed_key_gets_400_and_stores_nothing(api, rows, new_uid, key):
    uid = new_uid()
    raw, headers = resigned({"uids": [uid], "body": {"n": 4}}, key=key)
    status, answer = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert (status, answer["code"]) == (400, 400), answer
    assert "Idempotency-Key" in answer["msg"]
    assert await rows(uid) == []


async def test_a_refused_request_does_not_use_up_its_key(api, rows, new_uid):
    uid = new_uid()
    raw, headers = resigned({"uids": [uid]}, key="k-refused")  # no body: 400
    assert (await api.post(USER, raw=raw, sign=False, headers=headers))[0] == 400
    raw, headers = resigned({"uids": [uid], "body": {"n": 5}}, key="k-refused")
    status, answer = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert status == 200 and "duplicate" not in answer["data"], answer
    assert len(await rows(uid)) == 1


@database_sync_to_async
def job_of(job_id: str) -> PushJob:
    return PushJob.objects.get(id=job_id)


@database_sync_to_async
def forget_requests() -> int:
    return PushRequest.objects.all().delete()[0]


async def test_a_keyed_job_retried_gives_one_row_per_user_even_with_its_claim_gone(api, rows, new_uid, settings):
    settings.PUSH_JOBS = "inline"
    uids = [new_uid() for _ in range(150)]
    body = {"uids": uids, "body": {"n": 6}}
    raw, headers = resigned(body, key="k-job")
    status, first = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert status == 202, first
    job_id = first["data"]["job_id"]
    deadline = time.monotonic() + 20
    while (await job_of(job_id)).state != JobState.DONE and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    raw, headers = resigned(body, later=1, key="k-job")
    status, again = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert (status, again["data"]) == (202, {**first["data"], "duplicate": True})
    # The last line of defence: with every claim gone, the retry derives the
    # same job id, finds that job and stores nothing new.
    assert await forget_requests() >= 1
    raw, headers = resigned(body, later=2, key="k-job")
    status, third = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert (status, third["data"]["job_id"]) == (202, job_id)
    await asyncio.sleep(0.3)
    for uid in uids:
        assert len(await rows(uid)) == 1, uid
    assert (await job_of(job_id)).stored == 150


@database_sync_to_async
def abandon_claims(older_by: int) -> int:
    return PushRequest.objects.update(status=None, answer=None, created_at=timezone.now() - timedelta(seconds=older_by))


async def test_an_abandoned_claim_is_taken_over_and_stores_nothing_twice(api, rows, new_uid, settings):
    # A node that stored a push and died before recording the answer leaves
    # an unanswered claim; a retry after the claim timeout runs again under
    # the same derived noce_acks.
    uids = [new_uid(), new_uid()]
    body = {"uids": uids, "body": {"n": 7}}
    raw, headers = resigned(body, key="k-abandoned")
    status, first = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert status == 200
    await abandon_claims(settings.PUSH_IDEMPOTENCY_CLAIM_TIMEOUT + 5)
    raw, headers = resigned(body, later=1, key="k-abandoned")
    status, again = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert status == 200 and "duplicate" not in again["data"], again
    assert again["data"]["noce_acks"] == first["data"]["noce_acks"]
    assert again["data"]["stored"] == 0
    for uid in uids:
        assert len(await rows(uid)) == 1


async def test_a_retry_waits_for_the_first_request_still_being_answered(api, new_uid, settings):
    settings.PUSH_IDEMPOTENCY_WAIT = 0.3
    uid = new_uid()
    body = {"uids": [uid], "body": {"n": 8}}
    raw, headers = resigned(body, key="k-inflight")
    assert (await api.post(USER, raw=raw, sign=False, headers=headers))[0] == 200
    await abandon_claims(0)  # answered by no one yet, and not abandoned
    status, answer = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert (status, answer["code"]) == (503, 503), answer
    assert "still being answered" in answer["msg"]


@database_sync_to_async
def purge_case() -> tuple[int, set[str]]:
    now = timezone.now()
    for key, age in [("key:fresh", 10), ("key:old", settings.PUSH_IDEMPOTENCY_TTL + 10), ("sig:fresh", 10),
                     ("sig:old", 2 * settings.PUSH_API_MAX_SKEW + 10)]:  # fmt: skip
        PushRequest.objects.create(scope=USER, key=key, fingerprint="f", created_at=now - timedelta(seconds=age))
    deleted = push_requests_purge()
    return deleted, set(PushRequest.objects.values_list("key", flat=True))


async def test_expired_claims_are_purged_and_fresh_ones_kept():
    assert await purge_case() == (2, {"key:fresh", "sig:fresh"})


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis (the real configuration)")
async def test_a_keyed_retry_after_redis_lost_everything_still_stores_one_row(api, rows, new_uid):
    uid = new_uid()
    body = {"uids": [uid], "body": {"n": 9}}
    raw, headers = resigned(body, key="k-redis")
    status, first = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert status == 200
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    raw, headers = resigned(body, later=1, key="k-redis")
    status, again = await api.post(USER, raw=raw, sign=False, headers=headers)
    assert (status, again["data"]) == (200, {**first["data"], "duplicate": True})
    assert len(await rows(uid)) == 1


# --- across real processes ---------------------------------------------------------


def post(port: int, raw: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{USER}",
        data=raw,
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def nodes(verifier):
    if not (settings.REDIS_URL and settings.DATABASE_URL):
        pytest.skip("needs MariaDB and Redis (the real configuration)")
    started = [daphne("idem-a", PUSH_JOBS="inline"), daphne("idem-b", PUSH_JOBS="inline"), api_node("idem-api")]
    try:
        for node in started:
            node.start()
        yield started
    finally:
        for node in started:
            node.stop()


@pytest.mark.slow
async def test_replays_sent_to_every_node_store_one_row(nodes, rows, new_uid):
    uid = new_uid()
    raw, headers = resigned({"uids": [uid], "body": {"n": 10}})
    answers = [await asyncio.to_thread(post, node.port, raw, headers) for node in nodes for _ in range(3)]
    assert {status for status, _ in answers} == {200}, answers
    assert sum("duplicate" not in answer["data"] for _, answer in answers) == 1
    assert len({json.dumps(answer["data"]["noce_acks"]) for _, answer in answers}) == 1
    assert len(await rows(uid)) == 1


@pytest.mark.slow
async def test_twenty_simultaneous_keyed_requests_over_two_nodes_store_one_row(nodes, rows, new_uid):
    uid = new_uid()
    body = {"uids": [uid], "body": {"n": 11}}
    requests = [resigned(body, later=i % 3, key="k-twenty") for i in range(20)]
    answers = await asyncio.gather(
        *(asyncio.to_thread(post, nodes[i % 2].port, raw, headers) for i, (raw, headers) in enumerate(requests))
    )
    assert {status for status, _ in answers} == {200}, answers
    assert sum("duplicate" not in answer["data"] for _, answer in answers) == 1
    assert len({json.dumps(answer["data"]["noce_acks"]) for _, answer in answers}) == 1
    assert len(await rows(uid)) == 1


class FlakyApi(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first two attempts of every push, then 200; remembers each attempt's key."""

    keys: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        key = self.headers["Idempotency-Key"]
        self.keys.append(key)
        status = 503 if self.keys.count(key) <= 2 else 200
        body = json.dumps({"code": status, "msg": "x", "data": {}}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_client_retries_a_503_under_the_same_key_and_a_new_push_gets_a_new_one():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = PushClient(f"http://127.0.0.1:{server.server_port}", secret="s", backoff=0.01)
        assert client.user_message([1], {"n": 1})["code"] == 200
        assert client.user_message([1], {"n": 2})["code"] == 200
        first, second = FlakyApi.keys[0], FlakyApi.keys[3]
        assert FlakyApi.keys == [first] * 3 + [second] * 3 and first != second
        with pytest.raises(PushError) as refused:
            PushClient(f"http://127.0.0.1:{server.server_port}", secret="s", retries=1, backoff=0.01).user_message(
                [1], {"n": 3}
            )
        assert refused.value.status == 503
    finally:
        server.shutdown()
