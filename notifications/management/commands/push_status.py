"""Operational status: nodes, sockets, relation rows, queue depth, schedules, jobs."""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from notifications.status import push_status
from pushsite import metrics


class Command(BaseCommand):
    help = "Show online users and sockets per node, relation rows, queue depth and the last run of each schedule."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument(
            "--metrics",
            metavar="HOST:PORT,...",
            help="read these processes' /metrics (default: PUSH_METRICS_TARGETS), the figures Prometheus scrapes",
        )

    def handle(self, *args, **options):
        try:
            status = push_status()
        except DatabaseError as error:
            raise CommandError(f"database unavailable: {error}") from error
        targets = options["metrics"].split(",") if options["metrics"] else settings.PUSH_METRICS_TARGETS
        status["metrics"] = metrics.read_targets(t.strip() for t in targets if t.strip())
        if options["json"]:
            for schedule in status["schedules"]:
                run = schedule["last_run"]
                schedule["last_run"] = (
                    {"state": run.state, "started_at": run.started_at, "detail": run.detail} if run else None
                )
            self.stdout.write(json.dumps(status, default=str, indent=2))
            return
        out, style = self.stdout, self.style
        out.write(style.MIGRATE_HEADING("Nodes"))
        if not status["nodes"]:
            out.write("  none")
        for node in status["nodes"]:
            alive = style.SUCCESS("alive") if node["alive"] else style.ERROR("dead")
            out.write(
                f"  {node['node']:<32} {alive}  users {node['users']:>6}  sockets {node['online_sockets']:>6}"
                f"  relation rows {node['rows']:>6}"
            )
        out.write(f"Relation rows: {status['relation_rows']}   online users: {status['online_users']}")
        depth = status["queue_depth"]
        out.write(f"Queue depth: {'unknown (broker unreachable)' if depth is None else depth}")
        out.write(style.MIGRATE_HEADING("Schedules"))
        if not status["schedules"]:
            out.write("  none; run 'manage.py schedules register'")
        for schedule in status["schedules"]:
            run = schedule["last_run"]
            state = "enabled" if schedule["enabled"] else "paused"
            if run is None:
                last = "never run"
            else:
                colour = style.SUCCESS if run.state == "ok" else style.ERROR
                last = f"{colour(run.state)} at {run.started_at:%Y-%m-%d %H:%M:%S}"
                if run.state != "ok":
                    last += f" ({run.detail[:120]})"
            out.write(f"  {schedule['name']:<20} {schedule['every']:<20} {state:<8} last: {last}")
        jobs = status["jobs"]
        out.write("Jobs: " + ", ".join(f"{state} {n}" for state, n in jobs.items()))
        out.write(style.MIGRATE_HEADING("Metrics (each process's /metrics)"))
        if not status["metrics"]:
            out.write("  no targets; pass --metrics host:port,... or set PUSH_METRICS_TARGETS")
        for row in status["metrics"]:
            if row["error"]:
                out.write(f"  {row['target']:<24} {style.ERROR('unreachable')} ({row['error']})")
                continue
            out.write(
                f"  {row['target']:<24} sockets {row['sockets']:>6.0f}  logged in {row['logged_in']:>6.0f}"
                f"  logins ok {row['logins_ok']:.0f} refused {row['logins_refused']:.0f}"
                f" overloaded {row['logins_overloaded']:.0f}  frames {row['frames_sent']:.0f}"
                f" dropped {row['frames_dropped']:.0f}  stored {row['stored']:.0f}"
                f"  backend errors {row['backend_errors']:.0f}"
            )
