"""The process-local hub: every socket of this process, indexed by uid.

One hub per event loop (daphne has one). It holds the only bus subscription of
the process, writes each bus message straight to the local sockets it
concerns (the frame body encoded once per message, not once per socket), and
runs the process's housekeeping: the idle sweep, the node liveness mark, the
reaping of dead nodes' relation rows and the batched ``is_sent`` writes.

Invariants:
* a consumer is in ``sockets`` from accept to close, and in ``users[uid]``
  exactly while it is logged in as uid; empty uid sets are removed;
* the background tasks run while at least one socket is attached and are
  cancelled and awaited when the last one leaves;
* after the bus comes back from a loss, the presence entries of this node's
  logged-in sockets are written again (Redis may have restarted empty);
* a frame written by the hub marks its message sent (``is_sent``) within
  ``SENT_FLUSH_INTERVAL`` seconds, in one UPDATE per shard;
* a daphne stopped with SIGTERM writes its last sent marks and removes its
  node's relation rows and presence entries before it exits (``leave_node``,
  bounded by ``LEAVE_TIMEOUT``; the other nodes reap what it could not).

Guarded by tests/connections/test_consumer.py, tests/connections/test_daphne.py
and tests/faults/test_redis_restart.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import weakref
from typing import Any, Protocol

from django.conf import settings

from pushsite import metrics
from pushsite.errors import BackendUnavailable

from . import bridge, bus, selectors, services
from .inbox import inbox
from .protocol import CloseCode, MsgType, PushTemplate


class PushConsumer(Protocol):
    """What the hub needs of a socket (connections.consumers.PushConsumer is one)."""

    conn_id: str | None
    uid: int
    last_active: float

    async def push_text(self, text: str, noce_ack: str, now: float) -> bool: ...

    async def kick(self, *, code: int, close_code: int, msg: str, body: dict[str, Any] | None = None) -> None: ...


log = logging.getLogger(__name__)

SENT_FLUSH_INTERVAL = 0.2
SENT_FLUSH_MAX = 2000
# What a stopping server waits for its last sent marks and its rows' removal.
LEAVE_TIMEOUT = 5.0


class Hub:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.node = services.node_id()
        self.sockets: dict[str, PushConsumer] = {}
        # Tuples, replaced on join and leave: most users have one socket, a
        # 1-tuple is a quarter of an empty set, and delivery needs no copy
        # to stay safe while a socket leaves during its await.
        self.users: dict[int, tuple[PushConsumer, ...]] = {}
        self._numbers = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._starting: asyncio.Task[None] | None = None
        self._sent: list[tuple[int, str]] = []
        self._sent_wakeup = asyncio.Event()
        self._pending_closes: list[tuple[int, str]] = []
        self._inflight: set[asyncio.Future[Any]] = set()
        self._leaves_at_shutdown = False

    # --- membership --------------------------------------------------------

    async def attach(self, consumer: PushConsumer) -> str | None:
        """Register a new socket; None when this process is full."""
        if len(self.sockets) >= settings.PUSH_MAX_CONNECTIONS:
            return None
        conn_id = f"{self.node}.{next(self._numbers)}"
        self.sockets[conn_id] = consumer
        if not self._tasks and self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        if self._starting is not None:
            await asyncio.shield(self._starting)
        return conn_id

    async def detach(self, consumer: PushConsumer) -> None:
        """Forget a closed socket; stop housekeeping when none is left."""
        self.sockets.pop(consumer.conn_id or "", None)
        if consumer.uid:
            self.leave(consumer.uid, consumer)
        if not self.sockets and self._tasks:
            await self.stop()

    def join(self, uid: int, consumer: PushConsumer) -> None:
        conns = self.users.get(uid, ())
        if consumer not in conns:
            self.users[uid] = (*conns, consumer)

    def leave(self, uid: int, consumer: PushConsumer) -> None:
        conns = self.users.get(uid)
        if conns is not None and consumer in conns:
            rest = tuple(c for c in conns if c is not consumer)
            if rest:
                self.users[uid] = rest
            else:
                del self.users[uid]

    def renumber(self, consumer: PushConsumer) -> str:
        """Give an open socket a new conn_id; its old one has a clean-up pending."""
        self.sockets.pop(consumer.conn_id or "", None)
        conn_id = f"{self.node}.{next(self._numbers)}"
        self.sockets[conn_id] = consumer
        return conn_id

    def close_later(self, uid: int, conn_id: str) -> None:
        """A relation row that could not be removed now; the node loop retries."""
        self._pending_closes.append((uid, conn_id))

    # --- delivery ----------------------------------------------------------

    def on_bus_message(self, message: dict[str, Any]) -> None:
        """Handle one bus message (called on the hub's loop)."""
        kind = message.get("kind")
        if kind == "push":
            self.loop.create_task(self._deliver(message["groups"]))
        elif kind == "evict":
            for conn_id in message["conn_ids"]:
                consumer = self.sockets.get(conn_id)
                if consumer is not None and consumer.uid:
                    self.loop.create_task(
                        consumer.kick(
                            code=CloseCode.SUPERSEDED,
                            close_code=CloseCode.SUPERSEDED,
                            msg=f"this user opened more than {settings.PUSH_MAX_SOCKETS_PER_USER} sockets",
                        )
                    )
        else:
            log.error("dropped a bus message of unknown kind %r", kind)

    def on_bus_resubscribed(self) -> None:
        """The bus is back after a loss; Redis may have restarted empty."""
        self.loop.create_task(self._restore_presence())

    async def _restore_presence(self) -> None:
        # Without their presence entries, this node's open sockets would get
        # no live push until they logged in again.
        try:
            restored = await self._db(services.node_presence_restore, node=self.node)
        except BackendUnavailable as error:
            log.warning("could not restore the presence of this node's sockets: %s", error)
            return
        log.info("restored the presence of %d sockets after the bus came back", restored)

    async def _deliver(self, groups: list[dict[str, Any]]) -> None:
        now = self.loop.time()
        users = self.users
        sent = self._sent
        frames = 0
        for group in groups:
            template: PushTemplate | None = None
            for uid, noce_ack in group["to"]:
                conns = users.get(uid)
                if not conns:
                    continue
                if template is None:
                    template = PushTemplate(MsgType(group["msg_type"]), from_uid=group["from_uid"], body=group["body"])
                text = template.render(uid, noce_ack)
                delivered = False
                for consumer in conns:
                    if await consumer.push_text(text, noce_ack, now):
                        delivered = True
                        frames += 1
                if delivered:
                    sent.append((uid, noce_ack))
            # Counted once per group, not per socket: the fan-out path stays as it was.
            metrics.frames_sent(group["msg_type"], frames)
            frames = 0
        if sent:
            self._sent_wakeup.set()

    def record_sent(self, uid: int, noce_ack: str) -> None:
        self._sent.append((uid, noce_ack))
        self._sent_wakeup.set()

    # --- housekeeping -------------------------------------------------------

    async def _start(self) -> None:
        self._leave_at_shutdown()
        ready = asyncio.Event()
        tasks = [
            self.loop.create_task(
                bus.subscribe(self.node, self.on_bus_message, ready, self.on_bus_resubscribed), name="pushsite-bus"
            ),
            self.loop.create_task(self._sweep_idle(), name="pushsite-idle"),
            self.loop.create_task(self._node_loop(), name="pushsite-node"),
            self.loop.create_task(self._flush_sent_loop(), name="pushsite-sent"),
        ]
        self._tasks = tasks
        try:
            await asyncio.wait_for(ready.wait(), timeout=3)
        except TimeoutError:
            log.warning("bus not ready after 3s; sockets accepted, live pushes resume when it is")
        finally:
            self._starting = None

    async def stop(self) -> None:
        """Cancel and await the background tasks (a task calling this ends by itself)."""
        current = asyncio.current_task()
        tasks, self._tasks = [t for t in self._tasks if t is not current], []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A cancelled task's database call goes on in its thread; let it end
        # so nothing of this hub touches the database after stop().
        await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._flush_sent()

    def _leave_at_shutdown(self) -> None:
        """Under daphne: when the server stops, ``leave_node`` before the reactor does.

        daphne stops on SIGTERM (``systemctl stop``) by cancelling every
        application, so no consumer's disconnect handler reaches the database:
        the node's relation rows and presence entries stayed until a peer
        reaped them ``PUSH_NODE_DEAD_AFTER`` later, and the last 0.2 s of sent
        marks were lost. Twisted runs "before shutdown" triggers first, with
        the event loop still running, and waits for the Deferred one returns.
        """
        reactor = sys.modules.get("twisted.internet.reactor")
        if self._leaves_at_shutdown or reactor is None or not getattr(reactor, "running", False):
            return
        from twisted.internet.defer import Deferred

        self._leaves_at_shutdown = True
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromFuture(self.loop.create_task(self.leave_node()))
        )

    async def leave_node(self) -> None:
        """This process stops: write the sent marks, then remove every row and presence entry of the node."""
        try:
            async with asyncio.timeout(LEAVE_TIMEOUT):
                await self.stop()
                removed = await bridge.call(services.node_leave, node=self.node)
        except (TimeoutError, BackendUnavailable) as error:
            log.warning("node %s could not leave cleanly (%s); peers reap its rows", self.node, error)
            return
        log.info("node %s left: %d relation rows removed", self.node, removed)

    async def _db(self, fn: Any, /, **kwargs: Any) -> Any:
        """A housekeeping database call that stop() waits for, even when cancelled."""
        future = asyncio.ensure_future(bridge.call(fn, **kwargs))
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        return await asyncio.shield(future)

    async def _sweep_idle(self) -> None:
        while True:
            timeout = settings.PUSH_IDLE_TIMEOUT
            await asyncio.sleep(max(0.05, min(5.0, timeout / 4)))
            # A little grace: a client that heartbeats exactly every timeout
            # seconds after the last frame it got must not lose the race.
            cutoff = self.loop.time() - timeout - min(5.0, timeout / 20)
            for consumer in [c for c in self.sockets.values() if c.last_active < cutoff]:
                await consumer.kick(code=CloseCode.IDLE_TIMEOUT, close_code=CloseCode.IDLE_TIMEOUT, msg="idle timeout")
            if asyncio.current_task() not in self._tasks:
                return  # the last socket went and the hub stopped

    async def _node_loop(self) -> None:
        try:
            left = await self._db(services.node_start, node=self.node)
            if left:
                log.info("cleared %d relation rows left by an earlier process of node %s", left, self.node)
        except BackendUnavailable as error:
            log.warning("node start-up housekeeping failed: %s", error)
        while True:
            try:
                await self._db(services.node_heartbeat, node=self.node)
                reaped = await self._db(services.node_reap_dead)
                if reaped:
                    log.info("cleared %d relation rows of dead nodes", reaped)
                pending, self._pending_closes = self._pending_closes, []
                for index, (uid, conn_id) in enumerate(pending):
                    try:
                        await self._db(services.connection_close, uid=uid, conn_id=conn_id)
                    except BackendUnavailable:
                        self._pending_closes.extend(pending[index:])
                        break
                await self._clear_orphans()
            except BackendUnavailable as error:
                log.warning("node housekeeping failed: %s", error)
            await asyncio.sleep(settings.PUSH_NODE_HEARTBEAT)

    async def _clear_orphans(self) -> None:
        """Remove this node's relation rows that no open socket owns.

        A socket's own disconnect handler removes its row. One that never
        runs it - daphne cancels an application still busy 10 s after its
        socket closed, say a login waiting on a loaded database - would leave
        the row (and its presence entry) for good while the node lives. Rows
        are read first and compared with the sockets open after the read:
        a socket that logged in before the read is in ``sockets`` unless it
        has left, so no live session's row is touched.
        """
        rows = await self._db(selectors.node_connections, node=self.node)
        orphans = [(uid, conn_id) for uid, conn_id in rows if conn_id not in self.sockets]
        for uid, conn_id in orphans:
            await self._db(services.connection_close, uid=uid, conn_id=conn_id)
        if orphans:
            log.warning("cleared %d relation rows no open socket of this node owned", len(orphans))

    def abandon(self, consumer: PushConsumer) -> None:
        """Forget a consumer that was cancelled; its row goes with the next orphan sweep."""
        if self.sockets.get(consumer.conn_id or "") is consumer:
            del self.sockets[consumer.conn_id or ""]
        if consumer.uid:
            self.leave(consumer.uid, consumer)

    async def _flush_sent_loop(self) -> None:
        while True:
            await self._sent_wakeup.wait()
            await asyncio.sleep(SENT_FLUSH_INTERVAL)
            await self._flush_sent()

    async def _flush_sent(self) -> None:
        self._sent_wakeup.clear()
        batch, self._sent = self._sent, []
        if not batch:
            return
        try:
            await self._db(inbox().mark_sent, pairs=batch)
        except BackendUnavailable as error:
            # Not marking sent only means a later run may deliver it again;
            # clients de-duplicate by noce_ack. Keep the batch bounded.
            log.warning("could not mark %d messages sent: %s", len(batch), error)
            self._sent = batch[-SENT_FLUSH_MAX * 10 :] + self._sent


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def socket_counts() -> tuple[int, int]:
    """Open and logged-in sockets of every hub of this process (read at scrape time)."""
    hubs = list(_hubs.values())
    return (
        sum(len(hub.sockets) for hub in hubs),
        sum(len(conns) for hub in hubs for conns in list(hub.users.values())),
    )


metrics.count_sockets_with("hubs", socket_counts)


def get_hub() -> Hub:
    """The hub of the running event loop."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = Hub()
    return hub
