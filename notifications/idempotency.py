"""Exactly-once pushes (PROTOCOL.md section 6): a retried or replayed request stores nothing.

A push request is known by its path and its key: the ``Idempotency-Key``
header, or without one its signature (a signed request sent again unchanged
is a replay). The first request with a key claims it by inserting its
``PushRequest`` row; the unique (path, key) constraint decides between
simultaneous requests on any node. A later request with that key gets the
first one's answer, marked ``"duplicate": true``.

Invariants:
* a request is claimed before anything of it is stored;
* only a 2xx answer is kept; any other answer, or an error, releases the
  claim, so a retry after a 503 or a 400 runs again;
* the same key with another body is refused (409) and stores nothing;
* every message of a claimed request gets a noce_ack derived from the key and
  the uid, and a job an id derived from the key: when a claim is taken over
  (its server died before answering) or gone, the shard tables' unique
  noce_ack still stores each message once;
* the claims live in the database, not Redis: losing Redis loses no claim.

Guarded by tests/notifications/test_idempotency.py.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections, router
from django.utils import timezone

from .models import PushRequest
from .rows import insert_row, update_rows

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,100}")
PURGE_EVERY = 1000  # claims between two purges of expired rows, per process
PURGE_CHUNK = 1000


class InvalidKey(ValueError):
    """The Idempotency-Key header is not 1-100 characters of A-Z a-z 0-9 _ . : -."""


class KeyConflict(Exception):
    """The key was accepted with another body."""


class StillAnswering(Exception):
    """The first request with this key has not been answered yet."""


@dataclass(frozen=True)
class Answer:
    status: int
    msg: str
    data: dict[str, Any] = field(default_factory=dict)


def request_key(*, header: str | None, signature: str | None) -> str:
    """The key a push request is known by: its Idempotency-Key, else its signature."""
    if header is None:
        return "sig:" + (signature or "").strip().lower()
    if not KEY_PATTERN.fullmatch(header):
        raise InvalidKey("Idempotency-Key must be 1 to 100 characters of A-Z a-z 0-9 _ . : -")
    return "key:" + header


def request_seed(*, scope: str, key: str) -> str:
    """32 hex digits derived from the path and the key: a job's id, the prefix of each message's noce_ack."""
    return hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()[:32]


def seeded_noce_ack(seed: str, uid: int) -> str:
    """A message's noce_ack under a seed; the same form as a job's (PushJob.noce_ack_for)."""
    return f"{seed}-{uid}"


def seeded_job_id(seed: str) -> uuid.UUID:
    """A job's id under a seed; shaped as a version 4 UUID, which MariaDB's uuid column insists on."""
    return uuid.UUID(hex=seed, version=4)


def push_once(
    *, scope: str, header: str | None, signature: str | None, body: bytes, run: Callable[[str], Answer]
) -> Answer:
    """Run ``run(seed)`` once per key; a request with a key already answered gets that answer again.

    Raises InvalidKey, KeyConflict or StillAnswering; whatever ``run`` raises
    releases the claim and is raised again.
    """
    key = request_key(header=header, signature=signature)
    fingerprint = hashlib.sha256(body).hexdigest()
    claimed = _claim(scope=scope, key=key, fingerprint=fingerprint)
    if isinstance(claimed, Answer):
        return claimed
    try:
        answer = run(request_seed(scope=scope, key=key))
    except BaseException:
        _release(claimed)
        raise
    if 200 <= answer.status < 300:
        _record(claimed, answer)
    else:
        _release(claimed)
    return answer


def _claim(*, scope: str, key: str, fingerprint: str) -> PushRequest | Answer:
    """This request's claim on the key, or the answer of the request that holds it."""
    _purge_now_and_then()
    deadline = time.monotonic() + settings.PUSH_IDEMPOTENCY_WAIT
    pause = 0.01
    while True:
        now = timezone.now()
        claim = PushRequest(scope=scope, key=key, fingerprint=fingerprint, created_at=now)
        try:
            insert_row(_claims_db(), claim)
            return claim
        except IntegrityError:
            pass
        row = PushRequest.objects.filter(scope=scope, key=key).first()
        if row is not None:
            expired = row.created_at < now - timedelta(seconds=settings.PUSH_IDEMPOTENCY_TTL)
            if not expired and row.fingerprint != fingerprint:
                raise KeyConflict("this Idempotency-Key was used with another request body")
            abandoned = row.status is None and row.created_at < now - timedelta(
                seconds=settings.PUSH_IDEMPOTENCY_CLAIM_TIMEOUT
            )
            if expired or abandoned:
                # Whoever moves created_at first takes the claim over.
                taken = PushRequest.objects.filter(id=row.id, created_at=row.created_at).update(
                    created_at=now, fingerprint=fingerprint, status=None, answer=None
                )
                if taken:
                    row.created_at, row.fingerprint, row.status, row.answer = now, fingerprint, None, None
                    return row
            elif row.status is not None:
                answer = row.answer or {}
                return Answer(row.status, answer.get("msg", ""), {**answer.get("data", {}), "duplicate": True})
        # Either the first request is still being answered or it just let go
        # of its claim: look again shortly.
        if time.monotonic() >= deadline:
            raise StillAnswering("a request with this key is still being answered; retry later")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _claims_db() -> Any:
    """The connection of the database that holds the claims."""
    return connections[router.db_for_write(PushRequest)]


def _record(claim: PushRequest, answer: Answer) -> None:
    try:
        update_rows(
            _claims_db(),
            PushRequest,
            {"id": claim.id, "created_at": claim.created_at},
            status=answer.status,
            answer={"msg": answer.msg, "data": answer.data},
        )
    except DatabaseError as error:
        # The push is done and its answer goes out. A retry waits for the claim
        # to count as abandoned, takes it over, and its derived noce_acks (or
        # job id) store nothing twice.
        log.warning("could not record the answer of %s %s: %s", claim.scope, claim.key[:44], error)


def _release(claim: PushRequest) -> None:
    try:
        PushRequest.objects.filter(id=claim.id, created_at=claim.created_at, status__isnull=True).delete()
    except DatabaseError as error:
        log.warning("could not release the claim of %s %s: %s", claim.scope, claim.key[:44], error)


_claims = itertools.count(1)


def _purge_now_and_then() -> None:
    if next(_claims) % PURGE_EVERY == 0:
        try:
            push_requests_purge()
        except DatabaseError as error:
            log.warning("could not purge expired push requests: %s", error)


def push_requests_purge(*, now: Any = None) -> int:
    """Delete claims past their use; returns how many went.

    A keyed request is kept ``PUSH_IDEMPOTENCY_TTL`` seconds. A request known
    by its signature only as long as the signature is accepted (the
    timestamp's skew on either side): after that a replay is refused as
    unsigned anyway.
    """
    now = now or timezone.now()
    expired = PushRequest.objects.filter(created_at__lt=now - timedelta(seconds=settings.PUSH_IDEMPOTENCY_TTL))
    replays = PushRequest.objects.filter(
        key__startswith="sig:", created_at__lt=now - timedelta(seconds=2 * settings.PUSH_API_MAX_SKEW)
    )
    deleted = 0
    for rows in (expired, replays):
        while ids := list(rows.values_list("id", flat=True)[:PURGE_CHUNK]):
            deleted += PushRequest.objects.filter(id__in=ids).delete()[0]
    return deleted
