"""Create every missing shard table (user_push_msg_0 .. user_push_msg_127)."""

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from notifications.sharding import SHARD_COUNT, shards_by_alias
from notifications.store import shard_tables_create


class Command(BaseCommand):
    help = "Create the missing message shard tables on every shard database; safe to run again."

    def handle(self, *args, **options):
        try:
            created = shard_tables_create()
        except DatabaseError as error:
            raise CommandError(f"could not create shard tables: {error}") from error
        layout = shards_by_alias()
        for alias, shards in created.items():
            held = layout[alias]
            if shards:
                self.stdout.write(
                    self.style.SUCCESS(
                        f"{alias}: created {len(shards)} of {len(held)} shard tables "
                        f"(user_push_msg_{shards[0]} .. user_push_msg_{shards[-1]})"
                    )
                )
            else:
                self.stdout.write(f"{alias}: all {len(held)} shard tables already exist")
        total = sum(len(s) for s in created.values())
        self.stdout.write(f"{SHARD_COUNT} shards, {total} tables created now")
