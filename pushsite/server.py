"""daphne, with three things its WebSocket protocol does not do by itself.

1. Close with the registered codes the contract uses. autobahn (daphne's
WebSocket library) lets an application close only with 1000 or 3000-4999, so
``websocket.close`` with 1013 ("try again later", which PROTOCOL.md requires
when a server is full) raised inside daphne and the client saw 1011. RFC 6455
lets a server send the IANA-registered codes; this protocol sends them as
close frames directly. Guarded by
tests/connections/test_daphne.py::test_full_server_kicks_with_503_and_closes_1013.

2. Bound what waits for a client that does not read. A write to a socket never
blocks the loop, so a slow client cannot delay the others, but what it does
not read piles up in the process. Past PUSH_MAX_PENDING_BYTES the connection
is dropped (there is no room left even for a close frame); the consumer then
cleans up as for any disconnect, and the client, reconnecting, gets what it
missed as unsent or unread. Guarded by tests/connections/test_slow_client.py.

3. Drop writes to a socket whose close handshake has begun, instead of
raising from inside the consumer. Guarded by
tests/connections/test_closing_client.py.

4. Write text frames straight to the socket. A pushed frame through autobahn
and Twisted costs a logging call that formats its arguments even when debug
is off, a frame built field by field, and, because a Twisted write only
queues, an ``add_writer``/``remove_writer`` pair (two ``epoll_ctl`` calls)
and an event-loop turn per frame. The profile of a broadcast put that path
above everything pushsite does per socket. An unmasked, unfragmented,
uncompressed server frame is two to ten bytes of header and the payload; when
nothing is queued on the transport, ``send`` it at once and queue only what
the kernel did not take, so the order of bytes on the wire is kept. TLS
transports, compressed sessions and anything autobahn has queued take the
usual path. Guarded by tests/connections/test_daphne.py (frames of each length
class) and the suites that push over real daphne.

5. Let go of the HTTP request a socket was upgraded from. Twisted's HTTP
channel registers itself as its transport's producer, and daphne leaves it
there when it hands the transport to the WebSocket protocol: every open
socket kept its handshake request, both header sets and the request body
buffer alive (a few KiB each, bench/README.md). The channel is unregistered
once the socket is open, and autobahn's copies of the handshake (raw bytes,
parsed headers and query) are dropped, and so is the header list daphne
shares with the application's scope (about 0.9 KiB a socket; the origin
check reads it before the accept). Guarded by
tests/test_server.py::test_an_open_socket_keeps_no_http_channel and
tests/connections/test_daphne.py (origin checks over real daphne).

6. Give each socket's application a small input queue. daphne makes an
``asyncio.Queue`` per connection: four deques (getters, putters, items and an
Event's waiters) of about 600 bytes each, for a queue that holds one frame at
a time and has one reader. ``InputQueue`` keeps what daphne and the ASGI
``receive`` use of it (``put_nowait`` and ``get``) in a list and one future.
HTTP requests keep daphne's own. Guarded by tests/test_server.py and every
test that talks to real daphne.

7. Build autobahn's debug log arguments only when a debug line is written.
Every new connection pretty-prints its 30 configuration options
(``pformat``, about 170 us) and every handshake and frame colours function
names for the terminal (``hltype``, ``hlval``, about 3 us each) as arguments
of ``log.debug`` calls that, with debug off, write nothing: the profile of a
reconnect storm put the ``pformat`` alone at a fifth of the event loop's
time (bench/README.md, storm). The three names in
``autobahn.websocket.protocol`` are replaced by functions that return an
object formatting itself on demand, so a debug log, when on, reads the same.
Guarded by tests/test_server.py::test_autobahn_debug_arguments_are_built_only_when_formatted.

Installed when the ASGI module is imported under daphne (pushsite/asgi.py).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from functools import partial
from typing import Any

try:
    from twisted.internet.tcp import Server as TCPServer
    from twisted.web.http import HTTPChannel
except ImportError:  # no daphne, no Twisted: nothing here is used
    TCPServer = HTTPChannel = None

log = logging.getLogger("pushsite.server")

# Registered codes a server may send (RFC 6455 section 7.4.1, IANA registry).
SERVER_CLOSE_CODES = frozenset({1001, 1008, 1011, 1012, 1013})


def pending_bytes(transport: Any) -> int:
    """Bytes written to a TCP transport that the peer has not taken yet (0 if unknown)."""
    buffered = getattr(transport, "dataBuffer", b"")
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame (RFC 6455 section 5.2), as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def write_now(transport: Any, data: bytes) -> None:
    """Write to a plain TCP transport, sending at once when nothing is queued before it."""
    if (
        type(transport) is TCPServer
        and transport.connected
        and not transport.disconnecting
        and not pending_bytes(transport)
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # Twisted meets the same error on its own write and closes as usual
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def release_http_channel(transport: Any) -> None:
    """Unregister the HTTP channel an upgraded transport still has as its producer."""
    if HTTPChannel is not None and isinstance(getattr(transport, "producer", None), HTTPChannel):
        transport.unregisterProducer()


class InputQueue:
    """One reader's FIFO of ASGI events: ``put_nowait`` from the server, ``get`` as ``receive``."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None  # a cancelled get leaves any item for the next one
        return self._items.pop(0)


