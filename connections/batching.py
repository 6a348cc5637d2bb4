"""Batches formed from what is waiting: the shape of every login step under a storm.

A ``Batcher`` runs one batch at a time. An item submitted while the batcher is
idle starts a batch on the next turn of the event loop (no timer: a lone
login pays no delay); items submitted while a batch runs wait and form the
next one, up to ``max_batch``. So concurrent logins share one Redis round
trip, one multi-row statement and one database thread hop instead of queueing
one each behind the other.

Invariants:
* every submitted item is processed exactly once, in submission order, and its
  caller gets its own result or exception;
* a caller that stops waiting (its socket closed) does not stop the batch: the
  others still get theirs;
* one batch of a batcher runs at a time; ``oldest_wait`` is the age of the
  oldest item not yet answered, in the running batch or waiting for the next
  (what admission control reads: a batch stuck in the database delays every
  login behind it, even when nothing waits yet).

Guarded by tests/connections/test_logins.py.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - the conventional name of an item type
R = TypeVar("R")


class Batcher(Generic[I, R]):
    def __init__(
        self, process: Callable[[list[I]], Awaitable[Sequence[R | BaseException]]], *, max_batch: int, name: str
    ) -> None:
        self._process = process
        self.max_batch = max_batch
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._waiting: list[tuple[I, asyncio.Future[R], float]] = []
        self._task: asyncio.Task[None] | None = None
        self._running_since: float | None = None  # submit time of the running batch's first item
        self.batches = 0
        self.items = 0
        # Items per second of batch time, smoothed: how fast a backlog drains.
        self.rate = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    async def submit(self, item: I) -> R:
        """Process one item with whatever else is waiting; its result or exception."""
        future: asyncio.Future[R] = self._loop.create_future()
        self._waiting.append((item, future, self._loop.time()))
        if self._task is None:
            self._task = self._loop.create_task(self._drain(), name=f"pushsite-{self.name}")
        return await future

    def oldest_wait(self) -> float:
        """Seconds the oldest item not yet answered has waited (running or waiting)."""
        if self._running_since is not None:
            return self._loop.time() - self._running_since
        return self._loop.time() - self._waiting[0][2] if self._waiting else 0.0

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                started = self._loop.time()
                self._running_since = batch[0][2]
                try:
                    results: Sequence[R | BaseException] = await self._process([item for item, _, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
                except asyncio.CancelledError:
                    for _, future, _ in batch + self._waiting:
                        future.cancel()
                    self._waiting = []
                    raise
                except Exception as error:
                    results = [error] * len(batch)
                finally:
                    self._running_since = None
                self._account(len(batch), self._loop.time() - started)
                for (_, future, _), result in zip(batch, results, strict=True):
                    if future.done():
                        continue  # its caller went away
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._task = None

    def _account(self, items: int, seconds: float) -> None:
        self.batches += 1
        self.items += items
        rate = items / max(seconds, 1e-4)
        self.rate = rate if self.batches == 1 else 0.8 * self.rate + 0.2 * rate


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Batcher]] = weakref.WeakKeyDictionary()


def batcher(
    name: str, process: Callable[[list[I]], Awaitable[Sequence[R | BaseException]]], *, max_batch: int
) -> Batcher[I, R]:
    """The running loop's batcher of this name (made on first use)."""
    batchers = _per_loop.setdefault(asyncio.get_running_loop(), {})
    found = batchers.get(name)
    if found is None:
        found = batchers[name] = Batcher(process, max_batch=max_batch, name=name)
    return found


def loop_batchers() -> list[Batcher]:
    """The batchers of the running loop."""
    return list(_per_loop.get(asyncio.get_running_loop(), {}).values())
