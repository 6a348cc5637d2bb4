"""What push_status reports: nodes, sockets, relation rows, queue, schedules, jobs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Count
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from connections.models import Connection, Node
from connections.selectors import online_counts
from pushsite.redis_client import redis_client_for

from .models import JobState, PushJob
from .periodic import schedule_last_runs


def queue_depth() -> int | None:
    """Tasks waiting in the Celery queue; None when the broker cannot be read."""
    url = settings.PUSH_BROKER_URL
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    try:
        if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
            client = redis_client_for(url)
            # kombu keeps one list per queue, plus one per priority step.
            return sum(client.llen(key) for key in client.scan_iter(match=f"{queue}*", count=100))
        if url == "filesystem://":
            return len(list(Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]).glob("*.msg")))
    except Exception:  # a status page must report, not fail, when the broker is down
        return None
    return None


def push_status() -> dict[str, Any]:
    now = timezone.now()
    dead_after = timedelta(seconds=settings.PUSH_NODE_DEAD_AFTER)
    counts = online_counts()
    nodes = []
    for node in Node.objects.order_by("node_id"):
        seen = counts.pop(node.node_id, {"users": 0, "online_sockets": 0, "rows": 0})
        nodes.append(
            {"node": node.node_id, "alive": now - node.heartbeat_at <= dead_after, "heartbeat_at": node.heartbeat_at}
            | seen
        )
    # Rows of a node with no liveness mark at all (its mark was reaped first).
    nodes.extend({"node": name, "alive": False, "heartbeat_at": None} | seen for name, seen in counts.items())
    last_runs = schedule_last_runs()
    schedules = [
        {
            "name": task.name,
            "task": task.task,
            "enabled": task.enabled,
            "every": str(task.interval or task.crontab),
            "last_run": last_runs.get(task.name),
            "beat_last_run_at": task.last_run_at,
        }
        for task in PeriodicTask.objects.select_related("interval", "crontab").order_by("name")
        if not task.task.startswith("celery.")
    ]
    jobs = dict(PushJob.objects.values_list("state").annotate(n=Count("id")).order_by())
    return {
        "nodes": nodes,
        "relation_rows": Connection.objects.count(),
        "online_users": Connection.objects.filter(user_status=1).values("uid").distinct().count(),
        "queue_depth": queue_depth(),
        "schedules": schedules,
        "jobs": {state: jobs.get(state, 0) for state in JobState.values},
    }
