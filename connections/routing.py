"""WebSocket URL routes."""

from django.urls import path

from .consumers import PushConsumer

websocket_urlpatterns = [path("ws/push/", PushConsumer.as_asgi())]
