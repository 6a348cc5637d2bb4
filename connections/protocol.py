"""The WebSocket contract in code: msg_types, codes, close codes, actions, and the
typed envelopes every client frame is parsed into at the edge.

Invariants:
* every server frame has the same seven fields, in this order: msg_type, code,
  msg, uid, body, noce_ack, seq (``encode_frame``);
* a client frame is either a ``ClientFrame`` with a body of its action's type,
  or a ``FrameError`` carrying the contract code and a message that names the
  problem; nothing else leaves ``parse_frame``.

Guarded by tests/connections/test_protocol.py.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from pushsite import strictjson


class MsgType(enum.IntEnum):
    LOGIN = 1
    LOGOUT = 2
    HEARTBEAT = 3
    ACK = 4
    COMMENT = 5
    SYSTEM_NOTICE = 6
    USER_NOTICE = 7
    UNREAD = 8
    ERROR = 9
    KICK = 10


# The msg_types that are stored notifications (as opposed to replies).
NOTIFICATION_TYPES = frozenset({MsgType.COMMENT, MsgType.SYSTEM_NOTICE, MsgType.USER_NOTICE})


class Code(enum.IntEnum):
    OK = 200
    BAD_REQUEST = 400
    LOGIN_REFUSED = 401
    LOGIN_REQUIRED = 403
    TOO_LARGE = 413
    TOO_MANY = 429
    INTERNAL = 500
    UNAVAILABLE = 503


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses; the comment says whether to retry."""

    NORMAL = 1000  # the client asked to go; do not reconnect on its own account
    POLICY_VIOLATION = 1008  # too many sockets not logged in from one address: reconnect only after closing others
    TRY_AGAIN_LATER = 1013  # server full: retry later, ideally elsewhere
    IDLE_TIMEOUT = 4000  # no frame for PUSH_IDLE_TIMEOUT seconds: reconnect when needed
    # The user opened more than PUSH_MAX_SOCKETS_PER_USER sockets and this one
    # was the oldest: terminal, a reconnect would only push out the next oldest.
    SUPERSEDED = 4001


class ClientType(enum.IntEnum):
    WEB = 1  # logged in with a ukey
    APP = 2  # logged in with a token


SUCCESS = "SUCCESS"
MAX_SEQ = 2**53 - 1  # the largest integer JavaScript keeps exact
MAX_LOGIN_KEY = 512
MAX_ACKS = 500
MAX_NOCE_ACK = 64
MAX_UNREAD_LIMIT = 200


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_frame(
    msg_type: MsgType,
    *,
    code: int = Code.OK,
    msg: str = SUCCESS,
    uid: int = 0,
    body: dict[str, Any] | None = None,
    noce_ack: str | None = None,
    seq: int | None = None,
) -> str:
    """One server frame as JSON text."""
    return json.dumps(
        {
            "msg_type": int(msg_type),
            "code": int(code),
            "msg": msg,
            "uid": uid,
            "body": body if body is not None else {},
            "noce_ack": noce_ack,
            "seq": seq,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


class PushTemplate:
    """A notification frame encoded once, then stamped per recipient.

    A broadcast sends the same body to many users; only ``to_uid`` and
    ``noce_ack`` differ. Encoding the shared part once and joining strings per
    user keeps JSON work off the per-socket path.
    """

    __slots__ = ("_head", "_mid", "_tail")

    def __init__(self, msg_type: MsgType, *, from_uid: int, body: dict[str, Any]):
        rest = {k: v for k, v in body.items() if k != "to_uid"}
        encoded_rest = json.dumps(rest, ensure_ascii=False, separators=(",", ":"))[1:-1]
        self._head = f'{{"msg_type":{int(msg_type)},"code":200,"msg":"SUCCESS","uid":{int(from_uid)},"body":{{"to_uid":'
        self._mid = ("," + encoded_rest if encoded_rest else "") + '},"noce_ack":'
        self._tail = ',"seq":null}'

    def render(self, to_uid: int, noce_ack: str) -> str:
        return self._head + str(int(to_uid)) + self._mid + json.dumps(noce_ack) + self._tail


# --- client frames ---------------------------------------------------------

LoginKey = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_LOGIN_KEY)]
NoceAck = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NOCE_ACK)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EmptyBody(_Strict):
    pass


