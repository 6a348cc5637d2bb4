"""The Celery app: broker from settings (CELERY_BROKER_URL, else REDIS_URL, else
an embedded filesystem broker that works across processes).

A worker started with ``PUSH_METRICS_PORT`` serves /metrics on that port
(PROTOCOL.md section 7): its prefork children count into files under
``PROMETHEUS_MULTIPROC_DIR`` (set here, before anything imports
prometheus_client), and the main process serves their sum.
"""

import os
import sys
import tempfile

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")


def _is_worker() -> bool:
    return "worker" in sys.argv[1:] and os.path.basename(sys.argv[0]).startswith("celery")


if _is_worker() and os.environ.get("PUSH_METRICS_PORT", "0").strip() not in ("", "0"):
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="pushsite-metrics-"))

app = Celery("pushsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_init.connect
def _serve_worker_metrics(**kwargs: object) -> None:
    from django.conf import settings

    if settings.PUSH_METRICS_PORT:
        from pushsite.metrics import serve_worker_metrics

        serve_worker_metrics(settings.PUSH_METRICS_PORT)


@signals.worker_shutdown.connect
def _remove_metrics_files(**kwargs: object) -> None:
    # The directory was made for this worker alone (above); its files die with it.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(directory).startswith("pushsite-metrics-"):
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
