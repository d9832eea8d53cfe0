"""Admission while the cache looks up: the first attempt's grant comes from the caller's lease during the
lookup; a hit, a lookup that waited for another request's answer, an attempt that asks for something else, a
failure before the call and a cancellation each give it back, once. In-memory ports over the real LeaseBook."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import pytest

from runtime.admission import NOT_SENT, Estimate, Grant, Outcome
from runtime.errors import BudgetExceeded
from runtime.leases import CapacityLease, LeaseBook
from runtime.pipeline import Pipeline, Ports
from runtime.request import validate
from runtime.settings import BudgetSettings, Settings

from test_pipeline import Admission, Clock, Ledger, Transport, message  # the pipeline tests' ports

S = Settings(retry={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "breaker_failures": 1,
                    "breaker_cooldown_s": 60.0})
SONNET = S.router.sonnet_model


class LeasedAdmission(Admission):
    """The admission port as actors/limiter.py's client runs it with leases: a real LeaseBook holding one
    lease for sonnet's class, per-request ``acquire`` (counted) for anything else."""

    def __init__(self, clock: Clock, requests: int = 10) -> None:
        super().__init__()
        self.book = LeaseBook(clock=clock, term_s=60.0)
        self.book.add(CapacityLease("L1", "default", "sonnet", requests, 10**6, 10**6, 60.0))
        self.asked: list[Estimate] = []
        self.tried: list[Estimate] = []
        self.admitted_: list[Estimate] = []

    def try_acquire(self, e: Estimate) -> Grant | None:
        self.tried.append(e)
        return self.book.try_admit(e, note=False)

    def admitted(self, e: Estimate) -> None:
        self.admitted_.append(e)
        self.book.note(e)

    async def acquire(self, e: Estimate, deadline_s: float | None = None) -> Grant:
        self.asked.append(e)
        return await super().acquire(e, deadline_s)

    def reconcile(self, o: Outcome) -> None:
        super().reconcile(o)
        if LeaseBook.owns(o.lease_id):
            self.book.settle(o.lease_id, o.usage, o.status)

    def give_back(self, g: Grant) -> None:
        self.reconcile(Outcome(g.lease_id, None, NOT_SENT, {}, 0.0))

    def leased(self) -> list[Outcome]:
        return [o for o in self.outcomes if LeaseBook.owns(o.lease_id)]

    def room(self) -> float:
        return self.book._active[("default", "sonnet")].requests


@dataclass
class Looked:
    kind: str
    message: dict | None = None
    saved_usd: float = 0.0
    leader: bool = True


class Cache:
    """A cache port whose lookups answer ``kind`` after ``took`` seconds of the pipeline's clock, or once
    ``gate`` is set; it notes what the admission port had been asked by the time each lookup answered."""

    def __init__(self, clock: Clock, admission: LeasedAdmission, kind: str = "miss", took: float = 0.0) -> None:
        self.clock, self.admission, self.kind, self.took = clock, admission, kind, took
        self.gate: asyncio.Event | None = None
        self.tried_by_answer: list[int] = []
        self.stored: list[Any] = []

    async def lookup(self, params: dict, model: str, tenant: str | None, cache_enabled: bool = True, *,
                     owner: str | None = None, wait_s: float | None = None, request_id: str | None = None) -> Looked:
        if not cache_enabled:
            return Looked("bypass", leader=False)
        if self.gate is not None:
            await self.gate.wait()
        for _ in range(3):  # a round trip: the loop turns while it is out
            await asyncio.sleep(0)
        self.clock.t += self.took
        self.tried_by_answer.append(len(self.admission.tried))
        if self.kind == "exact":
            return Looked("exact", message(SONNET, "cached").model_dump(mode="json"), 0.01, leader=False)
        return Looked(self.kind)

    def store_later(self, outcome: Any, message: Any, model_used: str, cost_usd: float) -> None:
        self.stored.append(outcome)

    async def release(self, outcome: Any) -> None:
        pass

    def holding(self, outcome: Any):
        return contextlib.nullcontext()


def make(kind: str = "miss", took: float = 0.0, budgets: BudgetSettings | None = None, settings: Settings = S):
    clock = Clock()

    def wall() -> float:
        return 1.7e9 + clock.t

    adm = LeasedAdmission(clock)
    cache = Cache(clock, adm, kind, took)
    ports = Ports(admission=adm, ledger=Ledger(budgets, wall), transport=Transport(), cache=cache)
    p = Pipeline(settings, ports, caller="caller-0", life="life-1", clock=clock, wall=wall, sleep=clock.sleep)
    return p, adm, cache, ports


