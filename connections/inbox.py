"""What a session does with a user's messages: defined here, filled in by the domain.

``connections`` is the transport (sockets, hub, bus, presence, relation) and
knows nothing of how messages are stored. A session still has to show the
user what waits at login, take acks, list unread messages and mark frames
sent; it does so through the one ``Inbox`` registered at start-up
(``notifications.apps`` registers ``notifications.inbox.MessageInbox``).
Every method is blocking and is called through ``bridge``.

Invariants:
* every method reads or writes only the rows of the uid(s) it is given;
* ``logins_read`` answers for a whole batch of logins with a bounded number
  of statements (one per shard database per kind of read), never one per login.

Guarded by tests/test_layers.py (nothing in connections imports notifications)
and tests/connections/test_logins.py.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True, slots=True)
class Unsent:
    """A message never handed to a socket, as its ready frame."""

    noce_ack: str
    frame: str
    msg_type: int = 0


@dataclass(frozen=True, slots=True)
class LoginView:
    """What a socket is shown at login."""

    unread_counts: dict[str, int]
    unsent: list[Unsent]


class Inbox(Protocol):
    def logins_read(self, *, uids: Collection[int], replay_limit: int) -> dict[int, LoginView]:
        """Unread counts and up to ``replay_limit`` unsent messages (oldest first) for each uid."""
        ...

    def ack(self, *, uid: int, noce_acks: Sequence[str]) -> int:
        """Mark those of uid's own messages read; returns how many changed."""
        ...

    def unread(self, *, uid: int, limit: int, msg_type: int | None) -> dict[str, Any]:
        """The ``unread`` reply body: uid's unread messages newest first and the counts."""
        ...

    def mark_sent(self, *, pairs: Sequence[tuple[int, str]]) -> int:
        """Record that these (uid, noce_ack) frames were written to a socket."""
        ...


_inbox: Inbox | None = None


def register(inbox: Inbox) -> None:
    """Install the inbox sessions use (once, from an app's ``ready``)."""
    global _inbox
    _inbox = inbox


def inbox() -> Inbox:
    """The registered inbox."""
    if _inbox is None:
        raise ImproperlyConfigured("no inbox is registered: is 'notifications' in INSTALLED_APPS?")
    return _inbox
