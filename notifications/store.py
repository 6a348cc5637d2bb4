"""Writes to the sharded message store.

Invariants:
* one push is stored all or nothing: the shards of one database alias share a
  transaction, and if a later alias fails the rows already committed on the
  others are deleted again; so are those of an alias whose commit failed, since
  a server that stops drops the reply to a commit it has done; an undo the
  database refused is retried before this process stores the next push;
* a job's batch (``messages_store_batch``) stored again adds no row: its
  noce_acks are derived and unique, and rows already there are skipped; it is
  all or nothing over every shard database until the commits, which come last;
* ``messages_ack`` and ``messages_mark_sent`` touch only rows whose ``to_uid``
  is the given user's: a user can never ack another user's messages.

Guarded by tests/notifications/test_store.py and tests/faults/test_mariadb_restart.py.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.models.constants import OnConflict
from django.utils import timezone

from connections.protocol import MsgType
from pushsite import metrics

from .rows import insert_row
from .sharding import message_model, shard_alias, shard_of, shards_by_alias

log = logging.getLogger(__name__)


def new_noce_ack() -> str:
    """A fresh unique message id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


# --- shard tables -------------------------------------------------------------


def shard_tables_create(*, aliases: Iterable[str] | None = None, indexes: bool = True) -> dict[str, list[int]]:
    """Create every missing shard table; returns {alias: [shards created]}.

    ``indexes`` also gives tables made before an index was declared that index;
    it reads every table's constraints, which is slow on SQLite (about 1 s).
    """
    created: dict[str, list[int]] = {}
    for alias, shards in shards_by_alias().items():
        if aliases is not None and alias not in aliases:
            continue
        connection = connections[alias]
        existing = set(connection.introspection.table_names())
        missing = [s for s in shards if message_model(s)._meta.db_table not in existing]
        with connection.schema_editor() as editor:
            for shard in missing:
                editor.create_model(message_model(shard))
            for shard in shards if indexes else ():
                if shard not in missing:
                    _add_missing_indexes(connection, editor, message_model(shard))
        created[alias] = missing
    return created


def _add_missing_indexes(connection: Any, editor: Any, model: Any) -> None:
    """Tables made before an index was declared get it now."""
    with connection.cursor() as cursor:
        present = set(connection.introspection.get_constraints(cursor, model._meta.db_table))
    for index in model._meta.indexes:
        if index.name not in present:
            editor.add_index(model, index)


def shard_tables_create_on_migrate(*, using: str = "default", **kwargs: Any) -> None:
    """post_migrate hook: a migrated database has its shard tables too.

    ``flush`` (every transactional test's teardown) sends post_migrate as well,
    without a migration ``plan``: it changes no schema, so only missing tables
    are looked for then, not missing indexes.
    """
    if using in set(shards_by_alias()):
        shard_tables_create(aliases=[using], indexes="plan" in kwargs)


# --- storing ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewMessage:
    to_uid: int
    msg_type: MsgType
    body: dict[str, Any]
    from_uid: int = 0
    noce_ack: str = field(default_factory=new_noce_ack)

    @classmethod
    def from_row(cls, row: Any) -> NewMessage:
        """A stored row, to publish again under its own noce_ack."""
        return cls(
            to_uid=row.to_uid,
            msg_type=MsgType(row.msg_type),
            body=row.body,
            from_uid=row.from_uid,
            noce_ack=row.noce_ack,
        )


