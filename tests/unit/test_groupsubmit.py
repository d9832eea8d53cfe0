"""GroupSubmitter: batching, per-item errors, cancellation before and after the send, fire and forget."""

import asyncio

import pytest

from runtime.groupsubmit import GroupSubmitter


class Recorder:
    def __init__(self, gate: asyncio.Event | None = None, fail: BaseException | None = None):
        self.batches: list[list] = []
        self.gate = gate
        self.fail = fail

    async def __call__(self, items):
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"bad {x}") if isinstance(x, str) and x.startswith("bad") else x * 10 for x in items]


async def test_same_tick_submissions_share_one_send_and_get_their_own_answers():
    rec = Recorder()
    g = GroupSubmitter(rec)
    out = await asyncio.gather(*(g.submit(i) for i in range(5)))
    assert out == [0, 10, 20, 30, 40]
    assert rec.batches == [[0, 1, 2, 3, 4]]


async def test_max_batch_splits_and_max_inflight_bounds_concurrent_sends():
    gate = asyncio.Event()
    rec = Recorder(gate)
    g = GroupSubmitter(rec, max_batch=2, max_inflight=1)
    tasks = [asyncio.ensure_future(g.submit(i)) for i in range(5)]
    while not rec.batches:
        await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(rec.batches) == 1 and g.inflight == 1  # the other batches wait for a slot
    gate.set()
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]
    assert [len(b) for b in rec.batches] == [2, 2, 1]


async def test_an_item_error_reaches_only_its_waiter():
    g = GroupSubmitter(Recorder())
    res = await asyncio.gather(g.submit(1), g.submit("bad-x"), g.submit(2), return_exceptions=True)
    assert res[0] == 10 and res[2] == 20
    assert isinstance(res[1], ValueError) and "bad-x" in str(res[1])


async def test_a_failed_send_reaches_every_waiter_of_its_batch():
    g = GroupSubmitter(Recorder(fail=ConnectionError("down")))
    res = await asyncio.gather(g.submit(1), g.submit(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in res)
    assert g.stats["send_errors"] == 1


async def test_wrong_answer_count_fails_loudly():
    async def short(items):
        return items[:-1]

    g = GroupSubmitter(short)
    with pytest.raises(RuntimeError, match="answered 1 items for a batch of 2"):
        await asyncio.gather(g.submit(1), g.submit(2))


async def test_cancelled_before_send_is_never_sent():
    gate = asyncio.Event()
    rec = Recorder(gate)
    g = GroupSubmitter(rec, max_inflight=1)
    first = asyncio.ensure_future(g.submit(1))
    while not rec.batches:
        await asyncio.sleep(0)
    second = asyncio.ensure_future(g.submit(2))  # queued behind the in-flight send
    await asyncio.sleep(0)
    second.cancel()
    gate.set()
    assert await first == 10
    await g.flush()
    assert rec.batches == [[1]] and g.stats["dropped"] == 1


async def test_cancelled_after_send_hands_the_answer_to_on_orphan():
    gate = asyncio.Event()
    orphans = []
    g = GroupSubmitter(Recorder(gate), on_orphan=lambda item, ans: orphans.append((item, ans)))
    t = asyncio.ensure_future(g.submit(7))
    while g.inflight == 0:
        await asyncio.sleep(0)
    t.cancel()
    gate.set()
    await g.flush()
    assert orphans == [(7, 70)]


async def test_timeout_after_send_is_an_orphan_too():
    gate = asyncio.Event()
    orphans = []
    g = GroupSubmitter(Recorder(gate), on_orphan=lambda item, ans: orphans.append(ans))
    with pytest.raises(asyncio.TimeoutError):
        await g.submit(3, timeout=0.01)
    gate.set()
    await g.flush()
    assert orphans == [30]


async def test_fire_and_forget_errors_go_to_on_error():
    errors = []
    g = GroupSubmitter(Recorder(), on_error=lambda exc, items: errors.append((type(exc), items)))
    g.submit_nowait(1)
    g.submit_nowait("bad-1")
    await g.flush()
    assert errors == [(ValueError, ["bad-1"])]


async def test_linger_collects_items_that_arrive_a_little_later():
    rec = Recorder()
    g = GroupSubmitter(rec, linger_s=0.3)

    async def late(i):
        for _ in range(3):  # past the tick that started the batch
            await asyncio.sleep(0)
        return await g.submit(i)

    out = await asyncio.gather(g.submit(0), late(1))
    assert out == [0, 10] and rec.batches == [[0, 1]]


def test_used_from_a_new_loop_starts_afresh():
    rec = Recorder()
    g = GroupSubmitter(rec)
    assert asyncio.run(g.submit(1)) == 10
    assert asyncio.run(g.submit(2)) == 20
