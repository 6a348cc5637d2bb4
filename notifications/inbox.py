"""The domain's side of ``connections.inbox``: a session's reads and writes of messages.

Registered by ``notifications.apps`` at start-up. Each method reads or writes
only the rows of the uids it is given (every query filters on ``to_uid``).
Guarded by tests/connections/test_consumer.py and tests/connections/test_logins.py.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from connections.inbox import LoginView

from . import selectors, store


class MessageInbox:
    def logins_read(self, *, uids: Collection[int], replay_limit: int) -> dict[int, LoginView]:
        return selectors.logins_read(uids=uids, replay_limit=replay_limit)

    def ack(self, *, uid: int, noce_acks: Sequence[str]) -> int:
        return store.messages_ack(uid=uid, noce_acks=list(noce_acks))

    def unread(self, *, uid: int, limit: int, msg_type: int | None) -> dict[str, Any]:
        return selectors.unread_for_user(uid=uid, limit=limit, msg_type=msg_type)

    def mark_sent(self, *, pairs: Sequence[tuple[int, str]]) -> int:
        return store.messages_mark_sent(pairs=list(pairs))
