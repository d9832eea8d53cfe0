"""Waiting for budget room (runtime/budget_wait.py): parked admissions answered as settles make room, expiry by
the deadline timer, callers that go away, critical first, and the issue's 200-request scenario on one event loop."""

import asyncio
import random
import time
from datetime import datetime, timezone

import pytest

from runtime.budget import CANNOT_FIT, EXPIRED, NO_ROOM, BudgetBook
from runtime.budget_wait import BudgetGate
from runtime.buckets import ManualClock
from runtime.pricing import max_cost, price
from runtime.settings import BudgetSettings, Settings
from runtime.usage import Usage

pytestmark = pytest.mark.pure

T0 = datetime(2026, 11, 5, 12, 0, tzinfo=timezone.utc).timestamp()
SONNET = "claude-sonnet-5-5"


def gate(clock=None, **kw):
    return BudgetGate(BudgetBook(BudgetSettings(**kw), clock or ManualClock(T0)))


async def until(pred, rounds=1000):
    """Let the loop run until ``pred()`` holds (parked coroutines need a few turns to get parked)."""
    for _ in range(rounds):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_without_a_deadline_nothing_waits():
    async def main():
        g = gate(daily_usd=1.0)
        assert (await g.admit("a", None, None, "normal", 0.9)).granted
        r = await g.admit("b", None, None, "normal", 0.2)
        assert r.decision == "refused" and r.reason == NO_ROOM and g.book.waiting == 0

    asyncio.run(main())


def test_a_waiting_admission_is_granted_when_a_settle_makes_room():
    async def main():
        g = gate(daily_usd=1.0)
        assert (await g.admit("a", None, None, "normal", 0.9, owner="A")).granted
        waiter = asyncio.ensure_future(g.admit("b", None, None, "normal", 0.3, owner="B", deadline=T0 + 60))
        await until(lambda: g.waiting == 1)
        assert not waiter.done() and g.book.holder("b").queued
        g.book.settle("a", 0.5, owner="A")
        assert not waiter.done()  # the book decides nothing by itself ...
        g.changed()               # ... its owner says something changed
        r = await waiter
        assert r.granted and r.owner == "B" and r.settled_usd == pytest.approx(0.5)
        assert g.book.holder("b").owner == "B" and g.waiting == 0
        assert g.stats["waited"] == 1 and g.stats["granted_after_wait"] == 1

    asyncio.run(main())


def test_a_waiting_admission_that_can_no_longer_fit_is_refused_with_the_figures():
    async def main():
        g = gate(daily_usd=1.0)
        await g.admit("a", None, None, "normal", 0.9)
        waiter = asyncio.ensure_future(g.admit("b", None, None, "normal", 0.3, deadline=T0 + 60))
        await until(lambda: g.waiting == 1)
        g.book.settle("a", 0.8)
        g.changed()
        r = await waiter
        assert not r.granted and r.reason == CANNOT_FIT and r.settled_usd == pytest.approx(0.8)
        exc = r.refusal()
        assert exc.settled_usd + exc.amount_usd > exc.limit_usd and exc.reason == CANNOT_FIT

    asyncio.run(main())


def test_the_deadline_timer_expires_a_waiter_nobody_makes_room_for():
    async def main():
        g = gate(time.time, daily_usd=1.0)
        await g.admit("a", None, None, "normal", 0.9)
        deadline = time.time() + 0.05
        r = await g.admit("b", None, None, "normal", 0.3, deadline=deadline)
        assert time.time() >= deadline
        assert not r.granted and r.reason == EXPIRED and "deadline" in str(r.refusal())
        assert g.book.waiting == 0 and g.waiting == 0 and g.book.next_deadline() is None
        # the timer follows the earliest deadline: a later waiter re-arms it, an earlier one moves it forward
        late = asyncio.ensure_future(g.admit("c", None, None, "normal", 0.3, deadline=time.time() + 60))
        await until(lambda: g.waiting == 1)
        early = await g.admit("d", None, None, "normal", 0.3, deadline=time.time() + 0.02)
        assert early.reason == EXPIRED and not late.done()
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        g.close()

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue_and_its_claim_with_it():
    async def main():
        g = gate(daily_usd=1.0)
        await g.admit("a", None, None, "normal", 0.6)
        big = asyncio.ensure_future(g.admit("big", None, None, "normal", 0.5, deadline=T0 + 60))
        await until(lambda: g.waiting == 1)
        # the big one waiting ahead claims the room a small later one would take
        small = asyncio.ensure_future(g.admit("small", None, None, "normal", 0.3, deadline=T0 + 60))
        await until(lambda: g.waiting == 2)
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        assert (await small).granted  # its claim went with it
        assert g.book.holder("big") is None and g.book.waiting == 0 and g.stats["abandoned"] == 1

    asyncio.run(main())


