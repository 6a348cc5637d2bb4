"""The periodic schedules: list, register, run now, pause, resume."""

import json

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from django_celery_beat.models import PeriodicTask

from notifications import periodic


class Command(BaseCommand):
    help = (
        "Manage the periodic schedules (django-celery-beat). "
        "list | register [--reset] | run NAME [--inline] | pause NAME | resume NAME"
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="show every schedule, its interval, state and last run")
        register = sub.add_parser("register", help="create the missing schedules (run on every deploy)")
        register.add_argument("--reset", action="store_true", help="restore intervals and arguments to defaults")
        run = sub.add_parser("run", help="run a schedule's task now")
        run.add_argument("name")
        run.add_argument("--inline", action="store_true", help="run in this process instead of queueing it")
        for verb in ("pause", "resume"):
            sub.add_parser(verb, help=f"{verb} a schedule").add_argument("name")

    def handle(self, *args, **options):
        try:
            return getattr(self, f"do_{options['action']}")(options)
        except PeriodicTask.DoesNotExist:
            raise CommandError(f"no schedule named {options.get('name')!r}; see 'schedules list'") from None
        except DatabaseError as error:
            raise CommandError(f"database unavailable: {error}") from error

    def do_list(self, options):
        last_runs = periodic.schedule_last_runs()
        tasks = PeriodicTask.objects.select_related("interval", "crontab").order_by("name")
        if not tasks:
            self.stdout.write("no schedules; run 'manage.py schedules register'")
        for task in tasks:
            state = self.style.SUCCESS("enabled") if task.enabled else self.style.WARNING("paused")
            run = last_runs.get(task.name)
            last = f"{run.state} at {run.started_at:%Y-%m-%d %H:%M:%S}" if run else "never"
            every = task.interval or task.crontab
            self.stdout.write(f"{task.name:<20} {task.task:<34} {every!s:<20} {state}  last run: {last}")

    def do_register(self, options):
        for name, what in periodic.schedules_register(reset=options["reset"]):
            self.stdout.write(f"{name}: {what}")

    def do_run(self, options):
        task = PeriodicTask.objects.get(name=options["name"])
        kwargs = json.loads(task.kwargs or "{}")
        if task.task == "notifications.push_system_notice":
            kwargs["run_key"] = periodic.manual_run_key(task.name)
        from celery import current_app

        if options["inline"]:
            result = current_app.tasks[task.task].apply(kwargs=kwargs, headers={"periodic_task_name": task.name})
            if result.failed():
                raise CommandError(f"{task.name} failed: {result.result}")
            self.stdout.write(self.style.SUCCESS(f"{task.name}: {json.dumps(result.result, default=str)}"))
        else:
            async_result = current_app.send_task(task.task, kwargs=kwargs, headers={"periodic_task_name": task.name})
            self.stdout.write(self.style.SUCCESS(f"{task.name}: queued as {async_result.id}"))

    def do_pause(self, options):
        periodic.schedule_set_enabled(name=options["name"], enabled=False)
        self.stdout.write(f"{options['name']}: paused")

    def do_resume(self, options):
        periodic.schedule_set_enabled(name=options["name"], enabled=True)
        self.stdout.write(f"{options['name']}: resumed")