class LoginBody(_Strict):
    ukey: LoginKey | None = None
    token: LoginKey | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LoginBody:
        if (self.ukey is None) == (self.token is None):
            raise ValueError("give exactly one of ukey (web) or token (app)")
        return self

    @property
    def login_key(self) -> str:
        return self.ukey if self.ukey is not None else self.token  # type: ignore[return-value]

    @property
    def client_type(self) -> ClientType:
        return ClientType.WEB if self.ukey is not None else ClientType.APP


class AckBody(_Strict):
    noce_ack: NoceAck | None = None
    noce_acks: Annotated[list[NoceAck], Field(min_length=1, max_length=MAX_ACKS)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AckBody:
        if (self.noce_ack is None) == (self.noce_acks is None):
            raise ValueError("give exactly one of noce_ack or noce_acks")
        return self

    @property
    def acks(self) -> list[str]:
        return [self.noce_ack] if self.noce_ack is not None else list(dict.fromkeys(self.noce_acks or []))


class UnreadBody(_Strict):
    limit: Annotated[int, Field(ge=1, le=MAX_UNREAD_LIMIT)] = 50
    msg_type: Annotated[int, Field(ge=5, le=7)] | None = None


Action = Literal["login", "logout", "heartbeat", "ack", "unread"]

BODY_TYPES: dict[str, type[_Strict]] = {
    "login": LoginBody,
    "logout": EmptyBody,
    "heartbeat": EmptyBody,
    "ack": AckBody,
    "unread": UnreadBody,
}
# Actions whose body carries what they act on: an absent or empty body is refused.
BODY_REQUIRED = frozenset({"login", "ack"})


@dataclass(frozen=True, slots=True)
class ClientFrame:
    action: str
    body: Any
    seq: int | None


@dataclass(frozen=True, slots=True)
class FrameError:
    code: Code
    msg: str
    seq: int | None = None


def _describe(error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return f"{loc}: {message}" if loc else message


def _seq_of(data: dict[str, Any]) -> int | None:
    seq = data.get("seq")
    if type(seq) is int and 0 <= seq <= MAX_SEQ:
        return seq
    return None


def seq_of(text: str | None, *, max_bytes: int) -> int | None:
    """The valid seq of a frame that is refused before parsing (rate limit), if any."""
    if text is None or len(text) > max_bytes:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return _seq_of(data) if isinstance(data, dict) else None


def parse_frame(text: str | None, *, max_bytes: int) -> ClientFrame | FrameError:
    """Parse one client text frame into a typed envelope, or say what is wrong."""
    if text is None:
        return FrameError(Code.BAD_REQUEST, "binary frames are not supported: send JSON text")
    # A str of n characters holds at most 4n UTF-8 bytes: encode only when it matters.
    if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes):
        return FrameError(Code.TOO_LARGE, f"frame larger than {max_bytes} bytes")
    try:
        data = strictjson.loads(text)
    except strictjson.JsonRefused as error:
        return FrameError(Code.BAD_REQUEST, f"frame refused: {error}")
    except ValueError:
        return FrameError(Code.BAD_REQUEST, "frame is not valid JSON")
    if not isinstance(data, dict):
        return FrameError(Code.BAD_REQUEST, "frame must be a JSON object")
    seq = _seq_of(data)
    unknown = sorted(set(data) - {"action", "body", "seq"})
    if unknown:
        return FrameError(Code.BAD_REQUEST, f"unknown field: {unknown[0]}", seq)
    if "seq" in data and data["seq"] is not None and seq is None:
        return FrameError(Code.BAD_REQUEST, f"seq must be an integer from 0 to {MAX_SEQ}")
    action = data.get("action")
    if not isinstance(action, str) or not action:
        return FrameError(Code.BAD_REQUEST, "action is missing or not a string", seq)
    body_type = BODY_TYPES.get(action)
    if body_type is None:
        return FrameError(
            Code.BAD_REQUEST, f"unknown action {action[:40]!r}; expected one of {', '.join(BODY_TYPES)}", seq
        )
    raw_body = data.get("body")
    if raw_body is None:
        raw_body = {}
    if not isinstance(raw_body, dict):
        return FrameError(Code.BAD_REQUEST, "body must be a JSON object", seq)
    if not raw_body and action in BODY_REQUIRED:
        return FrameError(Code.BAD_REQUEST, f"{action} needs a body", seq)
    try:
        body = body_type.model_validate(raw_body)
    except ValidationError as error:
        return FrameError(Code.BAD_REQUEST, _describe(error, "body"), seq)
    return ClientFrame(action=action, body=body, seq=seq)
