"""ASGI entry point: Django for HTTP, the push consumer for /ws/push/.

The same application runs on daphne nodes (WebSockets and everything else)
and on API nodes (uvicorn, ``--ws none``: HTTP only; deploy/README.md). On an
API node ``install_close_codes`` patches daphne classes nothing uses, and a
WebSocket handshake arrives as a plain HTTP request, answered 421 by
``RefuseUpgrade``. Guarded by tests/deploy/test_api_node.py.
"""

import gc
import json
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from connections.routing import websocket_urlpatterns  # noqa: E402
from connections.security import OriginCheck  # noqa: E402
from notifications.sharding import SHARD_COUNT, message_model  # noqa: E402
from notifications.views import PushApiApp  # noqa: E402
from pushsite.metrics import MetricsApp  # noqa: E402
from pushsite.server import install_close_codes  # noqa: E402

# Checks the daphne, autobahn and Twisted versions each patch was written for
# first: on a mismatch this raises, and neither daphne nor uvicorn starts.
install_close_codes()

# The 128 shard models (about 1.3 MB, 30 ms) are built once per process: at
# start-up, not under the first logins and pushes that reach each shard.
for _shard in range(SHARD_COUNT):
    message_model(_shard)

# Collecting less often raises fan-out with many sockets, at the cost of
# memory that grows between full collections (bench/README.md); opt-in.
if settings.PUSH_GC_THRESHOLD:
    gc.set_threshold(*settings.PUSH_GC_THRESHOLD)


class RefuseUpgrade:
    """ASGI: a WebSocket handshake that reached HTTP (an API node) is refused with 421 and the contract's JSON."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        for name, value in scope["headers"]:
            if name == b"upgrade" and value.lower() == b"websocket":
                await _refuse(send)
                return
        await self.inner(scope, receive, send)


async def _refuse(send: Any) -> None:
    body = json.dumps({"code": 421, "msg": "this node serves no WebSocket; connect to a WebSocket node"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 421,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


http_app = django_asgi_app
if settings.PUSH_SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(django_asgi_app)

# The signed push API skips Django's request cycle (notifications/views.py, PushApiApp).
http_app = RefuseUpgrade(MetricsApp(PushApiApp(http_app)))

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": OriginCheck(URLRouter(websocket_urlpatterns)),
    }
)
