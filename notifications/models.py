"""The message row, one table per shard (notifications.sharding builds them).

``PushMessageBase`` is abstract; ``message_model(n)`` makes the concrete class
of table ``user_push_msg_<n>``. ``noce_ack`` is unique per table and, being
random or derived from a run id and the uid, unique across tables too.
``PushMessage`` exists only so the admin has a registered model (URLs,
permissions); the admin reads rows through ``message_model(n)``.
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


class PushMessage(PushMessageBase):
    """Shard 0's table as seen from the normal app registry, for the admin.

    The admin needs one registered model for its URLs and permissions; the
    rows it shows come from ``message_model(shard)`` (notifications/admin.py).
    Unmanaged, so migrations never touch the table; ``shard = 0`` because the
    table is shard 0's, so the router sends a stray query to the database that
    really holds it.
    """

    shard = 0

    class Meta:
        managed = False
        db_table = "user_push_msg_0"
        verbose_name = "message"


class JobState(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class PushJob(models.Model):
    """A push accepted for a worker: to many uids, or to every online user.

    The job row is committed before the API answers 202, so an accepted push
    survives a lost queue message; rows it stores get noce_acks derived from
    the job id and the uid, so running it again never stores a duplicate.
    """

    id = models.UUIDField(primary_key=True)
    msg_type = models.SmallIntegerField()
    from_uid = models.BigIntegerField(default=0)
    body = models.JSONField()
    uids = models.JSONField(null=True, blank=True, help_text="null: every online user")
    periodic = models.BooleanField(
        default=False, help_text="a broadcast run: push only to users with no earlier unread notice of this type"
    )
    state = models.CharField(max_length=10, choices=JobState.choices, default=JobState.PENDING, db_index=True)
    cursor = models.BigIntegerField(default=0, help_text="last relation row id done (system jobs)")
    stored = models.IntegerField(default=0)
    sent = models.IntegerField(default=0)
    attempts = models.IntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "push_job"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"job {self.id} ({self.state})"

    def noce_ack_for(self, uid: int) -> str:
        return f"{self.id.hex}-{uid}"


class ScheduleRun(models.Model):
    """The outcome of one periodic run, for push_status and the admin."""

    class State(models.TextChoices):
        RUNNING = "running"
        OK = "ok"
        FAILED = "failed"

    name = models.CharField(max_length=200, db_index=True)
    state = models.CharField(max_length=10, choices=State.choices)
    detail = models.TextField(blank=True)
    started_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "push_schedule_run"
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.name} {self.state} at {self.started_at:%Y-%m-%d %H:%M:%S}"


class PushRequest(models.Model):
    """An accepted push request, by its idempotency key: what makes a retry or a replay store nothing.

    ``key`` is ``key:<Idempotency-Key>``, or ``sig:<X-Push-Signature>`` for a
    request without one. A row with no ``status`` is a request still being
    answered; once answered it holds the answer, returned again to a retry.
    Kept in the database, not Redis, so the guarantee survives Redis losing
    what it held.
    """

    scope = models.CharField(max_length=100, help_text="the API path")
    key = models.CharField(max_length=200)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the request body")
    status = models.SmallIntegerField(null=True, blank=True)
    answer = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "push_request"
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="push_request_scope_key")]

    def __str__(self) -> str:
        return f"{self.scope} {self.key[:40]}"
