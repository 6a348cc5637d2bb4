"""The message row, one table per shard (notifications.sharding builds them).

``PushMessageBase`` is abstract; ``message_model(n)`` makes the concrete class
of table ``user_push_msg_<n>``. ``noce_ack`` is unique per table and, being
random or derived from a run id and the uid, unique across tables too.
"""

from django.db import models


class PushMessageBase(models.Model):
    id = models.BigAutoField(primary_key=True)
    noce_ack = models.CharField(max_length=64, unique=True)
    to_uid = models.BigIntegerField()
    from_uid = models.BigIntegerField(default=0)
    msg_type = models.SmallIntegerField()
    client_type = models.SmallIntegerField(default=0, help_text="0: every client")
    body = models.JSONField()
    is_sent = models.BooleanField(default=False)
    is_read = models.BooleanField(default=False)
    create_time = models.DateTimeField()
    update_time = models.DateTimeField()

    shard: int = -1

    class Meta:
        abstract = True
        indexes = [
            models.Index(fields=["to_uid", "is_read", "msg_type"], name="%(class)s_unread"),
            models.Index(fields=["to_uid", "is_sent"], name="%(class)s_unsent"),
        ]

    def __str__(self) -> str:
        return f"{self.noce_ack} -> {self.to_uid}"
