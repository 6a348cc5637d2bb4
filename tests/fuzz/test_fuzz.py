"""Fuzzing the two edges: every push API body, and frames over a live socket.

Invariants guarded here:
* the push API answers any body of userMessage, comment/message and
  systemMessage with 200, 202 or 400 only: never 500, never 503 (the backends
  are up), and always the contract's JSON ``{"code": <the HTTP status>, "msg"}``;
* a 400 stores nothing: no message row for any uid named in the body and no
  job; a 200 stores one row per distinct target;
* a real daphne answers every frame, whatever its bytes, with exactly one
  server frame of the seven fields and a msg_type in 1..10, never sends a
  traceback, keeps the socket open and still answers a heartbeat at the end;
  its log holds no traceback either.

The suite runs the "default" Hypothesis profile (tests/conftest.py); the long
run (10,000 examples per property) is

    HYPOTHESIS_PROFILE=long .venv/bin/pytest --timeout 0 tests/fuzz tests/connections/test_protocol.py
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from notifications import services
from notifications.models import JobState, PushJob
from notifications.sharding import model_for_uid
from tests.conftest import VERIFY_TOKEN
from tests.servers import configuration_environment, daphne_with, prepare_server_database

pytestmark = pytest.mark.django_db(transaction=True)

USER = "/api/notice/userMessage"
COMMENT = "/api/comment/message"
SYSTEM = "/api/notice/systemMessage"
MAX_UID = 2**63 - 1
SERVER_FIELDS = ["msg_type", "code", "msg", "uid", "body", "noce_ack", "seq"]

# Function-scoped fixtures (the API client, the server, the socket) hold no
# state an example could spoil for the next: sharing them is the point.
fixtures_shared = hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- strategies ---------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
)
uid_like = (
    st.integers(min_value=1, max_value=MAX_UID)
    | st.sampled_from([0, -1, MAX_UID, MAX_UID + 1, 2**64, True, False, 1.0, "1", None])
    | json_values
)
bodies = st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values


valid_uids = st.lists(st.integers(min_value=1, max_value=MAX_UID), min_size=1, max_size=6)
valid_bodies = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@st.composite
def near_valid(draw: st.DrawFn, path: str) -> dict[str, Any]:
    """A valid body for the path, then none, one or two fields dropped, spoiled or added."""
    payload: dict[str, Any] = {"body": draw(valid_bodies)}
    if path != SYSTEM:
        if draw(st.booleans()):
            payload["uids"] = draw(valid_uids)
        else:
            payload["uid"] = draw(st.integers(min_value=1, max_value=MAX_UID))
        if path == COMMENT or draw(st.booleans()):
            payload["from_uid"] = draw(st.integers(min_value=path == COMMENT, max_value=MAX_UID))
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(["uids", "uid", "from_uid", "body", "extra"]))
        how = draw(st.sampled_from(["drop", "spoil", "spoil"]))
        if how == "drop":
            payload.pop(field, None)
        elif field == "body":
            payload["body"] = draw(bodies)
        elif field == "extra":
            payload[draw(st.text(max_size=6))] = draw(json_values)
        else:
            payload[field] = draw(st.lists(uid_like, max_size=6) | uid_like)
    return payload


# Raw request bodies JSON encoders never produce, but a caller's bytes may hold.
raw_bodies = st.sampled_from(
    [
        b'{"uid": 1, "body": {"x": NaN}}',
        b'{"uid": 1, "body": {"x": Infinity}}',
        b'{"uid": 1, "body": {"x": -Infinity}}',
        b'{"uid": 1, "body": {"x": 1e400}}',
        b'{"uid": 1, "body": {"x": "\\ud800"}}',
        b'{"uid": 1, "body": {"\\udfff": 1}}',
        b'{"uid": 1, "uid": 2, "body": {}}',
        b'{"uid": 1, "body": {}, "from_uid": 7}  trailing',
        b"\xef\xbb\xbf{}",
        b"\xff\xfe{\x00}\x00",
        b"[" * 50_000,
        b'{"body":' * 5_000,
        b"",
        b"null",
    ]
) | st.binary(max_size=64)


def payload_uids(payload: Any) -> list[int]:
    """Every uid a payload names that could have a row."""
    if not isinstance(payload, dict):
        return []
    found = payload.get("uids") if isinstance(payload.get("uids"), list) else []
    found = [*found, payload.get("uid")]
    return sorted({u for u in found if type(u) is int and 1 <= u <= MAX_UID})


@database_sync_to_async
def stored_counts(uids: list[int]) -> tuple[dict[int, int], int]:
    return {uid: model_for_uid(uid).objects.filter(to_uid=uid).count() for uid in uids}, PushJob.objects.count()


@database_sync_to_async
def job_state(job_id: str) -> str:
    return PushJob.objects.get(id=job_id).state


async def job_finished(job_id: str) -> None:
    """Wait for an accepted job, so its rows do not land during a later example.

    Without polling its row: SQLite's shared in-memory database refuses, rather
    than waits for, a write to a table another connection reads. The inline
    runner is one thread, first in first out, so once a no-op queued after the
    job has run, the job is over.
    """
    await asyncio.wrap_future(services._inline_runner().submit(lambda: None))
    assert await job_state(job_id) == JobState.DONE


async def check_answer(api: Any, path: str, payload: Any = None, *, raw: bytes | None = None) -> int:
    if raw is not None:
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):
            payload = None
    uids = payload_uids(payload)
    before, jobs_before = await stored_counts(uids)
    status, answer = await api.post(path, payload, raw=raw)
    event(f"HTTP {status}")
    assert status in (200, 202, 400), (status, answer)
    assert answer["code"] == status and isinstance(answer["msg"], str) and answer["msg"], answer
    assert "Traceback" not in json.dumps(answer)
    if status == 202:
        await job_finished(answer["data"]["job_id"])
    after, jobs_after = await stored_counts(uids)
    if status in (200, 202) and answer["data"].get("duplicate"):
        # The same body signed in the same second (hypothesis replays an
        # example at once) is a replay (PROTOCOL.md section 6): nothing new.
        assert (after, jobs_after) == (before, jobs_before), answer
    elif status == 400:
        assert (after, jobs_after) == (before, jobs_before), answer
    elif status == 202:
        assert jobs_after == jobs_before + 1
        assert all(after[uid] == before[uid] + 1 for uid in uids), (before, after)
    else:
        assert answer["data"]["stored"] == len(uids)
        assert all(after[uid] == before[uid] + 1 for uid in uids), (before, after)
    return status


@pytest.fixture
def jobs_inline(settings: Any) -> None:
    """Accepted jobs run in this process (no worker here), a few uids already make one."""
    settings.PUSH_JOBS = "inline"
    settings.PUSH_API_INLINE_MAX_UIDS = 3


# --- the push API -------------------------------------------------------------


@fixtures_shared
@given(path=st.sampled_from([USER, COMMENT, SYSTEM]), payload=json_values)
async def test_any_json_value_as_a_body_is_answered_without_a_server_error(api, jobs_inline, path, payload):
    await check_answer(api, path, payload)


@fixtures_shared
@given(data=st.data())
async def test_near_valid_bodies_are_stored_whole_or_refused_with_nothing_stored(api, jobs_inline, data):
    path = data.draw(st.sampled_from([USER, COMMENT, SYSTEM]), label="path")
    await check_answer(api, path, data.draw(near_valid(path), label="payload"))


@fixtures_shared
@given(path=st.sampled_from([USER, COMMENT, SYSTEM]), raw=raw_bodies)
async def test_raw_bytes_that_are_not_json_are_refused_with_400(api, jobs_inline, path, raw):
    status = await check_answer(api, path, raw=raw)
    assert status in (200, 400)  # the one 200: the first of a repeated key is not a job


# --- strict JSON: nesting depth and duplicate keys ----------------------------


@st.composite
def nested_value(draw: st.DrawFn, depth: int) -> Any:
    """A JSON value exactly ``depth`` containers deep, each an object or a list."""
    value: Any = draw(st.sampled_from([{}, [], {"k": 1}, [1]]))
    for _ in range(depth - 1):
        value = {draw(st.sampled_from(["a", "b", "x"])): value} if draw(st.booleans()) else [value]
    return value


@st.composite
def with_duplicate_key(draw: st.DrawFn, payload: dict[str, Any]) -> bytes:
    """The payload's JSON with one key of one object written a second time."""
    text = json.dumps(payload, separators=(",", ":"))
    # The outer object or the body: a "{" found by scanning may sit inside a string.
    spots = [0, text.index('"body":{') + len('"body":')]
    spot = draw(st.sampled_from(spots))
    _, key_end = json.JSONDecoder().raw_decode(text, spot + 1)
    key = text[spot + 1 : key_end]
    extra = draw(st.sampled_from(["1", "null", '"x"', "{}"]))
    return (text[: spot + 1] + f"{key}:{extra}," + text[spot + 1 :]).encode()


