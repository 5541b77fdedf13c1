"""The store's one coalescer (gateway/store/coalesce.py) and the batching default of the
Store base: what every user of batched calls relies on, without a network."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.store import Script, StoreError
from gateway.store.base import KeySpace, ScriptArg
from gateway.store.coalesce import Coalescer
from gateway.store.memory import MemoryStore


class Sender:
    """Records each call's items; answers item * 10, or what `fail` says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None

    async def __call__(self, key: str, items: list[int]) -> list[Any]:
        self.calls.append((key, list(items)))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [StoreError("response", "odd") if i == 13 else i * 10 for i in items]


async def test_one_turn_one_call_per_key_in_order() -> None:
    send = Sender()
    c: Coalescer[str, int, int] = Coalescer(send, max_batch=100)
    futs = [c.submit("a", i) for i in range(5)] + [c.submit("b", 7)]
    assert send.calls == []  # nothing goes out before the loop turn ends
    assert await asyncio.gather(*futs) == [0, 10, 20, 30, 40, 70]
    assert send.calls == [("a", [0, 1, 2, 3, 4]), ("b", [7])]
    assert (c.batches, c.batched) == (2, 6)


async def test_a_full_batch_goes_at_once_and_calls_stay_bounded() -> None:
    send = Sender()
    c: Coalescer[str, int, int] = Coalescer(send, max_batch=3, max_inflight=None)
    futs = [c.submit("a", i) for i in range(7)]
    await asyncio.gather(*futs)
    assert [items for _, items in send.calls] == [[0, 1, 2], [3, 4, 5], [6]]


async def test_items_wait_while_the_group_has_its_calls_out() -> None:
    send = Sender()
    send.gate = asyncio.Event()
    c: Coalescer[str, int, int] = Coalescer(send, max_batch=100, max_inflight=1)
    first = c.submit("a", 1)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [c.submit("a", i) for i in (2, 3)]
    await asyncio.sleep(0.01)
    assert len(send.calls) == 1  # one call out: the others wait for it
    send.gate.set()
    assert await asyncio.gather(first, *later) == [10, 20, 30]
    assert [items for _, items in send.calls] == [[1], [2, 3]]


async def test_errors_reach_every_waiter() -> None:
    send = Sender()
    c: Coalescer[str, int, int] = Coalescer(send, max_batch=100)
    # An item's own error fails that item alone.
    results = await asyncio.gather(c.submit("a", 1), c.submit("a", 13), return_exceptions=True)
    assert results[0] == 10
    assert isinstance(results[1], StoreError)
    assert results[1].kind == "response"
    # A failed call fails all of its items, as StoreError.
    for exc, kind in ((StoreError("timeout", "slow"), "timeout"), (KeyError("bug"), "error")):
        send.fail = exc
        results = await asyncio.gather(
            *(c.submit("a", i) for i in range(3)), return_exceptions=True
        )
        assert [getattr(r, "kind", None) for r in results] == [kind] * 3


async def test_a_cancelled_call_fails_its_waiters() -> None:
    send = Sender()
    send.gate = asyncio.Event()
    c: Coalescer[str, int, int] = Coalescer(send, max_batch=100)
    futs = [c.submit("a", i) for i in range(3)]
    await asyncio.sleep(0.01)
    for task in list(c.tasks):
        task.cancel()
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert [getattr(r, "kind", None) for r in results] == ["error"] * 3


@pytest.mark.parametrize("keep", [False, True])
async def test_a_waiter_that_gave_up(keep: bool) -> None:
    send = Sender()
    c: Coalescer[str, int, int] = Coalescer(send, max_batch=100, keep_abandoned=keep)
    gone = c.submit("a", 1)
    stays = c.submit("a", 2)
    gone.cancel()
    assert await stays == 20
    assert send.calls == [("a", [1, 2] if keep else [2])]


async def test_call_waits_within_its_budget() -> None:
    send = Sender()
    send.gate = asyncio.Event()

    def budget() -> Any:
        return asyncio.timeout(0.05)

    c: Coalescer[str, int, int] = Coalescer(send, max_batch=100, budget=budget, what="check")
    with pytest.raises(StoreError) as info:
        await c.call("a", 1)
    assert info.value.kind == "timeout"
    send.gate.set()
    assert await c.call("a", 2) == 20


def _count_py(data: KeySpace, keys: list[str], args: list[ScriptArg], _now: int) -> Any:
    return data.incr(keys[0], int(args[0]))


COUNT = Script("count", "", _count_py)


async def test_run_many_default_runs_each_call_on_its_own() -> None:
    s = MemoryStore("t:")
    assert not s.batches
    assert not s.fails
    replies = await s.run_many(COUNT, [(["c:a"], [1]), (["c:a"], [2]), (["c:b"], [5])])
    assert replies == [1, 3, 5]
    assert await s.run_many(COUNT, []) == []
