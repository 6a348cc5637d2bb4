"""Origin check for WebSocket handshakes.

``PUSH_ALLOWED_ORIGINS`` lists the origins (scheme://host[:port]) whose pages
may open a socket; ``*`` (the default outside production) allows any. A
handshake without an Origin header (apps, servers) is allowed: Origin guards
browsers against cross-site use, and non-browser clients still have to log in.
"""

from __future__ import annotations

from typing import Any

from channels.security.websocket import WebsocketDenier
from django.conf import settings


class OriginCheck:
    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)


def origin_allowed(scope: dict[str, Any]) -> bool:
    allowed = settings.PUSH_ALLOWED_ORIGINS
    if "*" in allowed:
        return True
    origin = next((v for k, v in scope.get("headers", []) if k == b"origin"), None)
    if origin is None:
        return True
    return origin.decode("latin-1").rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed}
