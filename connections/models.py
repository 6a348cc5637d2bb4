"""The uid<->connection relation and the liveness marks of server processes.

A relation row exists while its socket is logged in on a live node; logout
marks it offline, close deletes it, and the rows of a node whose liveness mark
went stale are deleted by the reaper (connections.services.node_reap_dead).
"""

from django.db import models

from .protocol import ClientType


class UserStatus(models.IntegerChoices):
    OFFLINE = 0, "offline"
    ONLINE = 1, "online"


class Connection(models.Model):
    """One logged-in socket of a user."""

    uid = models.BigIntegerField(db_index=True)
    conn_id = models.CharField(max_length=96, unique=True, help_text="node id + socket number")
    node = models.CharField(max_length=64, db_index=True)
    user_status = models.SmallIntegerField(choices=UserStatus.choices, default=UserStatus.ONLINE)
    client_type = models.SmallIntegerField(choices=[(c.value, c.name.lower()) for c in ClientType])
    login_time = models.DateTimeField()
    update_time = models.DateTimeField()

    class Meta:
        db_table = "push_user_connection"
        indexes = [models.Index(fields=["user_status", "id"], name="push_conn_status_id")]

    def __str__(self) -> str:
        return f"uid {self.uid} on {self.conn_id}"


class Node(models.Model):
    """A server process and its liveness mark."""

    node_id = models.CharField(max_length=64, primary_key=True)
    hostname = models.CharField(max_length=255)
    pid = models.IntegerField()
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "push_node"

    def __str__(self) -> str:
        return self.node_id