@fixtures_shared
@given(depth=st.integers(min_value=1, max_value=60), data=st.data())
async def test_a_body_is_stored_up_to_the_depth_limit_and_refused_past_it(api, jobs_inline, depth, data):
    uid = data.draw(st.integers(min_value=10**12, max_value=10**13), label="uid")
    payload = {"uids": [uid], "body": {"v": data.draw(nested_value(depth), label="v")}}
    status = await check_answer(api, USER, payload)
    # The request is depth 1, its body 2, and "v" in it 3 onward.
    assert status == (200 if depth + 2 <= settings.PUSH_MAX_JSON_DEPTH else 400), (depth, status)


@fixtures_shared
@given(data=st.data())
async def test_a_duplicate_key_anywhere_in_a_body_is_400_and_stores_nothing(api, jobs_inline, data):
    uid = data.draw(st.integers(min_value=10**12, max_value=10**13), label="uid")
    body = data.draw(st.dictionaries(st.sampled_from(["t", "u", "n"]), json_values, min_size=1, max_size=3))
    payload = {"uids": [uid], "body": body}
    raw = data.draw(with_duplicate_key(payload), label="raw")
    before, _ = await stored_counts([uid])
    status, answer = await api.post(USER, raw=raw)
    assert status == 400 and "duplicate key" in answer["msg"], (raw[:200], answer)
    assert (await stored_counts([uid]))[0] == before


