"""The frame codec of connections/protocol.py: client frames in, server frames out.

Guards the module's invariants: every client frame becomes a ``ClientFrame``
with its action's typed body or a ``FrameError`` with the contract's code and a
message naming the problem; ``PushTemplate`` renders exactly the frame
``encode_frame`` would, with the server's ``to_uid``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connections.protocol import (
    MAX_ACKS,
    MAX_LOGIN_KEY,
    MAX_NOCE_ACK,
    MAX_SEQ,
    MAX_UNREAD_LIMIT,
    AckBody,
    ClientFrame,
    ClientType,
    Code,
    EmptyBody,
    FrameError,
    LoginBody,
    MsgType,
    PushTemplate,
    UnreadBody,
    encode_frame,
    parse_frame,
)

MAX_BYTES = 64 * 1024


def parse(frame: Any, *, max_bytes: int = MAX_BYTES) -> ClientFrame | FrameError:
    text = frame if isinstance(frame, str) else json.dumps(frame, ensure_ascii=False)
    return parse_frame(text, max_bytes=max_bytes)


def ok(frame: Any) -> ClientFrame:
    result = parse(frame)
    assert isinstance(result, ClientFrame), result
    return result


def refused(frame: Any, *, max_bytes: int = MAX_BYTES) -> FrameError:
    result = parse(frame, max_bytes=max_bytes)
    assert isinstance(result, FrameError), result
    return result


# --- valid frames -------------------------------------------------------------


def test_login_with_ukey_is_a_web_login_with_the_key_stripped():
    frame = ok({"action": "login", "body": {"ukey": "  abc  "}, "seq": 1})
    assert isinstance(frame.body, LoginBody)
    assert frame.body.login_key == "abc"
    assert frame.body.client_type is ClientType.WEB
    assert frame.seq == 1


def test_login_with_token_is_an_app_login():
    frame = ok({"action": "login", "body": {"token": "t0k"}})
    assert frame.body.login_key == "t0k"
    assert frame.body.client_type is ClientType.APP
    assert frame.seq is None


def test_login_with_the_other_key_null_is_accepted():
    frame = ok({"action": "login", "body": {"ukey": "k", "token": None}})
    assert frame.body.client_type is ClientType.WEB


def test_login_key_of_the_maximum_length_is_accepted():
    assert ok({"action": "login", "body": {"ukey": "k" * MAX_LOGIN_KEY}}).body.login_key == "k" * MAX_LOGIN_KEY


@pytest.mark.parametrize("action", ["logout", "heartbeat"])
@pytest.mark.parametrize("body", [{}, None, "absent"])
def test_actions_without_a_body_accept_none_empty_or_missing(action, body):
    frame: dict[str, Any] = {"action": action}
    if body != "absent":
        frame["body"] = body
    result = ok(frame)
    assert result.action == action
    assert isinstance(result.body, EmptyBody)


def test_ack_of_one_message():
    frame = ok({"action": "ack", "body": {"noce_ack": "n1"}, "seq": 3})
    assert isinstance(frame.body, AckBody)
    assert frame.body.acks == ["n1"]


def test_ack_of_many_messages_drops_duplicates_and_keeps_order():
    frame = ok({"action": "ack", "body": {"noce_acks": ["b", "a", "b", "c", "a"]}})
    assert frame.body.acks == ["b", "a", "c"]


def test_ack_of_the_maximum_number_of_maximum_length_acks():
    acks = [f"{i:0{MAX_NOCE_ACK}d}" for i in range(MAX_ACKS)]
    assert ok({"action": "ack", "body": {"noce_acks": acks}}).body.acks == acks


@pytest.mark.parametrize(
    ("body", "limit", "msg_type"),
    [
        (None, 50, None),
        ({}, 50, None),
        ({"limit": 1}, 1, None),
        ({"limit": MAX_UNREAD_LIMIT}, MAX_UNREAD_LIMIT, None),
        ({"msg_type": 5}, 50, 5),
        ({"msg_type": 6, "limit": 10}, 10, 6),
        ({"msg_type": 7}, 50, 7),
        ({"msg_type": None}, 50, None),
    ],
)
def test_unread_defaults_and_bounds(body, limit, msg_type):
    frame = ok({"action": "unread", "body": body})
    assert isinstance(frame.body, UnreadBody)
    assert (frame.body.limit, frame.body.msg_type) == (limit, msg_type)


# --- invalid frames -----------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "fragment"),
    [
        ("", Code.BAD_REQUEST, "not valid JSON"),
        ("{", Code.BAD_REQUEST, "not valid JSON"),
        ("[" * 100_000, Code.TOO_LARGE, "larger than"),
        ("[" * 20_000 + "]" * 20_000, Code.BAD_REQUEST, None),
        ("null", Code.BAD_REQUEST, "JSON object"),
        ("42", Code.BAD_REQUEST, "JSON object"),
        ('["login"]', Code.BAD_REQUEST, "JSON object"),
        ({}, Code.BAD_REQUEST, "action"),
        ({"action": None}, Code.BAD_REQUEST, "action"),
        ({"action": ""}, Code.BAD_REQUEST, "action"),
        ({"action": ["login"]}, Code.BAD_REQUEST, "action"),
        ({"action": "LOGIN"}, Code.BAD_REQUEST, "unknown action 'LOGIN'"),
        ({"action": "subscribe"}, Code.BAD_REQUEST, "unknown action 'subscribe'"),
        ({"action": "heartbeat", "sequence": 1}, Code.BAD_REQUEST, "unknown field: sequence"),
        ({"action": "heartbeat", "body": []}, Code.BAD_REQUEST, "body must be a JSON object"),
        ({"action": "heartbeat", "body": "x"}, Code.BAD_REQUEST, "body must be a JSON object"),
        ({"action": "heartbeat", "body": {"ts": 1}}, Code.BAD_REQUEST, "body.ts: unknown field"),
        ({"action": "logout", "body": {"uid": 1}}, Code.BAD_REQUEST, "body.uid: unknown field"),
        ({"action": "login"}, Code.BAD_REQUEST, "login needs a body"),
        ({"action": "login", "body": None}, Code.BAD_REQUEST, "login needs a body"),
        ({"action": "login", "body": {}}, Code.BAD_REQUEST, "login needs a body"),
        ({"action": "login", "body": {"ukey": None}}, Code.BAD_REQUEST, "body: give exactly one of ukey"),
        ({"action": "login", "body": {"ukey": "a", "token": "b"}}, Code.BAD_REQUEST, "exactly one"),
        ({"action": "login", "body": {"ukey": 176906}}, Code.BAD_REQUEST, "body.ukey"),
        ({"action": "login", "body": {"token": ["t"]}}, Code.BAD_REQUEST, "body.token"),
        ({"action": "login", "body": {"ukey": " \t "}}, Code.BAD_REQUEST, "body.ukey"),
        ({"action": "login", "body": {"ukey": "k" * (MAX_LOGIN_KEY + 1)}}, Code.BAD_REQUEST, "body.ukey"),
        ({"action": "login", "body": {"ukey": "k", "uid": 1}}, Code.BAD_REQUEST, "body.uid: unknown field"),
        ({"action": "ack"}, Code.BAD_REQUEST, "ack needs a body"),
        ({"action": "ack", "body": {}}, Code.BAD_REQUEST, "ack needs a body"),
        ({"action": "ack", "body": {"noce_ack": ""}}, Code.BAD_REQUEST, "body.noce_ack"),
        ({"action": "ack", "body": {"noce_ack": 12}}, Code.BAD_REQUEST, "body.noce_ack"),
        ({"action": "ack", "body": {"noce_ack": "n" * (MAX_NOCE_ACK + 1)}}, Code.BAD_REQUEST, "body.noce_ack"),
        ({"action": "ack", "body": {"noce_acks": []}}, Code.BAD_REQUEST, "body.noce_acks"),
        ({"action": "ack", "body": {"noce_acks": "abc"}}, Code.BAD_REQUEST, "body.noce_acks"),
        ({"action": "ack", "body": {"noce_acks": ["a", 2]}}, Code.BAD_REQUEST, "body.noce_acks.1"),
        ({"action": "ack", "body": {"noce_acks": ["a"] * (MAX_ACKS + 1)}}, Code.BAD_REQUEST, "body.noce_acks"),
        ({"action": "ack", "body": {"noce_ack": "a", "noce_acks": ["b"]}}, Code.BAD_REQUEST, "exactly one"),
        ({"action": "ack", "body": {"noce": "a"}}, Code.BAD_REQUEST, "body.noce: unknown field"),
        ({"action": "unread", "body": {"limit": 0}}, Code.BAD_REQUEST, "body.limit"),
        ({"action": "unread", "body": {"limit": MAX_UNREAD_LIMIT + 1}}, Code.BAD_REQUEST, "body.limit"),
        ({"action": "unread", "body": {"limit": "10"}}, Code.BAD_REQUEST, "body.limit"),
        ({"action": "unread", "body": {"limit": True}}, Code.BAD_REQUEST, "body.limit"),
        ({"action": "unread", "body": {"limit": 2.5}}, Code.BAD_REQUEST, "body.limit"),
        ({"action": "unread", "body": {"msg_type": 1}}, Code.BAD_REQUEST, "body.msg_type"),
        ({"action": "unread", "body": {"msg_type": 9}}, Code.BAD_REQUEST, "body.msg_type"),
        ({"action": "unread", "body": {"msg_type": "7"}}, Code.BAD_REQUEST, "body.msg_type"),
        ({"action": "unread", "body": {"type": 7}}, Code.BAD_REQUEST, "body.type: unknown field"),
    ],
)
def test_invalid_frames_are_refused_with_the_contract_code_naming_the_problem(frame, code, fragment):
    error = refused(frame)
    assert error.code == code
    assert error.msg
    if fragment is not None:
        assert fragment in error.msg, error.msg
    assert "Traceback" not in error.msg


def test_binary_frame_is_refused():
    error = parse_frame(None, max_bytes=MAX_BYTES)
    assert isinstance(error, FrameError)
    assert error.code == Code.BAD_REQUEST and "binary" in error.msg


def test_unknown_action_message_lists_the_actions_and_cuts_long_names():
    error = refused({"action": "x" * 1000})
    assert "x" * 41 not in error.msg
    for action in ("login", "logout", "heartbeat", "ack", "unread"):
        assert action in error.msg


# --- size limit -----------------------------------------------------------------


def padded(total_bytes: int, pad_char: str = "x") -> str:
    """A JSON object frame of exactly total_bytes UTF-8 bytes (its ``pad`` field is refused once parsed)."""
    head = '{"action":"heartbeat","pad":"'
    tail = '"}'
    room = total_bytes - len(head) - len(tail)
    width = len(pad_char.encode())
    assert room % width == 0
    text = head + pad_char * (room // width) + tail
    assert len(text.encode()) == total_bytes
    return text


@pytest.mark.parametrize("pad_char", ["x", "é", "€", "😀"])
def test_frame_of_exactly_max_bytes_is_parsed_and_one_byte_more_is_413(pad_char):
    # The padding's room is a multiple of every pad width (1 to 4 bytes).
    limit = len('{"action":"heartbeat","pad":"') + len('"}') + 24 * 200
    at_limit = parse_frame(padded(limit, pad_char), max_bytes=limit)
    assert isinstance(at_limit, FrameError) and at_limit.code == Code.BAD_REQUEST  # parsed: refused for "pad"
    assert "unknown field: pad" in at_limit.msg
    over = parse_frame(padded(limit, pad_char) + " ", max_bytes=limit)
    assert isinstance(over, FrameError) and over.code == Code.TOO_LARGE
    assert str(limit) in over.msg


def test_multibyte_frame_short_in_characters_but_over_the_limit_in_bytes_is_413():
    text = json.dumps({"action": "heartbeat", "pad": "中" * 30_000}, ensure_ascii=False)
    assert len(text) < MAX_BYTES < len(text.encode())
    error = parse_frame(text, max_bytes=MAX_BYTES)
    assert isinstance(error, FrameError) and error.code == Code.TOO_LARGE


def test_lone_surrogate_in_a_long_frame_is_refused_not_raised():
    # A str that is not valid Unicode (a lone surrogate) cannot be UTF-8 encoded;
    # parse_frame must still answer with a FrameError rather than raise.
    text = '{"action":"heartbeat","seq":1,"x":"' + "\ud800" * 20 + '"}'
    result = parse_frame(text, max_bytes=64)
    assert isinstance(result, FrameError)


# --- seq echo -------------------------------------------------------------------


@pytest.mark.parametrize("seq", [0, 1, 17, MAX_SEQ])
def test_valid_seq_is_carried_by_frames_and_errors(seq):
    assert ok({"action": "heartbeat", "seq": seq}).seq == seq
    assert refused({"action": "dance", "seq": seq}).seq == seq
    assert refused({"action": "login", "seq": seq}).seq == seq
    assert refused({"action": "unread", "body": {"limit": 0}, "seq": seq}).seq == seq
    assert refused({"action": "heartbeat", "body": [], "seq": seq}).seq == seq
    assert refused({"action": "heartbeat", "extra": 1, "seq": seq}).seq == seq


def test_null_seq_is_the_same_as_no_seq():
    assert ok({"action": "heartbeat", "seq": None}).seq is None
    assert ok({"action": "heartbeat"}).seq is None


@pytest.mark.parametrize("seq", [-1, MAX_SEQ + 1, 1.0, 1.5, "1", True, False, [1], {"n": 1}])
def test_invalid_seq_is_refused_and_not_echoed(seq):
    error = refused({"action": "heartbeat", "seq": seq})
    assert error.code == Code.BAD_REQUEST
    assert "seq" in error.msg
    assert error.seq is None


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_seq_is_refused(text):
    error = refused('{"action":"heartbeat","seq":' + text + "}")
    assert "seq" in error.msg and error.seq is None


def test_frames_that_are_not_objects_have_no_seq():
    assert refused('{"action": "heartbeat", "seq": 5').seq is None
    assert refused("[5]").seq is None


# --- encode_frame -------------------------------------------------------------


def test_encode_frame_has_the_seven_fields_in_contract_order():
    text = encode_frame(MsgType.HEARTBEAT, body={"ts": 1}, seq=4)
    assert list(json.loads(text)) == ["msg_type", "code", "msg", "uid", "body", "noce_ack", "seq"]
    assert json.loads(text) == {
        "msg_type": 3,
        "code": 200,
        "msg": "SUCCESS",
        "uid": 0,
        "body": {"ts": 1},
        "noce_ack": None,
        "seq": 4,
    }


def test_encode_frame_defaults_body_to_an_empty_object_and_keeps_unicode_readable():
    assert json.loads(encode_frame(MsgType.ERROR, code=Code.BAD_REQUEST, msg="x"))["body"] == {}
    assert "中文" in encode_frame(MsgType.USER_NOTICE, body={"t": "中文"})


# --- PushTemplate ---------------------------------------------------------------


def expected_push(msg_type: MsgType, from_uid: int, body: dict[str, Any], to_uid: int, ack: str) -> dict[str, Any]:
    return json.loads(encode_frame(msg_type, uid=from_uid, body={**body, "to_uid": to_uid}, noce_ack=ack, seq=None))


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": "hello"},
        {"title": "你好 世界", "emoji": "🎉", "quote": 'say "hi"\n\\', "ctl": "\u0000\u001f\u2028"},
        {"nested": {"a": [1, 2, {"b": None}], "c": {"d": True}}, "n": -1.5, "big": 2**60},
        {"to_uid": 999},
        {"to_uid": "someone else", "title": "x"},
        {"": "empty key", "key with spaces": [], "{}": "{}"},
    ],
    ids=["empty", "plain", "unicode", "nested", "only-to_uid", "to_uid-and-more", "odd-keys"],
)
@pytest.mark.parametrize("msg_type", sorted(m for m in MsgType if m in (5, 6, 7)))
def test_push_template_renders_what_encode_frame_would(body, msg_type):
    template = PushTemplate(msg_type, from_uid=176906, body=body)
    rendered = json.loads(template.render(42, "ack-1"))
    assert rendered == expected_push(msg_type, 176906, body, 42, "ack-1")
    assert rendered["body"]["to_uid"] == 42
    assert rendered["code"] == 200 and rendered["msg"] == "SUCCESS" and rendered["seq"] is None
    assert list(rendered) == ["msg_type", "code", "msg", "uid", "body", "noce_ack", "seq"]


def test_push_template_is_stamped_per_recipient_without_leaking_between_them():
    template = PushTemplate(MsgType.SYSTEM_NOTICE, from_uid=0, body={"title": "t", "to_uid": 1})
    first = json.loads(template.render(7, "a7"))
    second = json.loads(template.render(8, "a8"))
    assert (first["body"]["to_uid"], first["noce_ack"]) == (7, "a7")
    assert (second["body"]["to_uid"], second["noce_ack"]) == (8, "a8")
    assert first["uid"] == second["uid"] == 0


def test_push_template_does_not_change_the_callers_body():
    body = {"to_uid": 5, "x": 1}
    PushTemplate(MsgType.USER_NOTICE, from_uid=1, body=body).render(2, "n")
    assert body == {"to_uid": 5, "x": 1}


def test_push_template_escapes_awkward_noce_acks():
    for ack in ['a"b', "back\\slash", "ünï", "line\nbreak"]:
        rendered = json.loads(PushTemplate(MsgType.COMMENT, from_uid=3, body={}).render(4, ack))
        assert rendered["noce_ack"] == ack


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=max(200, settings().max_examples), deadline=None)
@given(
    msg_type=st.sampled_from([MsgType.COMMENT, MsgType.SYSTEM_NOTICE, MsgType.USER_NOTICE]),
    from_uid=st.integers(min_value=0, max_value=2**53),
    to_uid=st.integers(min_value=1, max_value=2**53),
    ack=st.text(min_size=1, max_size=64),
    body=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
)
def test_push_template_matches_encode_frame_for_any_json_body(msg_type, from_uid, to_uid, ack, body):
    rendered = json.loads(PushTemplate(msg_type, from_uid=from_uid, body=body).render(to_uid, ack))
    assert rendered == expected_push(msg_type, from_uid, body, to_uid, ack)


# --- properties of parse_frame ------------------------------------------------------


def frame_like() -> st.SearchStrategy[str]:
    """Text that is often a JSON object with the contract's field names, sometimes garbage."""
    actions = st.sampled_from(["login", "logout", "heartbeat", "ack", "unread", "", "x"]) | st.text(max_size=8)
    bodies = st.dictionaries(
        st.sampled_from(["ukey", "token", "noce_ack", "noce_acks", "limit", "msg_type", "x"]), json_values, max_size=3
    )
    objects = st.fixed_dictionaries(
        {},
        optional={
            "action": actions | json_values,
            "body": bodies | json_values,
            "seq": st.integers() | json_values,
            "extra": json_values,
        },
    )
    return st.text() | json_values.map(json.dumps) | objects.map(json.dumps)