def messages_store(*, messages: list[NewMessage], ignore_existing: bool = False) -> int:
    """Store messages in their shards, all or nothing; returns rows written.

    ``ignore_existing`` skips rows whose noce_ack is already stored, which
    makes a retried run with derived noce_acks idempotent; a failed push
    undoes only the rows it wrote.
    """
    now = timezone.now()
    by_shard: dict[int, list[Any]] = defaultdict(list)
    for message in messages:
        shard = shard_of(message.to_uid)
        by_shard[shard].append(
            message_model(shard)(
                noce_ack=message.noce_ack,
                to_uid=message.to_uid,
                from_uid=message.from_uid,
                msg_type=int(message.msg_type),
                body=message.body,
                create_time=now,
                update_time=now,
            )
        )
    by_alias: dict[str, list[int]] = defaultdict(list)
    for shard in by_shard:
        by_alias[shard_alias(shard)].append(shard)

    _undo_pending()
    committed: list[str] = []
    written = 0
    try:
        if len(messages) == 1 and not ignore_existing:
            # One row is one INSERT, atomic and durable by itself in autocommit:
            # no transaction to open and commit, three round trips of four for
            # the common single-user push. The connection is made and checked
            # first, so only an error of the statement itself may follow a commit.
            ((shard, (row,)),) = by_shard.items()
            alias = shard_alias(shard)
            connection = connections[alias]
            connection.close_if_health_check_failed()
            connection.ensure_connection()
            committed.append(alias)
            try:
                insert_row(connection, row)
            except IntegrityError:
                committed.clear()  # refused (its noce_ack exists): nothing stored, and the existing row stays
                raise
            metrics.messages_stored(row.msg_type, 1)
            return 1
        for alias, shards in by_alias.items():
            with transaction.atomic(using=alias):
                for shard in shards:
                    model = message_model(shard)
                    rows = by_shard[shard]
                    if ignore_existing:
                        acks = [row.noce_ack for row in rows]
                        existing = set(model.objects.filter(noce_ack__in=acks).values_list("noce_ack", flat=True))
                        # Only the rows written here are undone if the push fails.
                        rows = by_shard[shard] = [row for row in rows if row.noce_ack not in existing]
                    model.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=ignore_existing)
                    written += len(rows)
                # Only the commit is left, and an error from here on may follow a
                # commit the server did: a stopped MariaDB drops the reply.
                committed.append(alias)
    except DatabaseError:
        if committed:
            _compensate(by_alias, by_shard, committed)
        raise
    _count_stored(row for rows in by_shard.values() for row in rows)
    return written


def _count_stored(rows: Iterable[Any]) -> None:
    by_type = Counter(int(row.msg_type) for row in rows)
    for msg_type, n in by_type.items():
        metrics.messages_stored(msg_type, n)


def _compensate(by_alias: dict[str, list[int]], by_shard: dict[int, list[Any]], committed: list[str]) -> None:
    """Delete what one push may have committed before failing; what the database refuses is undone later."""
    undos = [
        (alias, shard, [row.noce_ack for row in by_shard[shard]]) for alias in committed for shard in by_alias[alias]
    ]
    _undo(undos)


# Undos the database refused (it was down), retried before the next store.
_undos: list[tuple[str, int, list[str]]] = []
_undos_lock = threading.Lock()


def _undo(undos: list[tuple[str, int, list[str]]], *, retrying: bool = False) -> None:
    """Delete (alias, shard, noce_acks) rows; from the first refusal on, queue the rest for later."""
    for index, (alias, shard, acks) in enumerate(undos):
        try:
            message_model(shard).objects.using(alias).filter(noce_ack__in=acks).delete()
        except DatabaseError as error:
            left = undos[index:]
            if not retrying:
                log.error("could not undo a failed push on %d shards yet (%s); will retry", len(left), error)
            with _undos_lock:
                _undos.extend(left)
            return
    if retrying:
        log.warning("undid failed pushes on %d shards after the database came back", len(undos))


def _undo_pending() -> None:
    """Retry the undos the database refused."""
    with _undos_lock:
        pending = _undos[:]
        _undos.clear()
    if pending:
        _undo(pending, retrying=True)


def _acks_by_shard(pairs: Iterable[tuple[int, str]]) -> dict[int, dict[str, int]]:
    grouped: dict[int, dict[str, int]] = defaultdict(dict)
    for uid, noce_ack in pairs:
        grouped[shard_of(uid)][noce_ack] = uid
    return grouped