# --- a live socket ------------------------------------------------------------


@pytest.fixture
def fuzz_server(verify_server):
    env = configuration_environment(
        Path(tempfile.mkdtemp(prefix="pushsite-fuzz-")), verify_url=verify_server.url, verify_token=VERIFY_TOKEN
    )
    # The rate limit is proved elsewhere; here every frame must reach the parser.
    env.update(
        {"PUSH_FRAME_RATE": "100000", "PUSH_FRAME_BURST": "100000", "PUSH_REDIS_PREFIX": settings.PUSH_REDIS_PREFIX}
    )
    prepare_server_database(env)
    node = daphne_with("daphne-fuzz", env)
    node.start()
    yield node
    node.stop()


@pytest.fixture
def live_socket(fuzz_server):
    with ws_connect(f"ws://127.0.0.1:{fuzz_server.port}/ws/push/", max_size=None, open_timeout=10) as ws:
        yield ws


actions = st.sampled_from(["login", "logout", "heartbeat", "ack", "unread"]) | st.text(max_size=8) | json_values
frame_bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "ukey": st.integers(1, 10**6).map(lambda n: f"key-{n}") | json_values,
            "token": json_values,
            "noce_ack": json_values,
            "noce_acks": st.lists(st.text(max_size=70), max_size=5) | json_values,
            "limit": st.integers(-5, 300) | json_values,
            "msg_type": st.integers(0, 12) | json_values,
        },
    )
    | json_values
)
frame_objects = st.fixed_dictionaries(
    {},
    optional={
        "action": actions,
        "body": frame_bodies,
        "seq": st.integers(-1, 2**60) | json_values,
        "extra": json_values,
    },
)
frames = (
    frame_objects.map(lambda f: json.dumps(f, ensure_ascii=False))
    | frame_objects.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text(max_size=200)
    | st.binary(max_size=200)
    # Over the 64 KiB frame limit (413), well under what the server drops (1 MiB).
    | st.integers(min_value=65_537, max_value=300_000).map(lambda n: '{"action":"heartbeat","x":"' + "x" * n + '"}')
    | st.sampled_from(['{"action":"heartbeat","seq":NaN}', '{"action":"unread","body":{"limit":1e400}}', "[" * 60_000])
)


def read_frame(ws: Any) -> dict[str, Any]:
    text = ws.recv(timeout=10)
    assert isinstance(text, str), text
    assert "Traceback" not in text
    frame = json.loads(text)
    assert list(frame) == SERVER_FIELDS, frame
    assert type(frame["msg_type"]) is int and 1 <= frame["msg_type"] <= 10, frame
    assert frame["seq"] is None or type(frame["seq"]) is int, frame
    return frame


def test_a_live_socket_answers_every_frame_stays_open_and_still_heartbeats(fuzz_server, live_socket):
    @given(frame=frames)
    def answered(frame: str | bytes) -> None:
        try:
            live_socket.send(frame)
            reply = read_frame(live_socket)
        except ConnectionClosed as closed:
            raise AssertionError(f"the server closed the socket after {frame[:200]!r}: {closed}") from None
        event(f"msg_type {reply['msg_type']} code {reply['code']}")
        # Nothing is pushed in this test, so every frame gets a reply and only that.
        assert reply["msg_type"] not in (5, 6, 7, 10), reply
        if reply["msg_type"] == 9:
            assert reply["code"] in (400, 401, 403, 413, 503), reply

    answered()
    live_socket.send(json.dumps({"action": "heartbeat", "seq": 99}))
    reply = read_frame(live_socket)
    assert (reply["msg_type"], reply["code"], reply["seq"]) == (3, 200, 99)
    assert "Traceback" not in fuzz_server.output()


def test_a_live_socket_refuses_deep_frames_and_duplicate_keys_with_400(fuzz_server, live_socket):
    limit = settings.PUSH_MAX_JSON_DEPTH

    @given(depth=st.integers(min_value=1, max_value=80), duplicate=st.booleans(), data=st.data())
    def refused(depth: int, duplicate: bool, data: st.DataObject) -> None:
        frame = {"action": "unread", "body": {"limit": 5, "x": data.draw(nested_value(depth))}}
        text = data.draw(with_duplicate_key(frame)).decode() if duplicate else json.dumps(frame)
        live_socket.send(text)
        reply = read_frame(live_socket)
        assert reply["msg_type"] == 9 and reply["code"] == 400, reply
        if duplicate:
            assert "duplicate key" in reply["msg"], reply
        elif depth + 2 > limit:
            assert f"deeper than {limit}" in reply["msg"], reply
        else:  # within the limit: the body check names the unknown field
            assert "unknown field" in reply["msg"], reply

    refused()
    live_socket.send(json.dumps({"action": "heartbeat", "seq": 7}))
    assert read_frame(live_socket)["code"] == 200
