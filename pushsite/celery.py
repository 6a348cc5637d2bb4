"""The Celery app: broker from settings (CELERY_BROKER_URL, else REDIS_URL, else
an embedded filesystem broker that works across processes)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")

app = Celery("pushsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
