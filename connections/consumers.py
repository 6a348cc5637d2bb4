"""The WebSocket session of PROTOCOL.md section 1.

The consumer owns one socket: it parses each frame at the edge, answers with
the contract's codes, keeps the socket's per-uid membership in the hub (and,
with ``PUSH_FANOUT=layer``, in the Channels group), and hands every database
call to ``bridge``. It never blocks the loop and never sends a traceback.

Invariants:
* after disconnect the socket is in no hub index, no group and no relation row;
* every refused frame gets one ERROR reply with the contract's code; only an
  idle timeout, a full server or a kick closes the socket;
* a message replayed at login reaches the socket once, however early or late
  its live publish arrives (a later publish of it, an admin resend, goes through);
* a relation clean-up deferred by an outage never touches a later login of
  the same socket (the socket continues under a new conn_id).

Guarded by tests/connections/test_consumer.py, tests/connections/test_daphne.py
and tests/faults/test_redis_restart.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer
from django.conf import settings

from pushsite import metrics
from pushsite.clientaddr import scope_client
from pushsite.errors import BackendUnavailable

from . import auth, bridge, logins, services, throttle
from .groups import user_group
from .hub import Hub, get_hub
from .inbox import Unsent, inbox
from .protocol import (
    AckBody,
    ClientFrame,
    CloseCode,
    Code,
    FrameError,
    LoginBody,
    MsgType,
    UnreadBody,
    encode_frame,
    now_ms,
    parse_frame,
    seq_of,
)

log = logging.getLogger(__name__)


class PushConsumer(AsyncConsumer):
    """One client socket: anonymous until ``login``, then a user's socket."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_fanout = settings.PUSH_FANOUT == "layer"
        if not self.layer_fanout:
            # The hub delivers; a per-socket layer channel would only cost.
            self.channel_layer_alias = None
        self.hub: Hub | None = None
        self.conn_id: str | None = None
        self.uid = 0
        self.client = ""  # the client address (pushsite.clientaddr), set at connect
        self._row_uid = 0  # uid of this socket's relation row, online or offline
        self.closed = False
        self.last_active = 0.0
        self._tokens = float(settings.PUSH_FRAME_BURST)
        self._refilled = 0.0
        # Acks written at login that may still arrive live; while the login is
        # in progress (``_replaying``) also the acks written live meanwhile.
        self._replayed: set[str] | None = None
        self._replaying = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await self._run(scope, receive, send)
        except asyncio.CancelledError:
            # daphne cancels an application still running 10 s after its
            # socket closed (e.g. a login stuck on a loaded database): no
            # disconnect handler will run, so leave the hub now; the node
            # loop removes the relation row no open socket owns.
            self.closed = True
            if self.hub is not None:
                self.hub.abandon(self)
            raise

    async def _run(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.layer_fanout:
            await super().__call__(scope, receive, send)
            return
        # With the hub there is one source of messages, the client. Channels
        # reads even one source through a Task and an asyncio.wait per frame;
        # reading it directly keeps the same one-at-a-time order and spares
        # an idle socket that Task, its wait set and their frames (about
        # 3 KiB each, bench/README.md).
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale DB connections before every handler; this
        # consumer does no ORM work outside ``bridge`` (which does it in the
        # DB thread), so that thread-pool round trip per message is skipped.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    # --- socket lifecycle ----------------------------------------------------

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        await self.base_send({"type": "websocket.accept"})
        retry_after = logins.retry_after()
        if retry_after is not None:
            # Logins are not answered in time: tell the client when to come
            # back now, rather than let it queue until it gives up.
            metrics.login("overloaded")
            await self.kick(
                code=Code.UNAVAILABLE,
                close_code=CloseCode.TRY_AGAIN_LATER,
                msg="server busy; retry later",
                body={"retry_after": retry_after},
            )
            return
        self.hub = get_hub()
        self.last_active = self._refilled = self.hub.loop.time()
        self.conn_id = await self.hub.attach(self)
        if self.conn_id is None:
            await self.kick(code=Code.UNAVAILABLE, close_code=CloseCode.TRY_AGAIN_LATER, msg="server full")
            return
        self.client = scope_client(self.scope)
        if not throttle.anonymous.enter(self.client, self):
            await self.kick(
                code=Code.TOO_MANY,
                close_code=CloseCode.POLICY_VIOLATION,
                msg=f"more than {settings.PUSH_MAX_ANONYMOUS_PER_ADDRESS} sockets not logged in from this address",
            )

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self._session_event("close", self.uid, code=message.get("code"))
        throttle.anonymous.leave(self.client, self)
        await self._leave_session(closing=True)
        self.closed = True
        if self.hub is not None and self.conn_id is not None:
            await self.hub.detach(self)
        raise StopConsumer

    async def kick(self, *, code: int, close_code: int, msg: str, body: dict[str, Any] | None = None) -> None:
        """Send KICK and close; the disconnect handler cleans up."""
        if self.closed:
            return
        self._session_event("kick", self.uid, code=int(code))
        await self.send_frame(MsgType.KICK, code=code, msg=msg, body=body)
        self.closed = True
        throttle.anonymous.leave(self.client, self)
        # Clean up before the close frame, so a client that sees the close
        # can rely on its relation row being gone.
        await self._leave_session(closing=True)
        await self.base_send({"type": "websocket.close", "code": int(close_code)})
        if self.hub is not None and self.conn_id is not None:
            await self.hub.detach(self)

    def _session_event(self, event: str, uid: int, *, code: int | None = None, level: int = logging.INFO) -> None:
        """One log line per session event, with node, uid and conn_id as fields (pushsite/logs.py); never a key."""
        if log.isEnabledFor(level):
            node = self.hub.node if self.hub is not None else None
            fields = {"event": event, "node": node, "uid": uid or None, "conn_id": self.conn_id, "code": code}
            log.log(level, "session %s", event, extra=fields)

    # --- sending -----------------------------------------------------------

    async def send_frame(self, msg_type: MsgType, **fields: Any) -> None:
        await self.send_text(encode_frame(msg_type, **fields))

    async def send_text(self, text: str) -> None:
        if self.closed:
            return
        if self.hub is not None:
            self.last_active = self.hub.loop.time()
        await self.base_send({"type": "websocket.send", "text": text})

    async def push_text(self, text: str, noce_ack: str, now: float) -> bool:
        """Write one pushed notification (hub path); False if it was not written."""
        if self.closed:
            metrics.frame_dropped("closed")
            return False
        replayed = self._replayed
        if replayed is not None:
            if noce_ack in replayed:
                if not self._replaying:
                    # Its one live duplicate: a later publish (an admin resend) goes through.
                    replayed.discard(noce_ack)
                    if not replayed:
                        self._replayed = None
                return False
            if self._replaying:
                replayed.add(noce_ack)
        self.last_active = now
        await self.base_send({"type": "websocket.send", "text": text})
        return True

    async def push_frame(self, event: dict[str, Any]) -> None:
        """Channel-layer path (PUSH_FANOUT=layer): one pushed notification."""
        if (
            self.uid
            and self.hub is not None
            and await self.push_text(event["text"], event["noce_ack"], self.hub.loop.time())
        ):
            self.hub.record_sent(self.uid, event["noce_ack"])
            metrics.frames_sent(event.get("msg_type", 0))

    # --- receiving -----------------------------------------------------------

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        if self.closed or self.hub is None:
            return
        now = self.hub.loop.time()
        self.last_active = now
        if not self._take_token(now):
            seq = seq_of(message.get("text"), max_bytes=settings.PUSH_MAX_FRAME_BYTES)
            await self.send_frame(MsgType.ERROR, code=Code.TOO_MANY, msg="too many frames; slow down", seq=seq)
            return
        frame = parse_frame(message.get("text"), max_bytes=settings.PUSH_MAX_FRAME_BYTES)
        if isinstance(frame, FrameError):
            await self.send_frame(MsgType.ERROR, code=frame.code, msg=frame.msg, seq=frame.seq)
            return
        handler = getattr(self, f"action_{frame.action}")
        try:
            await handler(frame)
        except BackendUnavailable as error:
            log.warning("%s refused for conn %s: %s", frame.action, self.conn_id, error)
            await self.send_frame(
                MsgType.ERROR, code=Code.UNAVAILABLE, msg=f"{frame.action} unavailable: {error}", seq=frame.seq
            )
        except Exception:
            log.exception("%s failed for conn %s", frame.action, self.conn_id)
            await self.send_frame(MsgType.ERROR, code=Code.INTERNAL, msg="internal error", seq=frame.seq)

    def _take_token(self, now: float) -> bool:
        rate, burst = settings.PUSH_FRAME_RATE, settings.PUSH_FRAME_BURST
        self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _refuse_anonymous(self, frame: ClientFrame) -> bool:
        if self.uid:
            return False
        await self.send_frame(MsgType.ERROR, code=Code.LOGIN_REQUIRED, msg=f"{frame.action} needs login", seq=frame.seq)
        return True

    # --- actions -------------------------------------------------------------

    async def action_heartbeat(self, frame: ClientFrame) -> None:
        await self.send_frame(MsgType.HEARTBEAT, uid=self.uid, body={"ts": now_ms()}, seq=frame.seq)

    async def action_login(self, frame: ClientFrame) -> None:
        body: LoginBody = frame.body
        if self.uid:
            await self.send_frame(
                MsgType.ERROR,
                code=Code.BAD_REQUEST,
                msg=f"already logged in as uid {self.uid}; send logout first",
                seq=frame.seq,
            )
            return
        try:
            uid = await auth.verify_login(body.login_key, client=self.client)
        except throttle.LoginThrottled as error:
            metrics.login("refused")
            await self.send_frame(
                MsgType.ERROR,
                code=Code.TOO_MANY,
                msg=str(error),
                body={"retry_after": error.retry_after},
                seq=frame.seq,
            )
            return
        except auth.LoginRefused:
            metrics.login("refused")
            self._session_event("login_refused", 0, code=int(Code.LOGIN_REFUSED))
            await self.send_frame(MsgType.ERROR, code=Code.LOGIN_REFUSED, msg="login refused", seq=frame.seq)
            return
        except BackendUnavailable as error:
            metrics.login("error")
            self._session_event("login_failed", 0, code=int(Code.UNAVAILABLE), level=logging.WARNING)
            await self.send_frame(MsgType.ERROR, code=Code.UNAVAILABLE, msg=str(error), seq=frame.seq)
            return
        if self.closed:
            return
        assert self.hub is not None
        assert self.conn_id is not None
        # Join before reading what is unsent: a push that lands in between
        # arrives live and is then skipped by the replay, never missed.
        self._replayed = set()
        self._replaying = True
        self.uid = self._row_uid = uid
        self.hub.join(uid, self)
        try:
            if self.layer_fanout:
                await self.channel_layer.group_add(user_group(uid), self.channel_name)
            session = await logins.session_login(
                services.LoginRequest(uid=uid, conn_id=self.conn_id, node=self.hub.node, client_type=body.client_type)
            )
        except BackendUnavailable as error:
            # A failed login leaves no row: the socket stays open, anonymous.
            metrics.login("error")
            self._session_event("login_failed", uid, code=int(Code.UNAVAILABLE), level=logging.WARNING)
            await self._leave_session(closing=True, stays_open=True)
            await self.send_frame(MsgType.ERROR, code=Code.UNAVAILABLE, msg=str(error), seq=frame.seq)
            return
        except services.TooManySockets as error:
            metrics.login("refused")
            self._session_event("login_refused", uid, code=int(Code.TOO_MANY))
            await self._leave_session(closing=True, stays_open=True)
            await self.send_frame(MsgType.ERROR, code=Code.TOO_MANY, msg=str(error), seq=frame.seq)
            return
        metrics.login("ok")
        self._session_event("login", uid)
        throttle.anonymous.leave(self.client, self)
        await self.send_frame(MsgType.LOGIN, uid=uid, body={"uid": uid, "unread": session.unread_counts}, seq=frame.seq)
        await self._replay(session.unsent)

    async def _replay(self, messages: list[Unsent]) -> None:
        assert self.hub is not None
        now = self.hub.loop.time()
        written: set[str] = set()
        for message in messages:
            if await self.push_text(message.frame, message.noce_ack, now):
                written.add(message.noce_ack)
                self.hub.record_sent(self.uid, message.noce_ack)
                metrics.frames_sent(message.msg_type)
        # A replayed message's live publish can trail its store by seconds on a
        # loaded node (the API stores, then publishes): remember what the
        # replay wrote, and only that, until its duplicate shows up. At most
        # PUSH_LOGIN_REPLAY_LIMIT acks, and none for a user with nothing unsent.
        self._replaying = False
        self._replayed = written or None

    async def action_logout(self, frame: ClientFrame) -> None:
        if await self._refuse_anonymous(frame):
            return
        uid = self.uid
        self._session_event("logout", uid)
        await self._leave_session(closing=False)
        throttle.anonymous.enter(self.client, self, capped=False)
        await self.send_frame(MsgType.LOGOUT, body={"uid": uid}, seq=frame.seq)

    async def action_ack(self, frame: ClientFrame) -> None:
        if await self._refuse_anonymous(frame):
            return
        body: AckBody = frame.body
        acked = await bridge.call(inbox().ack, uid=self.uid, noce_acks=body.acks)
        await self.send_frame(MsgType.ACK, uid=self.uid, body={"acked": acked}, seq=frame.seq)

    async def action_unread(self, frame: ClientFrame) -> None:
        if await self._refuse_anonymous(frame):
            return
        body: UnreadBody = frame.body
        result = await bridge.call(inbox().unread, uid=self.uid, limit=body.limit, msg_type=body.msg_type)
        await self.send_frame(MsgType.UNREAD, uid=self.uid, body=result, seq=frame.seq)

    async def _leave_session(self, *, closing: bool, stays_open: bool = False) -> None:
        """Leave the user's delivery; mark the relation offline (logout) or delete it (close, failed login)."""
        uid, self.uid = self.uid, 0
        self._replayed, self._replaying = None, False
        if self.hub is None or self.conn_id is None:
            return
        if uid:
            self.hub.leave(uid, self)
            if self.layer_fanout:
                try:
                    await self.channel_layer.group_discard(user_group(uid), self.channel_name)
                except Exception:  # a layer outage must not keep the socket from closing
                    log.warning("group_discard failed for conn %s", self.conn_id)
        row_uid = self._row_uid
        if closing and row_uid:
            self._row_uid = 0
            try:
                await logins.session_close(row_uid, self.conn_id)
            except BackendUnavailable:
                self.hub.close_later(row_uid, self.conn_id)
                if stays_open:
                    self.conn_id = self.hub.renumber(self)  # as after a logout, below
        elif not closing and uid:
            try:
                await bridge.call(services.connection_logout, uid=uid, conn_id=self.conn_id)
            except BackendUnavailable:
                self._row_uid = 0
                self.hub.close_later(uid, self.conn_id)
                # The socket stays open and may log in again before that
                # retry runs; under a new id the retry cannot delete the new
                # session's row and presence entry.
                self.conn_id = self.hub.renumber(self)