@settings(max_examples=max(500, settings().max_examples), deadline=None)
@given(text=frame_like(), max_bytes=st.sampled_from([8, 64, 1024, MAX_BYTES]))
def test_parse_frame_never_raises_and_returns_an_envelope(text, max_bytes):
    result = parse_frame(text, max_bytes=max_bytes)
    assert isinstance(result, ClientFrame | FrameError)
    if isinstance(result, FrameError):
        assert result.code in (Code.BAD_REQUEST, Code.TOO_LARGE)
        assert result.msg
        assert result.seq is None or (type(result.seq) is int and 0 <= result.seq <= MAX_SEQ)
    else:
        assert len(text.encode()) <= max_bytes
        assert (
            type(result.body)
            is {
                "login": LoginBody,
                "logout": EmptyBody,
                "heartbeat": EmptyBody,
                "ack": AckBody,
                "unread": UnreadBody,
            }[result.action]
        )
        assert result.seq is None or (type(result.seq) is int and 0 <= result.seq <= MAX_SEQ)


# --- strict JSON: duplicate keys and nesting depth ---------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"action": "heartbeat", "action": "login", "body": {"ukey": "k"}}',
        '{"action": "login", "body": {"ukey": "a", "ukey": "b"}}',
        '{"action": "ack", "body": {"noce_ack": "x"}, "seq": 1, "seq": 2}',
    ],
)
def test_a_frame_with_a_duplicate_key_is_400(text):
    error = refused(text)
    assert error.code == Code.BAD_REQUEST and "duplicate key" in error.msg, error


def test_a_frame_nested_deeper_than_the_limit_is_400_naming_the_limit():
    from django.conf import settings as django_settings

    limit = django_settings.PUSH_MAX_JSON_DEPTH
    body: dict = {}
    for _ in range(limit - 1):  # the frame is depth 1, its body depth 2
        body = {"a": body}
    error = refused({"action": "heartbeat", "body": body})
    assert error.code == Code.BAD_REQUEST and f"deeper than {limit}" in error.msg, error


def test_a_frame_nested_far_past_what_python_recurses_is_400():
    error = refused('{"action": "heartbeat", "body": ' + "[" * 30_000 + "]" * 30_000 + "}")
    assert error.code == Code.BAD_REQUEST and "deeper than" in error.msg, error


def test_a_frame_at_the_depth_limit_reaches_its_body_check():
    from django.conf import settings as django_settings

    body: dict = {}
    for _ in range(django_settings.PUSH_MAX_JSON_DEPTH - 2):
        body = {"a": body}
    error = refused({"action": "heartbeat", "body": body})
    assert "unknown field" in error.msg and "deeper" not in error.msg, error