def messages_mark_sent(*, pairs: list[tuple[int, str]]) -> int:
    """Mark (uid, noce_ack) pairs as handed to a socket; one UPDATE per shard, one commit per database.

    A node flushes its marks five times a second, and the pushes of a busy
    site spread over most shards: one ORM query and one autocommit per shard
    took most of a delivering daphne's CPU (bench/README.md, latency). The
    UPDATEs are written out and each shard database commits them once.
    """
    now = timezone.now()
    updated = 0
    by_shard = _acks_by_shard(pairs)
    for alias, shards in shards_by_alias().items():
        mine = [shard for shard in shards if shard in by_shard]
        if not mine:
            continue
        connection = connections[alias]
        ops = connection.ops
        stamp = ops.adapt_datetimefield_value(now)
        with transaction.atomic(using=alias), connection.cursor() as cursor:
            for shard in mine:
                acks = by_shard[shard]
                uids = sorted(set(acks.values()))
                table = ops.quote_name(message_model(shard)._meta.db_table)
                ack_marks, uid_marks = ", ".join(["%s"] * len(acks)), ", ".join(["%s"] * len(uids))
                cursor.execute(
                    f"UPDATE {table} SET is_sent = %s, update_time = %s"  # noqa: S608 - the model's table; values bound
                    f" WHERE noce_ack IN ({ack_marks}) AND to_uid IN ({uid_marks}) AND is_sent = %s",
                    [True, stamp, *sorted(acks), *uids, False],
                )
                updated += cursor.rowcount
    return updated


def messages_ack(*, uid: int, noce_acks: list[str]) -> int:
    """Mark the user's own messages read; another user's noce_ack changes nothing."""
    if not noce_acks:
        return 0
    return (
        message_model(shard_of(uid))
        .objects.filter(to_uid=uid, noce_ack__in=noce_acks, is_read=False)
        .update(is_read=True, update_time=timezone.now())
    )


# --- a job's batches ----------------------------------------------------------


def messages_store_batch(*, messages: list[NewMessage]) -> int:
    """Store a job's batch of messages, skipping noce_acks already stored; returns rows written.

    For jobs, whose noce_acks are derived from the job id and the uid: a
    batch stored again (a job resumed, re-queued or run twice at once) adds
    nothing, through the unique noce_ack and INSERT IGNORE rather than a read
    first. Each shard table gets one multi-row INSERT; the transactions of all
    shard databases are committed together at the end, so a batch that fails
    leaves nothing behind, except after a crash between two commits, which
    the job's re-run completes.
    """
    if not messages:
        return 0
    by_shard: dict[int, list[NewMessage]] = defaultdict(list)
    for message in messages:
        by_shard[shard_of(message.to_uid)].append(message)
    by_alias: dict[str, list[int]] = defaultdict(list)
    for shard in sorted(by_shard):  # one order of tables, so two runs of a job lock them alike
        by_alias[shard_alias(shard)].append(shard)
    now = timezone.now()
    written = 0
    with ExitStack() as transactions:
        for alias, shards in by_alias.items():
            transactions.enter_context(transaction.atomic(using=alias))
            connection = connections[alias]
            tails: dict[tuple[int, int, int], bytes] = {}  # escaped once per batch, see _insert_ignore_mysql
            with connection.cursor() as cursor:
                for shard in shards:
                    model = message_model(shard)
                    if connection.vendor == "mysql":
                        written += _insert_ignore_mysql(connection, cursor, model, by_shard[shard], now, tails)
                        continue
                    sql, params = _insert_ignore(connection, model, by_shard[shard], now)
                    cursor.executemany(sql, params)
                    written += cursor.rowcount  # the rows ignored are not counted
    # A job's batch is of one msg_type; the rows INSERT IGNORE skipped are not counted.
    metrics.messages_stored(int(messages[0].msg_type), written)
    return written


# noce_ack and to_uid first: they are the only values that differ between the rows of a job's batch.
_BATCH_FIELDS = ("noce_ack", "to_uid", "from_uid", "msg_type", "body", "client_type", "is_sent", "is_read")


