"""Make sure a Django admin account exists (local profile only)."""

import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Create the superuser 'admin' when no superuser exists. The password is "
        "PUSH_ADMIN_PASSWORD, or a random one printed once. Local profile only."
    )

    def handle(self, *args, **options):
        if settings.PUSH_ENV != "local":
            raise CommandError("ensure_admin runs only with PUSH_ENV=local; use createsuperuser elsewhere")
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            self.stdout.write("an admin account exists already")
            return

        password = os.environ.get("PUSH_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        users.objects.create_superuser("admin", "", password)
        shown = "from PUSH_ADMIN_PASSWORD" if os.environ.get("PUSH_ADMIN_PASSWORD") else password
        self.stdout.write(self.style.SUCCESS(f"created admin account 'admin', password: {shown}"))
