"""daphne, with nine things its WebSocket protocol does not do by itself.

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

8. Close a text frame of invalid UTF-8 with 1007. autobahn finds it, but
fails the connection by dropping TCP (``failByDrop``, on by default for a
server), so the client saw 1006 and a reset instead of the contract's close.
The socket's protocol turns ``failByDrop`` off when such a frame arrives, so
autobahn sends the close frame with 1007 and skips the frame; daphne never
sees it. Guarded by
tests/connections/test_daphne_limits.py::test_invalid_utf8_in_a_text_frame_closes_with_1007.

9. Listen with a backlog that takes a reconnect storm. daphne builds its
``-b``/``-p`` and ``-u`` listeners from Twisted endpoint strings without a
backlog, and Twisted listens with 50. When a node comes back, hundreds of
clients connect in the same millisecond: past 50 unaccepted connections the
kernel drops their SYNs, and each such client waits a full second for its
retransmit. In the storm benchmark a wave of 3,000 logins took 2.0 s where
1.3 s of it was work, and the kernel's ``TcpExtListenOverflows`` rose by
hundreds per run; with the backlog at PUSH_LISTEN_BACKLOG (default 4096; the
kernel caps it at ``net.core.somaxconn``) the wave took 1.3 s and the counter
did not move (bench/README.md, storm). A ``tcp``, ``tcp6`` or ``unix`` endpoint string that names its own
``backlog`` keeps it. Guarded by
tests/connections/test_daphne.py::test_daphne_listens_with_the_configured_backlog.

Each item has an entry in ``PATCHES``: the versions of daphne, autobahn and
Twisted it was written for, the upstream names it replaces or relies on, the
upstream behaviour it replaces and when a later version could drop it.
``install_close_codes`` installs them when the ASGI module is imported
(pushsite/asgi.py, on daphne and on API nodes), and first runs
``check_patches``: another version, or an upstream name missing or changed
under the same version number, raises ``PatchVersionError`` naming the patch,
so the server does not start. There is no switch to start anyway: a patch on
internals it was not written for fails quietly (bytes out of order, a bound
never enforced), which is worse than not starting. Guarded by
tests/test_server.py (test_the_installed_versions_pass_the_check and the
tests after it).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import inspect
import logging
import re
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any

from pushsite import metrics

try:
    from twisted.internet.tcp import Server as TCPServer
    from twisted.web.http import HTTPChannel
except ImportError:  # no daphne, no Twisted: nothing here is used
    TCPServer = HTTPChannel = None

log = logging.getLogger("pushsite.server")

# Registered codes a server may send (RFC 6455 section 7.4.1, IANA registry).
SERVER_CLOSE_CODES = frozenset({1001, 1008, 1011, 1012, 1013})


class PatchVersionError(RuntimeError):
    """The installed daphne, autobahn or Twisted is not what a patch was written for."""


@dataclass(frozen=True)
class Upstream:
    """A name in an upstream module that a patch replaces or relies on."""

    path: str  # "module:Qual.name"
    params: tuple[str, ...] | None = None  # its parameters, where the patch overrides or calls it
    uses: tuple[str, ...] = ()  # names its code reads or sets (co_names): instance attributes, globals
    replaced: bool = False  # the patch puts its own in place of this one

    def problem(self) -> str | None:
        """Why this name is not what the patch was written against, or None."""
        module_name, _, qualname = self.path.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as error:  # any failure to import means the patch cannot stand
            return f"{self.path}, and {module_name} does not import ({error!r})"
        for part in qualname.split("."):
            if not hasattr(obj, part):
                return f"{self.path}, which is not there"
            obj = getattr(obj, part)
        # A name replaced in place keeps upstream's as __wrapped__: check that one.
        obj = inspect.unwrap(obj)
        if self.params is not None:
            found = tuple(inspect.signature(obj).parameters)
            if found != self.params:
                return f"{self.path}({', '.join(self.params)}), and it takes ({', '.join(found)})"
        if self.uses:
            code = getattr(obj, "__code__", None)
            absent = [name for name in self.uses if code is None or name not in code.co_names]
            if absent:
                return f"{self.path} to use {', '.join(absent)}, and it does not"
        return None


@dataclass(frozen=True)
class Patch:
    """One numbered item of this module's docstring: what it was written for, and when it can go."""

    number: int
    name: str
    written_for: dict[str, tuple[str, ...]]  # distribution -> versions the patch was checked against
    replaces: str
    drop_when: str
    upstream: tuple[Upstream, ...]


