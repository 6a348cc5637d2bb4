"""Send a push through a pushsite's signed API, as the main site would."""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from notifications.client import PushClient, PushError


class Command(BaseCommand):
    help = "Send a signed push to a running pushsite (user notice, comment or system notice)."

    def add_arguments(self, parser):
        parser.add_argument("kind", choices=["user", "comment", "system"])
        parser.add_argument("--uid", type=int, action="append", default=[], help="target uid (repeatable)")
        parser.add_argument("--from-uid", type=int, default=0, help="sender uid (comments need one)")
        parser.add_argument("--body", default="{}", help='JSON object, e.g. \'{"title": "Hi"}\'')
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="pushsite base URL")
        parser.add_argument("--secret", default=None, help="API secret (default: PUSH_API_SECRET)")

    def handle(self, *args, **options):
        try:
            body = json.loads(options["body"])
        except ValueError as error:
            raise CommandError(f"--body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise CommandError("--body must be a JSON object")
        kind, uids = options["kind"], options["uid"]
        if kind != "system" and not uids:
            raise CommandError(f"a {kind} push needs at least one --uid")
        client = PushClient(options["url"], secret=options["secret"] or settings.PUSH_API_SECRET)
        try:
            if kind == "user":
                answer = client.user_message(uids, body, from_uid=options["from_uid"])
            elif kind == "comment":
                answer = client.comment(uids, body, from_uid=options["from_uid"])
            else:
                answer = client.system_message(body)
        except PushError as error:
            raise CommandError(f"push refused: {error}") from None
        self.stdout.write(self.style.SUCCESS(json.dumps(answer, ensure_ascii=False)))
