"""One row written by a statement of our own: the push API's per-request INSERTs and UPDATE.

A push answered by the API writes three rows (its idempotency claim, its
message, the claim's recorded answer). Through the ORM, ``save()`` and
``QuerySet.update()`` spent more CPU building each statement than MariaDB
spent running it (bench/README.md, "Exactly-once: what the check costs a
push"): the statements here are the same SQL, built once per model and
field list, with every value prepared by its own field exactly as the ORM
prepares it (``pre_save`` and ``get_db_prep_save`` for what is written,
``get_db_prep_value`` for what is matched). Errors are the ORM's: the
statements run on Django's cursor, which turns the driver's errors into
``django.db`` ones (IntegrityError for a duplicate key).

No model signals are sent; nothing in pushsite listens for them.
"""

from __future__ import annotations

import functools
from typing import Any

from django.db import models


@functools.lru_cache(maxsize=256)
def _insert_sql(model: type[models.Model], quote: Any) -> tuple[tuple[Any, ...], str, bool]:
    """The fields written, the statement, and whether the database assigns the key."""
    # Every column but an auto-increment key, which the database assigns.
    fields = tuple(f for f in model._meta.local_concrete_fields if not isinstance(f, models.AutoField))
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(["%s"] * len(fields))
    table = quote(model._meta.db_table)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({values})"  # noqa: S608 - quoted model names; values bound
    return fields, sql, model._meta.pk not in fields


def insert_row(connection: Any, obj: models.Model) -> None:
    """INSERT ``obj`` as a new row on ``connection``, as ``obj.save(force_insert=True)`` would; sets its pk."""
    fields, sql, key_from_database = _insert_sql(type(obj), connection.ops.quote_name)
    params = [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if key_from_database:
            obj.pk = cursor.lastrowid
    obj._state.adding = False
    obj._state.db = connection.alias


@functools.lru_cache(maxsize=256)
def _update_sql(model: type[models.Model], quote: Any, set_names: tuple[str, ...], where_names: tuple[str, ...]) -> str:
    meta = model._meta
    assignments = ", ".join(f"{quote(meta.get_field(name).column)} = %s" for name in set_names)
    matches = " AND ".join(f"{quote(meta.get_field(name).column)} = %s" for name in where_names)
    return f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {matches}"  # noqa: S608 - as above


def update_rows(connection: Any, model: type[models.Model], where: dict[str, Any], **values: Any) -> int:
    """``model.objects.filter(**where).update(**values)`` for equality matches on ``connection``; rows matched."""
    meta = model._meta
    sql = _update_sql(model, connection.ops.quote_name, tuple(values), tuple(where))
    params = [meta.get_field(name).get_db_prep_save(value, connection) for name, value in values.items()]
    params += [meta.get_field(name).get_db_prep_value(value, connection) for name, value in where.items()]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
