"""A broadcast run now: one notification to every online user, stored first."""

import json

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from pydantic import ValidationError

from connections.models import Connection, UserStatus
from connections.protocol import MsgType
from notifications import envelopes, periodic
from notifications.services import push_job_run
from pushsite.errors import BackendUnavailable

TYPES = {"system": MsgType.SYSTEM_NOTICE, "user": MsgType.USER_NOTICE, "comment": MsgType.COMMENT}


class Command(BaseCommand):
    help = (
        "Store a notification for every online user and push it to those with no earlier unread "
        "one of its type. Safe to run again with the same --run-key: nothing is stored or pushed twice."
    )

    def add_arguments(self, parser):
        parser.add_argument("--type", choices=sorted(TYPES), default="system", help="msg_type of the notification")
        parser.add_argument("--body", required=True, help='JSON object, e.g. \'{"title": "Maintenance at 2:00"}\'')
        parser.add_argument("--batch-size", type=int, default=1000, help="relation rows per batch (1..10000)")
        parser.add_argument("--run-key", default=None, help="names the run: the same key resumes, never repeats")
        parser.add_argument("--dry-run", action="store_true", help="validate and count, store nothing")

    def handle(self, *args, **options):
        try:
            body = json.loads(options["body"])
            envelopes.SystemMessage.model_validate({"body": body})
        except ValueError as error:
            detail = envelopes.describe(error) if isinstance(error, ValidationError) else str(error)
            raise CommandError(f"--body refused: {detail}") from None
        batch_size = options["batch_size"]
        if not 1 <= batch_size <= 10000:
            raise CommandError("--batch-size must be from 1 to 10000")
        msg_type = TYPES[options["type"]]
        try:
            online = Connection.objects.filter(user_status=UserStatus.ONLINE).values("uid").distinct().count()
            if options["dry_run"]:
                batches = -(-online // batch_size)
                self.stdout.write(f"dry run: {online} online users in about {batches} batches; nothing stored")
                return
            job = periodic.broadcast_job(
                msg_type=msg_type, body=body, run_key=options["run_key"] or periodic.manual_run_key("run_broadcast")
            )
            self.stdout.write(f"run {job.id}: {online} online users, batches of {batch_size}")
            done = {"users": 0}

            def progress(users: int, stored: int, sent: int) -> None:
                done["users"] += users
                total = max(online, done["users"], 1)
                filled = int(30 * done["users"] / total)
                bar = "#" * filled + "." * (30 - filled)
                self.stdout.write(f"\r[{bar}] {done['users']}/{total} users", ending="")
                self.stdout.flush()

            job = push_job_run(job_id=job.id, batch_size=batch_size, progress=progress)
        except (DatabaseError, BackendUnavailable) as error:
            raise CommandError(f"broadcast stopped, run again with the same --run-key to resume: {error}") from error
        self.stdout.write("")
        self.stdout.write(self.style.SUCCESS(f"run {job.id}: stored {job.stored}, pushed {job.sent}"))
