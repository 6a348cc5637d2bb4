"""pushsite: real-time push notifications for a Django site."""

from .celery import app as celery_app

__all__ = ["celery_app"]