def test_a_grant_decided_just_before_its_waiter_was_cancelled_is_given_back():
    async def main():
        g = gate(daily_usd=1.0)
        await g.admit("a", None, None, "normal", 0.9, owner="A")
        waiter = asyncio.ensure_future(g.admit("b", None, None, "normal", 0.3, owner="B", deadline=T0 + 60))
        await until(lambda: g.waiting == 1)
        g.book.release("a")
        g.changed()            # granted: the fate is on the waiter's future ...
        waiter.cancel()        # ... but its caller goes away before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert g.book.holder("b") is None and g.book.outstanding == 0

    asyncio.run(main())


def test_a_grant_with_nobody_waiting_is_released_at_once():
    async def main():
        g = gate(daily_usd=1.0)
        await g.admit("a", None, None, "normal", 0.9)
        assert g.book.admit("orphan", None, None, "normal", 0.6, deadline=T0 + 60).queued  # parked by nobody
        nxt = asyncio.ensure_future(g.admit("next", None, None, "normal", 0.5, deadline=T0 + 60))
        await until(lambda: g.waiting == 1)
        g.book.release("a")
        g.changed()
        # the orphan was granted first (it is ahead), went straight back, and its room reached the next one
        assert (await nxt).granted
        assert g.book.holder("orphan") is None and g.book.reserved("daily") == pytest.approx(0.5)
        assert g.stats["abandoned"] == 1

    asyncio.run(main())


def test_critical_waiters_get_the_room_first():
    async def main():
        g = gate(daily_usd=1.0)
        await g.admit("fill", None, None, "normal", 1.0)
        order = []

        async def one(rid, prio):
            r = await g.admit(rid, None, None, prio, 0.4, deadline=T0 + 60)
            order.append((rid, r.granted))

        tasks = [asyncio.ensure_future(one(r, p)) for r, p in
                 [("n1", "normal"), ("b1", "bulk"), ("c1", "critical"), ("n2", "normal")]]
        await until(lambda: g.waiting == 4)
        g.book.release("fill")
        g.changed()  # room for two of the four
        await until(lambda: len(order) == 2)
        assert order == [("c1", True), ("n1", True)]
        for rid in ("c1", "n1"):
            g.book.settle(rid, 0.1)
        g.changed()  # settled 0.2: room for both that are left
        await asyncio.gather(*tasks)
        assert order[2:] == [("n2", True), ("b1", True)]

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(5))
def test_200_concurrent_requests_fill_the_budget_through_the_gate(seed):
    """The issue's scenario on one event loop: 200 requests begin at once; each granted one "calls the API"
    for a few loop turns and settles at its real cost (~60 % of the worst case)."""
    rng = random.Random(seed)
    s = Settings()
    limit = 0.10

    async def main():
        g = gate(daily_usd=limit, per_user_daily_usd=1.0)
        refused, spent = [], [0.0]

        async def request(i):
            est = rng.randint(900, 1100)
            worst = max_cost(SONNET, est, 200, s)
            real = price(Usage(input_tokens=est, output_tokens=rng.randint(16, 128)), SONNET, s).total_usd
            r = await g.admit(f"r{i}", f"u{i}", None, "normal", worst, owner=f"o{i}", model=SONNET, route="auto",
                              max_tokens=200, deadline=T0 + 120)
            if not r.granted:
                refused.append(r)
                return
            for _ in range(rng.randint(1, 20)):
                await asyncio.sleep(0)
            g.book.settle(f"r{i}", real, owner=f"o{i}")
            spent[0] += real
            assert spent[0] + g.book.reserved("daily") <= limit + 1e-12
            g.changed()

        await asyncio.gather(*(request(i) for i in range(200)))
        assert g.waiting == 0 and g.book.waiting == 0 and g.book.outstanding == 0
        assert spent[0] <= limit + 1e-12 and spent[0] >= 0.9 * limit
        assert refused and all(r.reason == CANNOT_FIT for r in refused)
        # only what could not fit: even against the final spend, settled + its worst case passes the budget
        assert all(spent[0] + r.amount_usd > limit for r in refused)
        assert g.stats["waited"] > 150

    asyncio.run(main())