DAPHNE = ("4.2.3",)
AUTOBAHN = ("26.11.1",)
TWISTED = ("26.10.0",)

_SERVER_SEND = Upstream("daphne.ws_protocol:WebSocketProtocol.serverSend", ("self", "content", "binary"), replaced=True)
# pending_bytes reads Twisted's write buffer; were it renamed, it would read 0 for ever.
_WRITE_BUFFER = (
    Upstream("twisted.internet.abstract:FileDescriptor.dataBuffer"),
    Upstream("twisted.internet.abstract:FileDescriptor.offset"),
    Upstream("twisted.internet.abstract:FileDescriptor.__init__", uses=("_tempDataLen",)),
)
_WS = "autobahn.websocket.protocol"

PATCHES = (
    Patch(
        1,
        "registered close codes",
        {"daphne": DAPHNE, "autobahn": AUTOBAHN},
        replaces="daphne's serverClose calls autobahn's sendClose, which refuses every code but 1000 and 3000-4999",
        drop_when="autobahn's sendClose accepts the registered codes a server may send (1001, 1008, 1011-1013)",
        upstream=(
            Upstream("daphne.ws_protocol:WebSocketFactory.protocol", replaced=True),
            Upstream("daphne.ws_protocol:WebSocketProtocol.serverClose", ("self", "code"), replaced=True),
            Upstream(f"{_WS}:WebSocketProtocol.sendCloseFrame", ("self", "code", "reasonUtf8", "isReply")),
        ),
    ),
    Patch(
        2,
        "bound on unread bytes",
        {"daphne": DAPHNE, "Twisted": TWISTED},
        replaces="daphne's serverSend hands every frame to Twisted's transport, which queues what a client "
        "does not read without bound",
        drop_when="daphne or Twisted drops a connection whose write buffer passes a limit",
        upstream=(
            _SERVER_SEND,
            *_WRITE_BUFFER,
            Upstream("daphne.ws_protocol:WebSocketProtocol.onConnect", uses=("client_addr",)),
            Upstream("twisted.internet.tcp:Server.abortConnection", ("self",)),
        ),
    ),
    Patch(
        3,
        "no writes once the close handshake has begun",
        {"daphne": DAPHNE, "autobahn": AUTOBAHN},
        replaces="daphne's serverSend calls autobahn's sendMessage, which raises on a closing socket "
        "and ends the consumer before its disconnect handler runs",
        drop_when="daphne's serverSend ignores a send to a socket that is closing or closed",
        upstream=(
            _SERVER_SEND,
            Upstream(f"{_WS}:WebSocketProtocol.STATE_CLOSING"),
            Upstream(f"{_WS}:WebSocketProtocol.STATE_CLOSED"),
        ),
    ),
    Patch(
        4,
        "text frames written straight to the socket",
        {"daphne": DAPHNE, "autobahn": AUTOBAHN, "Twisted": TWISTED},
        replaces="daphne's serverSend through autobahn's sendMessage and Twisted's queued write: a formatted "
        "debug call, a frame built field by field and an add_writer/remove_writer pair per frame",
        drop_when="a broadcast's profile (bench/README.md) no longer puts that send path above pushsite's own "
        "per-socket work",
        upstream=(
            _SERVER_SEND,
            *_WRITE_BUFFER,
            Upstream(f"{_WS}:WebSocketProtocol.STATE_OPEN"),
            Upstream(f"{_WS}:WebSocketProtocol._connectionMade", uses=("send_queue", "_perMessageCompress")),
            Upstream(
                f"{_WS}:WebSocketProtocol.sendMessage",
                uses=("autoFragmentSize", "maxMessagePayloadSize", "_perMessageCompress"),
            ),
            Upstream("twisted.internet.tcp:Server"),
            Upstream("twisted.internet.tcp:Connection.__init__", uses=("socket",)),
            Upstream("twisted.internet.abstract:FileDescriptor.connected"),
            Upstream("twisted.internet.abstract:FileDescriptor.disconnecting"),
        ),
    ),
    Patch(
        5,
        "handshake state released once open",
        {"daphne": DAPHNE, "autobahn": AUTOBAHN, "Twisted": TWISTED},
        replaces="daphne's upgrade leaves Twisted's HTTPChannel as the transport's producer, and autobahn and "
        "daphne keep their copies of the handshake for the socket's life",
        drop_when="daphne unregisters the HTTP channel when it hands the transport over, and autobahn and daphne "
        "let go of the handshake once the socket is open",
        upstream=(
            Upstream("daphne.ws_protocol:WebSocketProtocol.onOpen", ("self",), replaced=True),
            Upstream("daphne.ws_protocol:WebSocketProtocol.onConnect", uses=("request", "clean_headers")),
            Upstream(
                f"{_WS}:WebSocketServerProtocol.processHandshake",
                uses=("http_request_data", "http_headers", "http_request_params"),
            ),
            Upstream("autobahn.websocket.types:ConnectionRequest.__init__", uses=("headers", "params")),
            Upstream("twisted.web.http:HTTPChannel.connectionMade", uses=("registerProducer",)),
            Upstream("twisted.internet.abstract:FileDescriptor.producer"),
            Upstream("twisted.internet.abstract:FileDescriptor.unregisterProducer", ("self",)),
        ),
    ),
    Patch(
        6,
        "small input queues",
        {"daphne": DAPHNE},
        replaces="daphne's Server.create_application gives each connection an asyncio.Queue (four deques) "
        "for one reader and one frame at a time",
        drop_when="daphne's per-connection queue costs about what InputQueue does (bench/README.md, KiB per socket)",
        upstream=(
            Upstream(
                "daphne.server:Server.create_application",
                ("self", "protocol", "scope"),
                uses=("connections", "application", "handle_reply"),
                replaced=True,
            ),
            Upstream("daphne.server:Server.handle_reply", ("self", "protocol", "message")),
        ),
    ),
    Patch(
        7,
        "autobahn debug arguments built on demand",
        {"autobahn": AUTOBAHN},
        replaces="autobahn.websocket.protocol builds pformat, hltype and hlval arguments for log.debug calls "
        "that write nothing with debug off",
        drop_when="autobahn builds its debug-only log arguments only when debug is on",
        upstream=(
            *(Upstream(f"{_WS}:{name}", replaced=True) for name in ("pformat", "hltype", "hlval")),
            Upstream(f"{_WS}:WebSocketProtocol._connectionMade", uses=("pformat",)),
            Upstream(f"{_WS}:WebSocketProtocol.sendData", uses=("hltype", "hlval")),
        ),
    ),
    Patch(
        8,
        "invalid UTF-8 closes with 1007",
        {"autobahn": AUTOBAHN},
        replaces="autobahn's _invalid_payload fails the connection by dropping TCP when failByDrop is on "
        "(a server's default), so a text frame of invalid UTF-8 reset the connection instead of closing it with 1007",
        drop_when="autobahn sends the 1007 close frame for invalid UTF-8 whatever failByDrop says",
        upstream=(
            Upstream(
                f"{_WS}:WebSocketProtocol._invalid_payload",
                ("self", "reason"),
                uses=("_fail_connection", "failByDrop"),
                replaced=True,
            ),
        ),
    ),
    Patch(
        9,
        "listen backlog",
        {"daphne": DAPHNE, "Twisted": TWISTED},
        replaces="daphne's endpoint strings name no backlog, so Twisted's tcp and unix listeners take 50, "
        "and a reconnect storm's connections past it wait a second for their SYN to be sent again",
        drop_when="daphne takes a backlog option, or its endpoint strings ask for one of a few thousand",
        upstream=(
            Upstream("daphne.server:serverFromString", ("reactor", "description"), replaced=True),
            Upstream("daphne.server:Server.run", uses=("serverFromString",)),
            Upstream("twisted.internet.endpoints:_parseTCP", ("factory", "port", "interface", "backlog")),
            Upstream("twisted.internet.endpoints:_parseUNIX", ("factory", "address", "mode", "backlog", "lockfile")),
        ),
    ),
)


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_patches(patches: tuple[Patch, ...] = PATCHES) -> None:
    """Raise PatchVersionError unless every patch meets the versions and upstream names it was written for."""
    refused = []
    for patch in patches:
        problems = []
        for distribution, versions in patch.written_for.items():
            found = installed_version(distribution)
            if found not in versions:
                problems.append(
                    f"written for {distribution} {' or '.join(versions)}, found "
                    + (f"{distribution} {found}" if found else f"no {distribution} installed")
                )
        problems += [f"needs {problem}" for need in patch.upstream if (problem := need.problem())]
        if problems:
            refused.append(
                f"  patch {patch.number} ({patch.name}): {'; '.join(problems)}.\n"
                f"    Upstream behaviour it replaces: {patch.replaces}. Drop it when {patch.drop_when}."
            )
    if refused:
        raise PatchVersionError(
            "pushsite/server.py will not patch daphne, autobahn and Twisted it was not written for:\n"
            + "\n".join(refused)
            + "\nInstall the versions named, or re-check each patch named against what is installed (or drop it)"
            " and update its entry in PATCHES (pushsite/server.py)."
        )


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
    """Check, then install, every patch in PATCHES; False without daphne."""
    try:
        from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
    except ImportError:
        return False
    check_patches()  # before anything is patched
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

        def _invalid_payload(self, reason):
            # Item 8: send the close frame (1007) rather than drop the TCP connection.
            self.failByDrop = False
            return super()._invalid_payload(reason)

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
                metrics.frame_dropped("closed")
                return
            if pending_bytes(self.transport) > max_pending_bytes():
                metrics.frame_dropped("slow_client")
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
    _listen_backlog()
    return True


