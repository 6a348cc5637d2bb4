from django.apps import AppConfig


class ConnectionsConfig(AppConfig):
    name = "connections"
    verbose_name = "Connections"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import request_finished

        from .bridge import close_request_connections

        request_finished.connect(close_request_connections, dispatch_uid="pushsite-close-request-connections")