def _insert_ignore_into(connection: Any, model: Any) -> tuple[list[Any], str]:
    """The fields a batch writes, and ``INSERT IGNORE INTO <table> (<columns>)`` for them."""
    meta = model._meta
    fields = [meta.get_field(name) for name in (*_BATCH_FIELDS, "create_time", "update_time")]
    ops = connection.ops
    columns = ", ".join(ops.quote_name(f.column) for f in fields)
    insert = ops.insert_statement(on_conflict=OnConflict.IGNORE)
    return fields, f"{insert} {ops.quote_name(meta.db_table)} ({columns})"


def _insert_ignore(connection: Any, model: Any, messages: list[NewMessage], now: Any) -> tuple[str, list[tuple]]:
    """The ``INSERT IGNORE ... VALUES (%s, ...)`` of one shard table, and its rows.

    Written out rather than ``bulk_create``: building a model instance per row
    and preparing every field of every one took most of a batch's time, and
    ``bulk_create`` with ``ignore_conflicts`` does not say how many rows it
    wrote. Values shared by the rows are prepared once, by their fields.
    """
    meta = model._meta
    fields, insert_into = _insert_ignore_into(connection, model)
    values = ", ".join(["%s"] * len(fields))
    suffix = connection.ops.on_conflict_suffix_sql(fields, OnConflict.IGNORE, None, None)
    sql = f"{insert_into} VALUES ({values}) {suffix}"
    defaults = tuple(f.get_db_prep_save(f.get_default(), connection) for f in fields[5:8])  # client_type .. is_read
    stamp = meta.get_field("create_time").get_db_prep_save(now, connection)
    body_field = meta.get_field("body")
    bodies: dict[int, Any] = {}  # a job's messages share one body object: encode it once
    params = []
    for m in messages:
        body = bodies.get(id(m.body))
        if body is None:
            body = bodies[id(m.body)] = body_field.get_db_prep_save(m.body, connection)
        params.append((m.noce_ack, m.to_uid, m.from_uid, int(m.msg_type), body, *defaults, stamp, stamp))
    return sql, params


# The longest multi-row INSERT written: what mysqlclient's executemany folds
# rows into (MySQLdb.cursors.BaseCursor.max_stmt_length), far below MariaDB's
# max_allowed_packet.
_MAX_STATEMENT = 64 * 1024


def _insert_ignore_mysql(
    connection: Any, cursor: Any, model: Any, messages: list[NewMessage], now: Any, tails: dict
) -> int:
    """INSERT IGNORE messages into one shard table on MariaDB/MySQL; returns rows written.

    The statement is written out with the values already escaped, as
    executemany would, but the values every row of a job's batch shares
    (sender, type, body, flags, times) are escaped once, into ``tails``, which
    the caller keeps for one batch; per row only noce_ack and to_uid are. Escaping
    ten values per row was a sixth of a broadcast's time (bench/README.md,
    storage). Each value still goes through the connection's own ``literal``,
    so the rows read byte for byte as executemany writes them.
    """
    fields, insert_into = _insert_ignore_into(connection, model)
    head = f"{insert_into} VALUES ".encode()
    literal = connection.connection.literal
    rows = []
    for m in messages:
        key = (int(m.msg_type), m.from_uid, id(m.body))  # the body objects live as long as the batch
        tail = tails.get(key)
        if tail is None:
            shared = (
                m.from_uid,
                int(m.msg_type),
                fields[4].get_db_prep_save(m.body, connection),
                *(f.get_db_prep_save(f.get_default(), connection) for f in fields[5:8]),  # client_type .. is_read
                *(f.get_db_prep_save(now, connection) for f in fields[8:]),
            )
            tail = tails[key] = b"".join(b", " + literal(value) for value in shared) + b")"
        rows.append(b"(" + literal(m.noce_ack) + b", %d" % m.to_uid + tail)
    written = 0
    start, size = 0, len(head)
    for end, row in enumerate(rows):
        if end > start and size + len(row) + 1 > _MAX_STATEMENT:
            cursor.execute(head + b",".join(rows[start:end]))
            written += cursor.rowcount
            start, size = end, len(head)
        size += len(row) + 1
    cursor.execute(head + b",".join(rows[start:]))
    return written + cursor.rowcount
