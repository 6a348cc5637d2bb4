"""Routes each shard model to the database alias that holds its table."""

from django.conf import settings

from .sharding import SHARD_COUNT, shard_alias


class ShardRouter:
    """Shard models go to ``shard_alias(model.shard)``; everything else is left alone."""

    def db_for_read(self, model, **hints):
        shard = getattr(model, "shard", None)
        return shard_alias(shard) if isinstance(shard, int) and 0 <= shard < SHARD_COUNT else None

    db_for_write = db_for_read

    def allow_relation(self, obj1, obj2, **hints):
        return None

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        # A database that only holds shards gets no Django tables; its shard
        # tables come from init_push_tables (and the post_migrate hook).
        return False if db != "default" and db in settings.PUSH_SHARD_DATABASES else None
