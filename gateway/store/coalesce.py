"""One way to coalesce concurrent calls to the store into fewer, bigger ones.

Owns: `Coalescer`, used by the rate limiter (GCRA checks of concurrent requests go out as
one `run_many` batch) and the heartbeat policy (the heartbeats of one turn go out as one
`heartbeat_record` call per webinar, pipelined together). On Redis the client's per-call
CPU, not Redis, bounds those hot paths; sharing a call is what keeps them fast under
concurrency, and at low load nothing waits (a batch goes out after the callbacks already
ready in the same loop turn).

The rules, the same for every user:
- bounded: a call carries at most `max_batch` items (a group that fills up goes out at
  once) and a group has at most `max_inflight` calls out; items that arrive meanwhile
  wait for the next call, so batches grow with load;
- one flush scheduled at a time, whatever the number of groups and items;
- errors reach every waiter of the call: a StoreError as is, a bug logged once and
  turned into StoreError('error'), a cancelled call into StoreError('error') too;
- cancellation-safe: a waiter that gives up leaves its future cancelled (its item is
  dropped from a call not yet sent, unless `keep_abandoned`), and never breaks the others.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gateway.store.base import StoreError

K = TypeVar("K", bound=Hashable)  # a group: items under one key share a call
Item = TypeVar("Item")
R = TypeVar("R")  # the reply to one item

# send(key, items) -> one reply per item, in order: a result or an exception for that
# item alone. Raising fails every item of the call.
Send = Callable[[K, list[Item]], Awaitable[Sequence[R | BaseException]]]


@dataclass(slots=True)
class _Group(Generic[Item, R]):
    loop: asyncio.AbstractEventLoop
    items: list[Item] = field(default_factory=list)
    futures: list[asyncio.Future[R]] = field(default_factory=list)
    inflight: int = 0


class Coalescer(Generic[K, Item, R]):
    """Items submitted under one key go to `send` together. `max_inflight` None: no
    bound on a group's calls out. `budget` (optional) bounds each waiter of `call`,
    raising StoreError('timeout') when it passes."""

    def __init__(
        self,
        send: Send[K, Item, R],
        *,
        max_batch: int,
        max_inflight: int | None = 1,
        keep_abandoned: bool = False,
        budget: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
        what: str = "store batch",
        log: logging.Logger | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._send = send
        self.max_batch = max_batch
        self.max_inflight = max_inflight if max_inflight is not None else sys.maxsize
        self.keep_abandoned = keep_abandoned
        self.budget = budget
        self.what = what
        self.log = log or logging.getLogger("gateway.store")
        self.extra = extra
        self._groups: dict[K, _Group[Item, R]] = {}
        self._scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()
        # Calls sent and items they carried (mean batch = batched / batches).
        self.batches = 0
        self.batched = 0

    def submit(self, key: K, item: Item) -> asyncio.Future[R]:
        """Queue `item` for the next call of its group; the future gets its reply."""
        # (`call` repeats these lines: one Python call less per rate-limit check.)
        group = self._groups.get(key)
        if group is None:
            # One loop lookup per group: get_running_loop() is a getpid() syscall on 3.11.
            group = self._groups[key] = _Group(asyncio.get_running_loop())
        fut: asyncio.Future[R] = group.loop.create_future()
        items = group.items
        items.append(item)
        group.futures.append(fut)
        if group.inflight < self.max_inflight:
            if len(items) >= self.max_batch:
                self._start(key, group)
            elif not self._scheduled:
                self._schedule(group.loop)
        return fut

    async def call(self, key: K, item: Item) -> R:
        """Submit and wait for the reply, within `budget` if there is one."""
        # submit() inlined, deliberately: this runs once per rate-limit check.
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(asyncio.get_running_loop())
        fut: asyncio.Future[R] = group.loop.create_future()
        items = group.items
        items.append(item)
        group.futures.append(fut)
        if group.inflight < self.max_inflight:
            if len(items) >= self.max_batch:
                self._start(key, group)
            elif not self._scheduled:
                self._schedule(group.loop)
        budget = self.budget
        if budget is None:
            return await fut
        try:
            async with budget():
                return await fut
        except TimeoutError:
            raise StoreError("timeout", f"{self.what} exceeded store.timeout") from None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = True
        # After the callbacks already ready in this loop iteration (other requests that
        # are about to submit too) have run.
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        for key, group in list(self._groups.items()):
            while group.items and group.inflight < self.max_inflight:
                self._start(key, group)
            if not group.items and not group.inflight:
                del self._groups[key]

    def _start(self, key: K, group: _Group[Item, R]) -> None:
        n = self.max_batch
        items, futures = group.items[:n], group.futures[:n]
        del group.items[:n], group.futures[:n]
        if not self.keep_abandoned and any(f.done() for f in futures):
            # A waiter that already gave up (timeout, client gone) need not be sent.
            live = [i for i, f in enumerate(futures) if not f.done()]
            if not live:
                return
            items, futures = [items[i] for i in live], [futures[i] for i in live]
        group.inflight += 1
        task = group.loop.create_task(self._run(key, group, items, futures))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(
        self, key: K, group: _Group[Item, R], items: list[Item], futures: list[asyncio.Future[R]]
    ) -> None:
        self.batches += 1
        self.batched += len(items)
        replies: Sequence[R | BaseException]
        try:
            replies = await self._send(key, items)
        except StoreError as exc:
            replies = [exc] * len(items)
        except asyncio.CancelledError:
            _deliver(futures, [StoreError("error", f"{self.what} cancelled")] * len(items))
            raise
        except Exception as exc:  # a bug, not an outage: fail these waiters now, loudly
            self.log.exception(f"{self.what} failed", extra=self.extra)
            replies = [StoreError("error", f"{self.what} failed: {type(exc).__name__}")] * len(
                items
            )
        finally:
            group.inflight -= 1
            if group.items:
                if not self._scheduled:
                    self._schedule(group.loop)
            elif not group.inflight and self._groups.get(key) is group:
                del self._groups[key]
        _deliver(futures, replies)


def _deliver(futures: list[asyncio.Future[R]], replies: Sequence[R | BaseException]) -> None:
    for fut, reply in zip(futures, replies, strict=True):
        # A waiter that went away has a cancelled future: nobody is told.
        if fut.done():
            continue
        if isinstance(reply, BaseException):
            err = reply if isinstance(reply, StoreError) else StoreError("response", str(reply))
            fut.set_exception(err)
        else:
            fut.set_result(reply)
