from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from connections import inbox

        from .inbox import MessageInbox
        from .store import shard_tables_create_on_migrate

        post_migrate.connect(shard_tables_create_on_migrate, sender=self)
        # The transport's sessions reach messages only through this.
        inbox.register(MessageInbox())
