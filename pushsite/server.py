"""daphne, allowed to send the registered close codes the contract uses.

autobahn (daphne's WebSocket library) lets an application close only with
1000 or 3000-4999, so ``websocket.close`` with 1013 ("try again later", which
PROTOCOL.md requires when a server is full) raised inside daphne and the
client saw 1011. RFC 6455 lets a server send the IANA-registered codes; this
protocol sends them as close frames directly. Installed when the ASGI module
is imported under daphne (pushsite/asgi.py); guarded by
tests/connections/test_daphne.py::test_full_server_kicks_with_503_and_closes_1013.
"""

from __future__ import annotations

# Registered codes a server may send (RFC 6455 section 7.4.1, IANA registry).
SERVER_CLOSE_CODES = frozenset({1001, 1008, 1011, 1012, 1013})


def install_close_codes() -> bool:
    """Make daphne's WebSocket factory build our protocol; False without daphne."""
    try:
        from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
    except ImportError:
        return False
    if getattr(WebSocketFactory.protocol, "pushsite_close_codes", False):
        return True

    class PushWebSocketProtocol(WebSocketProtocol):
        pushsite_close_codes = True

        def serverClose(self, code=None):
            if code in SERVER_CLOSE_CODES:
                self.sendCloseFrame(code=code, isReply=False)
            else:
                super().serverClose(code)

    WebSocketFactory.protocol = PushWebSocketProtocol
    return True