# An endpoint string's kind, and a ``backlog`` parameter it names (``\:`` is an escaped colon).
_LISTENS_WITH_BACKLOG = ("tcp", "tcp6", "unix")
_BACKLOG_PARAMETER = re.compile(r"(?<!\\):backlog=")


def with_backlog(description: str, backlog: int) -> str:
    """A Twisted server endpoint string listening with ``backlog``, unless it names its own (item 9)."""
    kind = description.split(":", 1)[0]
    if kind not in _LISTENS_WITH_BACKLOG or _BACKLOG_PARAMETER.search(description):
        return description
    return f"{description}:backlog={backlog}"


def _listen_backlog() -> None:
    """daphne's listeners, built from its endpoint strings with PUSH_LISTEN_BACKLOG (item 9)."""
    import daphne.server as server

    upstream = server.serverFromString
    if getattr(upstream, "pushsite_backlog", False):
        return

    def serverFromString(reactor: Any, description: str) -> Any:  # the name daphne calls
        from django.conf import settings

        return upstream(reactor, with_backlog(description, settings.PUSH_LISTEN_BACKLOG))

    serverFromString.__wrapped__ = upstream  # type: ignore[attr-defined]  # what check_patches reads
    serverFromString.pushsite_backlog = True  # type: ignore[attr-defined]
    server.serverFromString = serverFromString


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
    """daphne's Server.create_application, with an InputQueue for protocol_class's sockets (item 6)."""
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

    create_application.__wrapped__ = daphnes_own  # type: ignore[attr-defined]  # what check_patches reads
    Server.create_application = create_application
