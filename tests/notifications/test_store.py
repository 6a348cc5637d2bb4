"""The sharded store: one uid -> one shard -> one table on one database."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connections
from django.test.utils import CaptureQueriesContext

from connections.protocol import MsgType
from notifications.selectors import still_unread_of_type
from notifications.sharding import SHARD_COUNT, message_model, shard_alias, shard_of, shards_by_alias, uids_by_shard
from notifications.store import (
    NewMessage,
    messages_ack,
    messages_mark_sent,
    messages_store,
    messages_store_batch,
    shard_tables_create,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_shard_of_is_uid_mod_128():
    assert [shard_of(uid) for uid in (0, 1, 127, 128, 176906, 2**40 + 5)] == [0, 1, 127, 0, 176906 % 128, 5]
    assert message_model(5)._meta.db_table == "user_push_msg_5"
    with pytest.raises(ValueError, match="shard"):
        message_model(SHARD_COUNT)


def test_every_shard_has_exactly_one_alias():
    layout = shards_by_alias()
    assert sorted(s for shards in layout.values() for s in shards) == list(range(SHARD_COUNT))
    for alias, shards in layout.items():
        assert all(shard_alias(s) == alias for s in shards)
        assert shards == list(range(shards[0], shards[-1] + 1))  # contiguous ranges


def test_init_push_tables_is_idempotent_and_says_what_it_did(capsys):
    call_command("init_push_tables")
    out = capsys.readouterr().out
    assert "already exist" in out and "0 tables created now" in out
    for alias, shards in shards_by_alias().items():
        tables = set(connections[alias].introspection.table_names())
        assert {f"user_push_msg_{s}" for s in shards} <= tables


def test_init_push_tables_recreates_a_missing_table(capsys):
    model = message_model(77)
    alias = shard_alias(77)
    with connections[alias].schema_editor() as editor:
        editor.delete_model(model)
    try:
        call_command("init_push_tables")
        assert "created 1 of" in capsys.readouterr().out
        assert "user_push_msg_77" in connections[alias].introspection.table_names()
    finally:
        if "user_push_msg_77" not in connections[alias].introspection.table_names():
            with connections[alias].schema_editor() as editor:
                editor.create_model(model)


def _index_names(shard: int) -> set[str]:
    connection = connections[shard_alias(shard)]
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, message_model(shard)._meta.db_table)
    return {name for name, info in constraints.items() if info["index"] and not info["primary_key"]}


@pytest.mark.parametrize("command", ["migrate", "init_push_tables"])
def test_a_table_made_before_an_index_was_declared_gets_it_from_migrate_and_init(command):
    model, alias = message_model(91), shard_alias(91)
    declared = {index.name for index in model._meta.indexes}
    assert declared <= _index_names(91)
    with connections[alias].schema_editor() as editor:
        editor.remove_index(model, model._meta.indexes[0])
    try:
        call_command("flush", database=alias, interactive=False, verbosity=0)
        assert model._meta.indexes[0].name not in _index_names(91)  # a flush changes no schema
        call_command(command, verbosity=0, **({"database": alias} if command == "migrate" else {}))
        assert declared <= _index_names(91)
    finally:
        shard_tables_create(aliases=[alias])


def _raw_count(alias: str, table: str, uid: int) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE to_uid = %s", [uid])
        return cursor.fetchone()[0]


def test_rows_land_in_their_shard_table_on_their_database(new_uid):
    base = new_uid() * 128
    uids = [base + 3, base + 64 + 9, base + 127]
    assert messages_store(messages=[NewMessage(to_uid=u, msg_type=MsgType.USER_NOTICE, body={}) for u in uids]) == 3
    for uid in uids:
        table, alias = f"user_push_msg_{uid % 128}", shard_alias(uid % 128)
        assert _raw_count(alias, table, uid) == 1
        for other in set(connections) - {alias}:
            if table in connections[other].introspection.table_names():
                assert _raw_count(other, table, uid) == 0


@pytest.mark.skipif(len(shards_by_alias()) < 2, reason="needs PUSH_SHARD_DATABASE_URLS with two databases")
def test_two_databases_split_the_shards_in_halves():
    layout = shards_by_alias()
    assert sorted(len(s) for s in layout.values()) == [64, 64]
    first, second = sorted(layout.values())
    assert first == list(range(64)) and second == list(range(64, 128))
    names = {connections[alias].settings_dict["NAME"] for alias in layout}
    assert len(names) == 2


def test_store_with_derived_acks_ignores_rows_already_stored(new_uid):
    uid = new_uid()
    message = NewMessage(to_uid=uid, msg_type=MsgType.SYSTEM_NOTICE, body={"a": 1}, noce_ack=f"job-{uid}")
    assert messages_store(messages=[message], ignore_existing=True) == 1
    assert messages_store(messages=[message], ignore_existing=True) == 0
    assert message_model(shard_of(uid)).objects.filter(to_uid=uid).count() == 1


def test_a_failed_store_leaves_nothing_behind(new_uid):
    uid = new_uid()
    good = NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={}, noce_ack=f"dup-{uid}")
    clash = NewMessage(to_uid=uid + 1, msg_type=MsgType.USER_NOTICE, body={}, noce_ack=f"dup2-{uid}")
    messages_store(messages=[clash])
    with pytest.raises(Exception):  # noqa: B017, PT011 - the backend's IntegrityError
        messages_store(messages=[good, clash])
    assert not message_model(shard_of(uid)).objects.filter(noce_ack=good.noce_ack).exists()


def test_one_message_is_one_insert_statement(new_uid):
    # The single-user push skips the transaction: one INSERT, atomic by itself.
    uid = new_uid()
    alias = shard_alias(shard_of(uid))
    message = NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={"n": 1})
    with CaptureQueriesContext(connections[alias]) as queries:
        assert messages_store(messages=[message]) == 1
    assert [q["sql"].split()[0].upper() for q in queries] == ["INSERT"]
    assert message_model(shard_of(uid)).objects.get(noce_ack=message.noce_ack).body == {"n": 1}


def test_one_message_whose_noce_ack_exists_is_refused_and_the_row_stays(new_uid):
    uid = new_uid()
    first = NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={"first": True}, noce_ack=f"same-{uid}")
    messages_store(messages=[first])
    with pytest.raises(Exception):  # noqa: B017, PT011 - the backend's IntegrityError
        messages_store(
            messages=[NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={}, noce_ack=first.noce_ack)]
        )
    # A refused statement stored nothing, so nothing is undone: the first row is kept.
    assert message_model(shard_of(uid)).objects.get(noce_ack=first.noce_ack).body == {"first": True}


def test_mark_sent_and_ack_touch_only_the_owners_rows(new_uid):
    owner, other = new_uid(), new_uid()
    mine = NewMessage(to_uid=owner, msg_type=MsgType.USER_NOTICE, body={})
    theirs = NewMessage(to_uid=other, msg_type=MsgType.USER_NOTICE, body={})
    messages_store(messages=[mine, theirs])
    # A forged pair naming someone else's noce_ack under my uid changes nothing.
    assert messages_mark_sent(pairs=[(owner, theirs.noce_ack)]) == 0
    assert messages_ack(uid=owner, noce_acks=[theirs.noce_ack]) == 0
    assert messages_mark_sent(pairs=[(owner, mine.noce_ack)]) == 1
    assert messages_ack(uid=owner, noce_acks=[mine.noce_ack, theirs.noce_ack]) == 1
    row = message_model(shard_of(other)).objects.get(noce_ack=theirs.noce_ack)
    assert not row.is_read and not row.is_sent


def _commits(alias: str) -> int | None:
    """COMMIT statements run on this connection so far (MariaDB; None on SQLite)."""
    connection = connections[alias]
    if connection.vendor != "mysql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SHOW SESSION STATUS LIKE 'Com_commit'")
        return int(cursor.fetchone()[1])


def test_mark_sent_over_every_shard_marks_exactly_the_pairs_with_one_transaction_per_database(new_uid):
    base, prefix = new_uid() * 1000, f"sent{new_uid()}"
    messages = _job_batch(base, 300, prefix)
    messages_store_batch(messages=messages)
    chosen = messages[::2]
    pairs = [(m.to_uid, m.noce_ack) for m in chosen]
    pairs.append((base + 1, f"{prefix}-{base + 3}"))  # another user's row under a delivered uid: not marked
    commits_before = {alias: _commits(alias) for alias in shards_by_alias()}
    with ExitStack() as stack:
        captured = {
            alias: stack.enter_context(CaptureQueriesContext(connections[alias])) for alias in shards_by_alias()
        }
        assert messages_mark_sent(pairs=pairs) == len(chosen)
    for alias, shards in shards_by_alias().items():
        sql = [q["sql"].upper() for q in captured[alias].captured_queries]
        touched = {shard_of(uid) for uid, _ in pairs} & set(shards)
        assert sum(s.startswith("UPDATE") for s in sql) == len(touched)
        if commits_before[alias] is not None:  # MariaDB counts them: one COMMIT, not one per shard
            assert _commits(alias) - commits_before[alias] == 1
    marked = Counter()
    for shard, uids in uids_by_shard([m.to_uid for m in messages]).items():
        marked.update(
            message_model(shard).objects.filter(to_uid__in=uids, is_sent=True).values_list("noce_ack", flat=True)
        )
    assert set(marked) == {m.noce_ack for m in chosen}
    assert messages_mark_sent(pairs=pairs) == 0  # marked once


def test_migrations_are_coherent_with_the_models():
    # Shard models live outside the app registry, so they never reach here.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


# --- a job's batches ----------------------------------------------------------


def _job_rows(uids: list[int], prefix: str) -> Counter[int]:
    counts: Counter[int] = Counter()
    for shard, shard_uids in uids_by_shard(uids).items():
        counts.update(
            message_model(shard)
            .objects.filter(to_uid__in=shard_uids, noce_ack__startswith=prefix)
            .values_list("to_uid", flat=True)
        )
    return counts


def _job_batch(base: int, count: int, prefix: str, msg_type: MsgType = MsgType.SYSTEM_NOTICE) -> list[NewMessage]:
    """Messages to ``count`` consecutive uids: every shard, so every shard database."""
    body = {"batch": prefix}
    return [
        NewMessage(to_uid=base + n, msg_type=msg_type, body=body, noce_ack=f"{prefix}-{base + n}") for n in range(count)
    ]


def test_a_job_batch_stored_again_adds_only_the_missing_rows(new_uid):
    base, prefix = new_uid() * 1000, f"batch{new_uid()}"
    messages = _job_batch(base, 300, prefix)
    assert messages_store_batch(messages=messages[:120]) == 120  # a run cut off after part of a batch
    assert messages_store_batch(messages=messages) == 180  # its re-run, counting only what is new
    assert messages_store_batch(messages=messages) == 0
    assert _job_rows([m.to_uid for m in messages], prefix) == Counter({m.to_uid: 1 for m in messages})
    row = message_model(shard_of(base + 7)).objects.get(noce_ack=f"{prefix}-{base + 7}")
    assert (row.to_uid, row.msg_type, row.body, row.is_sent, row.is_read) == (base + 7, 6, {"batch": prefix}, 0, 0)
    assert row.create_time == row.update_time and row.create_time is not None


def test_a_job_batch_that_fails_on_one_shard_leaves_nothing_on_any_database(new_uid):
    base, prefix = new_uid() * 1000, f"fail{new_uid()}"
    messages = _job_batch(base, 256, prefix)
    last = message_model(SHARD_COUNT - 1)  # the last shard: written after every other database's rows
    with connections[shard_alias(SHARD_COUNT - 1)].schema_editor() as editor:
        editor.delete_model(last)
    try:
        with pytest.raises(DatabaseError):
            messages_store_batch(messages=messages)
    finally:
        shard_tables_create()
    assert _job_rows([m.to_uid for m in messages], prefix) == Counter()
    assert messages_store_batch(messages=messages) == 256  # and the retry stores the whole batch


def test_still_unread_of_type_reads_each_shard_database_once(new_uid):
    base, run, old = new_uid() * 1000, f"run{new_uid()}", f"old{new_uid()}"
    uids = [base + n for n in range(300)]
    messages_store_batch(messages=_job_batch(base, 300, run))  # this run's own rows never count
    waiting = set(uids[::3])
    messages_store_batch(messages=[m for m in _job_batch(base, 300, old) if m.to_uid in waiting])
    messages_store_batch(messages=_job_batch(base, 300, f"other{new_uid()}", MsgType.USER_NOTICE)[::2])
    read = uids[::9]  # in waiting too: an old notice read does not hold the new one back
    for uid in read:
        messages_ack(uid=uid, noce_acks=[f"{old}-{uid}"])
    aliases = sorted(shards_by_alias())
    with ExitStack() as stack:
        captured = {alias: stack.enter_context(CaptureQueriesContext(connections[alias])) for alias in aliases}
        found = still_unread_of_type(uids=uids, msg_type=int(MsgType.SYSTEM_NOTICE), excluding_prefix=run)
    assert found == waiting - set(read)
    assert {alias: len(queries) for alias, queries in captured.items()} == dict.fromkeys(aliases, 1)


def _raw(uid: int, noce_ack: str) -> tuple[str, str]:
    """The stored noce_ack and body text of one row, as the database holds them."""
    model = message_model(shard_of(uid))
    connection = connections[shard_alias(shard_of(uid))]
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {qn('noce_ack')}, {qn('body')} FROM {qn(model._meta.db_table)} WHERE {qn('noce_ack')} = %s",
            [noce_ack],
        )
        return cursor.fetchone()


def test_a_job_batch_keeps_quotes_backslashes_and_unicode_byte_for_byte(new_uid):
    # On MariaDB the values a batch shares are escaped once and put into the
    # statement's text: what is stored must be what the field prepared.
    base = new_uid() * 1000
    body = {"text": 'it\'s "quoted" \\ back\\slash %s %% ; -- é ü 中文 🙂 \x00 end', "n": [1, None, True]}
    messages = [
        NewMessage(to_uid=base + n, msg_type=MsgType.SYSTEM_NOTICE, body=body, from_uid=7, noce_ack=f"q'\\\"{base + n}")
        for n in range(200)
    ]
    assert messages_store_batch(messages=messages) == 200
    field = message_model(0)._meta.get_field("body")
    for m in messages[::37]:
        text = field.get_db_prep_save(body, connections[shard_alias(shard_of(m.to_uid))])
        assert _raw(m.to_uid, m.noce_ack) == (m.noce_ack, text)
        row = message_model(shard_of(m.to_uid)).objects.get(noce_ack=m.noce_ack)
        assert (row.to_uid, row.from_uid, row.body) == (m.to_uid, 7, body)


def test_a_job_batch_too_long_for_one_statement_is_split_and_counted(new_uid):
    # A large body: the rows of one shard table need several INSERTs on
    # MariaDB, and the count still says how many rows were new.
    base, prefix = new_uid() * 1000 * SHARD_COUNT, f"long{new_uid()}"
    body = {"text": "x" * 20_000}
    uids = [base + SHARD_COUNT * n for n in range(9)]  # one shard table
    messages = [
        NewMessage(to_uid=uid, msg_type=MsgType.SYSTEM_NOTICE, body=body, noce_ack=f"{prefix}-{uid}") for uid in uids
    ]
    connection = connections[shard_alias(shard_of(base))]
    with CaptureQueriesContext(connection) as queries:
        assert messages_store_batch(messages=messages[:4]) == 4
    if connection.vendor == "mysql":
        assert sum(q["sql"].startswith("INSERT") for q in queries) == 2
    assert messages_store_batch(messages=messages) == 5
    assert messages_store_batch(messages=messages) == 0
    assert _job_rows(uids, prefix) == Counter(dict.fromkeys(uids, 1))
    assert message_model(shard_of(base)).objects.get(noce_ack=f"{prefix}-{uids[8]}").body == body