def max_pending_bytes() -> int:
    from django.conf import settings

    return settings.PUSH_MAX_PENDING_BYTES


def install_close_codes() -> bool:
    """Make daphne's WebSocket factory build our protocol; False without daphne."""
    try:
        from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
    except ImportError:
        return False
    if getattr(WebSocketFactory.protocol, "pushsite_protocol", False):
        return True

    class PushWebSocketProtocol(WebSocketProtocol):
        pushsite_protocol = True
        pushsite_dropped = False

        def onOpen(self):
            super().onOpen()
            release_http_channel(self.transport)
            # Read only while the handshake is processed; daphne's close log needs request.path alone.
            self.http_request_data = self.http_headers = self.http_request_params = None
            self.request.headers = self.request.params = {}
            # The scope's header list (this same list) was read by the origin
            # check before the accept; nothing reads it once the socket is open.
            self.clean_headers.clear()

        def serverClose(self, code=None):
            if code in SERVER_CLOSE_CODES:
                self.sendCloseFrame(code=code, isReply=False)
            else:
                super().serverClose(code)

        def serverSend(self, content, binary=False):
            if self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
                # The client's close frame is in but daphne has not seen the
                # disconnect yet. autobahn would raise, and the exception would
                # end the consumer before its disconnect handler clears the
                # socket's relation row; the frame could not arrive anyway.
                return
            if pending_bytes(self.transport) > max_pending_bytes():
                if not self.pushsite_dropped:
                    self.pushsite_dropped = True
                    log.warning("dropping %s: it does not read its frames", self.client_addr)
                    self.transport.abortConnection()
                return
            if (
                binary
                or self.state != self.STATE_OPEN
                or self._perMessageCompress is not None
                or self.send_queue
                or self.autoFragmentSize
            ):
                super().serverSend(content, binary)
                return
            payload = content.encode("utf8")
            if 0 < self.maxMessagePayloadSize < len(payload):
                super().serverSend(content, binary)  # autobahn refuses it and says why
                return
            write_now(self.transport, text_frame(payload))

    WebSocketFactory.protocol = PushWebSocketProtocol
    _small_queues_for(PushWebSocketProtocol)
    _lazy_debug_arguments()
    return True


class Lazy:
    """A log argument computed when its line is formatted, not when it is logged."""

    __slots__ = ("_args", "_fn")

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self._fn = fn
        self._args = args

    def __str__(self) -> str:
        return str(self._fn(*self._args))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    __repr__ = __str__


LAZY_DEBUG_HELPERS = ("pformat", "hltype", "hlval")


def _lazy_debug_arguments() -> None:
    """autobahn's debug-only log arguments, built only if a debug line is written (item 7)."""
    import autobahn.websocket.protocol as ws

    for name in LAZY_DEBUG_HELPERS:
        eager = getattr(ws, name)
        if getattr(eager, "pushsite_lazy", False):
            continue
        setattr(ws, name, _lazy(eager))


def _lazy(eager: Any) -> Any:
    def lazy(*args: Any) -> Lazy:
        return Lazy(eager, args)

    lazy.pushsite_lazy = True  # type: ignore[attr-defined]
    return lazy


def _small_queues_for(protocol_class: type) -> None:
    """daphne's Server.create_application, with an InputQueue for protocol_class's sockets."""
    from daphne.server import Server

    daphnes_own = Server.create_application

    def create_application(self: Any, protocol: Any, scope: dict[str, Any]) -> InputQueue | None:
        if not isinstance(protocol, protocol_class):
            return daphnes_own(self, protocol, scope)
        # daphne's own steps: one application per protocol, built with the
        # queue's get as receive, run as a task the server's checker watches.
        assert "application_instance" not in self.connections[protocol]
        queue = InputQueue()
        scope.setdefault("asgi", {"version": "3.0"})
        instance = self.application(scope=scope, receive=queue.get, send=partial(self.handle_reply, protocol))
        if protocol not in self.connections:
            instance.close()
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(instance)
        return queue

    Server.create_application = create_application