def sonnet_req(**kw):
    return validate({"model": SONNET, "max_tokens": 64,
                     "messages": [{"role": "user", "content": "Summarize: the sky is blue."}]}, S, **kw)


def test_a_miss_is_sent_on_the_grant_admitted_while_the_lookup_was_out():
    p, adm, cache, ports = make("miss")
    res = asyncio.run(p.run(sonnet_req()))
    assert res.cache == "miss" and res.attempts == 1
    assert cache.tried_by_answer == [1]             # asked before the lookup answered
    assert adm.asked == [] and len(adm.admitted_) == 1   # no second admission; its demand counted once
    (sent,) = adm.leased()
    assert sent.status == 200                        # the call's outcome settled the lease grant
    assert adm.room() == 9 and not adm.book._inflight
    assert len(cache.stored) == 1
    # the reservation worked out during the lookup is the one the attempt would have worked out itself
    plain, _, _, plain_ports = make("miss")
    plain.ports.cache = None
    asyncio.run(plain.run(sonnet_req()))
    assert ports.ledger.begins[0].reserve_usd == plain_ports.ledger.begins[0].reserve_usd > 0


def test_a_hit_gives_the_early_grant_back_and_sends_nothing():
    p, adm, cache, ports = make("exact")
    res = asyncio.run(p.run(sonnet_req()))
    assert res.cache == "exact" and ports.transport.calls == []
    assert [o.status for o in adm.leased()] == [NOT_SENT]
    assert adm.room() == 10 and not adm.book._inflight  # every slot back
    assert adm.asked == [] and adm.admitted_ == []       # not counted as demand: nothing was sent
    assert not ports.ledger.begins                       # no reservation, no intent for a hit


def test_a_lookup_that_waited_for_another_answer_gives_the_grant_back_and_admits_again():
    p, adm, cache, ports = make("miss", took=2.0)
    res = asyncio.run(p.run(sonnet_req()))
    assert res.cache == "miss" and ports.transport.calls == [(SONNET, 1)]
    statuses = [o.status for o in adm.leased()]
    assert statuses == [NOT_SENT]                     # the early grant, back before the call
    assert len(adm.asked) == 1 and adm.admitted_ == []  # the attempt asked afresh
    assert not adm.book._inflight and adm.room() == 10


def test_an_attempt_that_asks_for_another_model_gives_the_early_grant_back():
    p, adm, cache, ports = make("miss")
    p.breaker.record(SONNET, 529)  # open: the first attempt goes to the next model of the chain
    res = asyncio.run(p.run(sonnet_req()))
    assert res.model != SONNET
    assert [o.status for o in adm.leased()] == [NOT_SENT]
    assert len(adm.asked) == 1 and adm.asked[0].model_class != "sonnet"
    assert not adm.book._inflight


def test_a_budget_refusal_before_the_call_gives_the_early_grant_back_once():
    p, adm, cache, ports = make("miss", budgets=BudgetSettings(daily_usd=1e-9))
    with pytest.raises(BudgetExceeded):
        asyncio.run(p.run(sonnet_req(priority="critical")))
    assert ports.transport.calls == []
    assert [o.status for o in adm.leased()] == [NOT_SENT]  # once, not twice
    assert not adm.book._inflight and adm.room() == 10


def test_a_request_cancelled_during_its_lookup_gives_the_early_grant_back():
    p, adm, cache, ports = make("miss")

    async def go() -> None:
        cache.gate = asyncio.Event()
        task = asyncio.ensure_future(p.run(sonnet_req()))
        while not adm.tried:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert ports.transport.calls == []
    assert [o.status for o in adm.leased()] == [NOT_SENT]
    assert not adm.book._inflight and adm.room() == 10


def test_a_bypassed_lookup_admits_as_before():
    p, adm, cache, ports = make("miss")
    res = asyncio.run(p.run(sonnet_req(cache=False)))
    assert res.cache == "bypass" and adm.tried == []  # nothing to overlap: admitted as before
    assert len(adm.asked) == 1 and adm.admitted_ == []


def test_streamed_requests_leave_no_per_request_state_behind():
    p, adm, cache, ports = make("miss")

    async def go() -> None:
        for _ in range(3):
            async for _event in p.stream(sonnet_req()):
                pass

    asyncio.run(go())
    assert p._plans == {} and not adm.book._inflight
