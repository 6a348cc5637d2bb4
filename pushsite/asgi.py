"""ASGI entry point: Django for HTTP, the push consumer for /ws/push/."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from connections.routing import websocket_urlpatterns  # noqa: E402
from connections.security import OriginCheck  # noqa: E402
from notifications.views import PushApiApp  # noqa: E402
from pushsite.server import install_close_codes  # noqa: E402

install_close_codes()

# Collecting less often raises fan-out with many sockets, at the cost of
# memory that grows between full collections (bench/README.md); opt-in.
if settings.PUSH_GC_THRESHOLD:
    gc.set_threshold(*settings.PUSH_GC_THRESHOLD)

http_app = django_asgi_app
if settings.PUSH_SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(django_asgi_app)

# The signed push API skips Django's request cycle (notifications/views.py, PushApiApp).
http_app = PushApiApp(http_app)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": OriginCheck(URLRouter(websocket_urlpatterns)),
    }
)
