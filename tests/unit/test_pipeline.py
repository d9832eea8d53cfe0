"""The request pipeline on in-memory ports: every fallback path, budgets, intents and their outcomes, in ms.

The ports here are real implementations of the contracts (a ledger over the real BudgetBook keeping intents
the way the actor does, a transport that plays a script of answers), not mocks of the pipeline's insides."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import pytest

from runtime.admission import NOT_SENT, SENT_NO_ANSWER, Estimate, Grant, Outcome
from runtime.budget import BudgetBook
from runtime.budget_wait import BudgetGate
from runtime.errors import (AuthenticationError, BudgetExceeded, InvalidRequest, OverloadedAfterFallback,
                            RateLimitedPastDeadline, UpstreamError, UpstreamTimeout)
from runtime.intents import Begin, Begun
from runtime.pipeline import Pipeline, Ports
from runtime.pricing import price
from runtime.records import Record
from runtime.request import validate
from runtime.settings import BudgetSettings, Settings
from runtime.transport import CallFailed, Response
from runtime.usage import Usage

S = Settings(retry={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "attempts_per_model": 3,
                    "breaker_failures": 100}, cache={"enabled": False})
OPUS, SONNET, HAIKU = S.router.opus_model, S.router.sonnet_model, S.router.haiku_model


# -- ports ---------------------------------------------------------------------------------------------------

class Admission:
    def __init__(self, refuse: BaseException | None = None) -> None:
        self.grants: list[Grant] = []
        self.outcomes: list[Outcome] = []
        self.refuse = refuse

    async def acquire(self, e: Estimate, deadline_s: float | None = None) -> Grant:
        if self.refuse is not None and e.model_class != "count_tokens":
            raise self.refuse
        g = Grant(f"lease-{len(self.grants)}", e.request_id, e.model_class, e.input_tokens, e.max_output_tokens,
                  e.user_id)
        self.grants.append(g)
        return g

    def reconcile(self, o: Outcome) -> None:
        self.outcomes.append(o)

    def give_back(self, g: Grant) -> None:
        self.outcomes.append(Outcome(g.lease_id, None, NOT_SENT, {}, 0.0))

    def status_of(self, lease: str) -> list[int]:
        return [o.status for o in self.outcomes if o.lease_id == lease]


class Ledger:
    """Intents and records the way actors/ledger.py keeps them, over the real BudgetBook and BudgetGate: a
    begin with a deadline waits for room, a request id held or waiting under another owner is a duplicate,
    a record settles the reservation of the owner of its attempt's intent, and settles and releases wake
    waiters. ``clock`` is the wall clock the pipeline's deadlines are on."""

    def __init__(self, budgets: BudgetSettings | None = None, clock=time.time) -> None:
        self.book = BudgetBook(budgets or BudgetSettings(), clock)
        self.gate = BudgetGate(self.book)
        self.records: list[Record] = []
        self.intents: dict[tuple[str, int], dict[str, Any]] = {}
        self.begins: list[Begin] = []
        self.exceeded: list[tuple[float, float]] = []

    async def begin(self, b: Begin) -> Begun:
        self.begins.append(b)
        holder = self.book.holder(b.request_id)
        if holder is not None and holder.owner is not None and holder.owner != b.owner:
            return Begun(None, 0, duplicate_of=holder.owner)
        known = [a for (r, a) in self.intents if r == b.request_id]
        attempt = b.attempt if b.attempt is not None else max(known, default=0) + 1
        res = await self.gate.admit(b.request_id, b.user_id, b.tenant, b.priority, b.reserve_usd, owner=b.owner,
                                    model=b.model, route=b.route, max_tokens=b.max_tokens, deadline=b.deadline_at)
        if not res.granted:
            return Begun(res, 0)
        self.intents[(b.request_id, attempt)] = {"state": "open", "model": b.model, "reserved": b.reserve_usd,
                                                 "owner": b.owner}
        return Begun(res, attempt)

    async def intent(self, request_id: str, attempt: int, model: str, owner: str, reserved_usd: float) -> None:
        self.intents[(request_id, attempt)] = {"state": "open", "model": model, "reserved": reserved_usd,
                                               "owner": owner}

    async def commit(self, record: Record, *, tries: int = 1) -> bool:
        self.records.append(record)
        rid = record.request_id
        opened = self.intents.get((rid, record.attempt))
        owner = opened["owner"] if opened is not None and opened["state"] == "open" else None
        for a in record.void_attempts:
            self.intents[(rid, a)]["state"] = "void"
        if record.billed:
            self.intents[(rid, record.attempt)]["state"] = "billed"
        elif record.status == "unreconciled":
            self.intents[(rid, record.attempt)]["state"] = "unreconciled"
        if record.attempt > 0 or record.cost_usd > 0:  # a row with no intent behind it holds no reservation
            self.book.settle(rid, record.cost_usd, user_id=record.user_id, tenant=record.tenant, owner=owner,
                             output_tokens=record.usage.output_tokens if record.billed else None)
        self.gate.changed()
        return True

    async def release(self, request_id: str, owner: str) -> None:
        held = self.book.holder(request_id)
        if held is not None and not held.queued and held.owner in (None, owner):
            self.book.release(request_id)
            self.gate.changed()

    async def check_cost(self, request_id: str, reserved_usd: float, billed_usd: float) -> None:
        self.exceeded.append((reserved_usd, billed_usd))

    def states(self, rid: str) -> dict[int, str]:
        return {a: v["state"] for (r, a), v in sorted(self.intents.items()) if r == rid}


def message(model: str, text: str = "an answer", inp: int = 20, out: int = 5) -> Any:
    return anthropic.types.Message.model_validate({
        "id": f"msg_{abs(hash((model, text))) % 10**12}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": inp, "output_tokens": out}})


def fail(status: int, sent: str = "yes", retry_after: float | None = None, etype: str | None = None) -> CallFailed:
    names = {529: "overloaded_error", 429: "rate_limit_error", 500: "api_error", 400: "invalid_request_error",
             401: "authentication_error", 0: "timeout"}
    return CallFailed(status, sent, error_type=etype or names.get(status, "error"), message="scripted",
                      retry_after=retry_after)


class Transport:
    """Plays a script per model (a list of CallFailed to raise, then answers); counts tokens as told."""

    def __init__(self, script: dict[str, list[Any]] | None = None, count: int | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.calls: list[tuple[str, int]] = []
        self.count = count
        self.counted = 0

    async def create(self, model: str, params: dict, *, request_id: str, attempt: int, max_tokens: int) -> Response:
        self.calls.append((model, attempt))
        todo = self.script.get(model)
        if todo:
            nxt = todo.pop(0)
            if isinstance(nxt, BaseException):
                raise nxt
            return Response(nxt, {})
        return Response(message(model), {})

    async def stream(self, model: str, params: dict, *, request_id: str, attempt: int, max_tokens: int,
                     emit) -> Response:
        from runtime.streaming import message_events

        self.calls.append((model, attempt))
        todo = self.script.get(model)
        nxt = todo.pop(0) if todo else message(model)
        if isinstance(nxt, BaseException):
            raise nxt
        events = list(message_events(nxt.model_dump(mode="json")))
        cut = getattr(self, "cut_after", None)
        for i, e in enumerate(events):
            if cut is not None and i == cut:
                raise CallFailed(0, "maybe", error_type="stream_cut", message="cut", emitted=True)
            emit(e)
            await asyncio.sleep(0)
        return Response(nxt, {})

    async def count_tokens(self, model: str, params: dict) -> int:
        self.counted += 1
        if self.count is None:
            raise fail(500)
        return self.count


class HeldTransport(Transport):
    """A transport whose calls for the request ids in ``hold`` wait until their event is set: calls in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: dict[str, asyncio.Event] = {}
        self.entered: list[str] = []

    async def create(self, model: str, params: dict, *, request_id: str, attempt: int, max_tokens: int) -> Response:
        self.entered.append(request_id)
        ev = self.hold.get(request_id)
        if ev is not None:
            await ev.wait()
        return await super().create(model, params, request_id=request_id, attempt=attempt, max_tokens=max_tokens)


async def until(pred, rounds: int = 10_000) -> None:
    """Let the loop run until ``pred()`` holds."""
    for _ in range(rounds):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, d: float) -> None:
        self.slept.append(d)
        self.t += d


def make(script=None, *, settings=S, budgets=None, admission=None, count=None, transport=None):
    clock = Clock()

    def wall() -> float:
        return 1.7e9 + clock.t

    ports = Ports(admission=admission or Admission(), ledger=Ledger(budgets, wall),
                  transport=transport or Transport(script, count))
    p = Pipeline(settings, ports, caller="caller-0", life="life-1", clock=clock, wall=wall, sleep=clock.sleep)
    return p, ports, clock


def req(text="Summarize: the sky is blue.", model=SONNET, max_tokens=64, **kw):
    return validate({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]},
                    S, **kw)


def run(p: Pipeline, r):
    return asyncio.run(p.run(r))


# -- success and the ledger ------------------------------------------------------------------------------------

def test_first_try_answers_bills_once_and_closes_its_intent():
    p, ports, _ = make()
    r = req()
    res = run(p, r)
    assert res.model == SONNET and res.attempts == 1 and res.cache == "bypass"
    billed = [x for x in ports.ledger.records if x.billed]
    assert len(billed) == 1 and billed[0].message_id == res.message.id and billed[0].attempt == 1
    assert billed[0].cost_usd == pytest.approx(price(Usage(20, 5), SONNET, S).total_usd)
    assert ports.ledger.states(r.request_id) == {1: "billed"}
    assert ports.admission.status_of("lease-0") == [200]
    # the reservation was an upper bound of the bill
    assert ports.ledger.begins[0].reserve_usd >= billed[0].cost_usd


# -- every fallback path ---------------------------------------------------------------------------------------

def test_529_retries_the_same_model_with_backoff_then_answers():
    p, ports, clock = make({SONNET: [fail(529), fail(529)]})
    r = req()
    res = run(p, r)
    assert res.model == SONNET and [h["status"] for h in res.history] == [529, 529, 200]
    assert len(clock.slept) == 2 and all(0 < d <= 0.05 for d in clock.slept)
    assert ports.ledger.states(r.request_id) == {1: "void", 2: "void", 3: "billed"}
    assert res.attempts == 3 and len(ports.ledger.begins) == 1  # one reservation covers the retries


def test_529_past_the_retries_falls_to_the_next_model():
    p, ports, _ = make({SONNET: [fail(529)] * 3})
    res = run(p, req())
    assert res.model == HAIKU and res.route_reason.startswith("fallback after 529")
    assert [(h["model"], h["status"]) for h in res.history] == [(SONNET, 529)] * 3 + [(HAIKU, 200)]


def test_429_goes_to_the_next_model_at_once():
    p, ports, clock = make({OPUS: [fail(429, retry_after=30)]})
    res = run(p, req(model=OPUS))
    assert res.model == SONNET and clock.slept == []
    assert ports.admission.status_of("lease-0") == [429]


def test_429_on_the_last_model_waits_its_retry_after_then_retries():
    p, _, clock = make({HAIKU: [fail(429, retry_after=0.5)]})
    res = run(p, req(model=HAIKU))
    assert res.model == HAIKU and clock.slept == [0.5]


def test_a_nan_retry_after_is_not_slept_on():
    p, _, clock = make({HAIKU: [fail(429, retry_after=float("nan"))]})
    run(p, req(model=HAIKU))
    assert len(clock.slept) == 1 and 0 < clock.slept[0] <= 0.05  # its own backoff instead


def test_4xx_is_surfaced_after_one_try_and_never_retried():
    p, ports, _ = make({SONNET: [fail(400)]})
    r = req()
    with pytest.raises(UpstreamError) as exc:
        run(p, r)
    assert exc.value.status == 400 and exc.value.request_id == r.request_id
    assert ports.transport.calls == [(SONNET, 1)]
    assert ports.ledger.states(r.request_id) == {1: "void"}
    assert [x.status for x in ports.ledger.records] == ["error"]
    assert ports.ledger.book.outstanding == 0  # the reservation was given back


def test_401_is_an_authentication_error():
    p, _, _ = make({SONNET: [fail(401)]})
    with pytest.raises(AuthenticationError):
        run(p, req())


def test_overload_on_every_model_is_overloaded_after_fallback():
    p, ports, _ = make({OPUS: [fail(529)] * 3, SONNET: [fail(500)] * 3, HAIKU: [fail(529)] * 3})
    r = req(model=OPUS)
    with pytest.raises(OverloadedAfterFallback) as exc:
        run(p, r)
    assert {a["model"] for a in exc.value.attempts} == {OPUS, SONNET, HAIKU}
    assert set(ports.ledger.states(r.request_id).values()) == {"void"} and len(ports.transport.calls) == 9


def test_a_connection_that_never_opened_is_void_and_retried():
    p, ports, _ = make({SONNET: [fail(0, sent="no", etype="connection_error")]})
    r = req()
    res = run(p, r)
    assert res.attempts == 2 and ports.ledger.states(r.request_id) == {1: "void", 2: "billed"}
    assert ports.admission.status_of("lease-0") == [NOT_SENT]


def test_a_timeout_after_the_send_is_booked_unreconciled_and_retried_under_a_new_reservation():
    p, ports, _ = make({SONNET: [fail(0, sent="maybe")]})
    r = req()
    res = run(p, r)
    assert res.attempts == 2
    assert ports.ledger.states(r.request_id) == {1: "unreconciled", 2: "billed"}
    lost = [x for x in ports.ledger.records if x.status == "unreconciled"]
    assert len(lost) == 1 and lost[0].cost_usd == pytest.approx(ports.ledger.begins[0].reserve_usd)
    assert [b.attempt for b in ports.ledger.begins] == [None, 2]   # a fresh reservation for the retry
    assert ports.admission.status_of("lease-0") == [SENT_NO_ANSWER]  # the limiter keeps its tokens


def test_timeouts_everywhere_end_in_upstream_timeout_not_overload():
    p, ports, _ = make({m: [fail(0, sent="maybe")] * 3 for m in (SONNET, HAIKU)})
    r = req()
    with pytest.raises(UpstreamTimeout):
        run(p, r)
    assert set(ports.ledger.states(r.request_id).values()) == {"unreconciled"}
    assert ports.ledger.book.outstanding == 0


def test_an_open_circuit_skips_its_model():
    settings = S.model_copy(update={"retry": S.retry.model_copy(update={"breaker_failures": 2})})
    p, ports, _ = make({OPUS: [fail(529)] * 2}, settings=settings)
    run(p, req(model=OPUS))  # opens opus's circuit on the way to sonnet
    ports.transport.calls.clear()
    res = run(p, req(model=OPUS, text="another question"))
    assert res.model == SONNET and ports.transport.calls == [(SONNET, 1)]
    assert res.history[0] == {"model": OPUS, "status": "circuit_open"}


def test_a_retry_that_would_end_after_the_deadline_surfaces():
    slow = Settings(retry={"backoff_base_s": 5.0, "backoff_max_s": 5.0}, cache={"enabled": False})
    p, ports, _ = make({HAIKU: [fail(529)]}, settings=slow)
    with pytest.raises(OverloadedAfterFallback):
        run(p, req(model=HAIKU, deadline_s=1.0))
    assert len(ports.transport.calls) == 1


# -- budgets, admission, duplicates ----------------------------------------------------------------------------

def test_past_80_percent_non_critical_traffic_is_downgraded_to_haiku_before_sending():
    budgets = BudgetSettings(daily_usd=0.05)
    p, ports, _ = make(budgets=budgets)
    ports.ledger.book.add_spend(None, None, 0.041, ports.ledger.book.clock())
    r = req()
    res = run(p, r)
    assert res.model == HAIKU and "downgraded" in res.route_reason
    assert ports.transport.calls == [(HAIKU, 1)]
    assert ports.ledger.states(r.request_id) == {1: "billed"}
    assert ports.ledger.intents[(r.request_id, 1)]["model"] == HAIKU
    # a sonnet grant, if one came, went back unsent
    assert all(ports.admission.status_of(g.lease_id) == [NOT_SENT]
               for g in ports.admission.grants if g.model_class == "sonnet")
    crit = run(p, req(priority="critical", text="critical one"))
    assert crit.model == SONNET


def test_a_refused_budget_sends_nothing():
    p, ports, _ = make(budgets=BudgetSettings(daily_usd=0.0001))
    with pytest.raises(BudgetExceeded) as exc:
        run(p, req(max_tokens=2_000))
    assert ports.transport.calls == []
    assert all(ports.admission.status_of(g.lease_id) == [NOT_SENT] for g in ports.admission.grants)
    # Haiku was tried before refusing; the error carries that last refusal's figures
    assert [b.model for b in ports.ledger.begins] == [SONNET, HAIKU]
    e = exc.value
    assert e.reason == "cannot_fit" and e.budget == "daily" and e.limit_usd == 0.0001 and e.settled_usd == 0.0
    assert e.amount_usd == pytest.approx(ports.ledger.begins[1].reserve_usd) and e.amount_usd > e.limit_usd
    assert ports.ledger.book.outstanding == 0 and ports.ledger.book.waiting == 0


def test_a_begin_carries_the_deadline_route_and_max_tokens():
    p, ports, clock = make()
    run(p, req(max_tokens=100, deadline_s=30))
    run(p, req(model="auto", text="Hello there, how are you today?"))
    b, auto = ports.ledger.begins
    assert b.deadline_at == pytest.approx(p.wall() + 30) and b.route == "requested" and b.max_tokens == 100
    assert auto.route == "auto" and auto.deadline_at == pytest.approx(p.wall() + S.limiter.max_wait_s)


def test_a_request_that_finds_the_budget_full_waits_for_the_call_in_flight_then_goes_ahead():
    transport = HeldTransport()
    # a ~$0.02 worst case each (2,000 output tokens): one fits in $0.03, two do not
    p, ports, _ = make(budgets=BudgetSettings(daily_usd=0.03), transport=transport)
    first, second = req(max_tokens=2000, request_id="first"), req(max_tokens=2000, text="next", request_id="second")

    async def main():
        transport.hold["first"] = asyncio.Event()
        a = asyncio.ensure_future(p.run(first))
        await until(lambda: "first" in transport.entered)
        b = asyncio.ensure_future(p.run(second))
        await until(lambda: ports.ledger.gate.waiting == 1)
        assert ports.ledger.book.holder("second").queued and "second" not in transport.entered
        transport.hold["first"].set()  # its answer settles, and its room goes to the waiting one
        return await a, await b

    ra, rb = asyncio.run(main())
    assert ra.model == rb.model == SONNET and rb.attempts == 1
    assert ports.ledger.gate.stats["granted_after_wait"] == 1
    assert ports.ledger.book.outstanding == 0 and ports.ledger.states("second") == {1: "billed"}


def test_with_queueing_off_a_full_budget_refuses_at_once_and_does_not_downgrade():
    transport = HeldTransport()
    p, ports, _ = make(budgets=BudgetSettings(daily_usd=0.03, max_queued=0), transport=transport)

    async def main():
        transport.hold["first"] = asyncio.Event()
        a = asyncio.ensure_future(p.run(req(max_tokens=2000, request_id="first")))
        await until(lambda: "first" in transport.entered)
        with pytest.raises(BudgetExceeded) as exc:
            await p.run(req(max_tokens=2000, text="next", request_id="second"))
        transport.hold["first"].set()
        await a
        return exc.value

    e = asyncio.run(main())
    # room held by a call in flight is no reason to downgrade: only a worst case that can never fit is
    assert e.reason == "no_room" and e.reserved_usd > 0 and e.settled_usd + e.amount_usd <= e.limit_usd
    assert [b.model for b in ports.ledger.begins if b.request_id == "second"] == [SONNET]


def test_a_worst_case_that_can_never_fit_at_its_model_goes_to_haiku_critical_is_refused_with_the_figures():
    p, ports, _ = make(budgets=BudgetSettings(daily_usd=0.03))
    ports.ledger.book.add_spend(None, None, 0.015, ports.ledger.book.clock())  # 50 %: below the 80 % rule
    r = req(max_tokens=2000)  # Sonnet's worst case ~$0.02: settled + it > $0.03, it can never fit
    res = run(p, r)
    assert res.model == HAIKU and "budget refused" in res.route_reason and "cannot_fit" in res.route_reason
    assert [b.model for b in ports.ledger.begins] == [SONNET, HAIKU]
    assert ports.transport.calls == [(HAIKU, 1)] and ports.ledger.states(r.request_id) == {1: "billed"}
    # critical traffic is never downgraded: refused, with the figures
    with pytest.raises(BudgetExceeded) as exc:
        run(p, req(max_tokens=2000, priority="critical", text="a critical one"))
    e = exc.value
    assert e.reason == "cannot_fit" and e.budget == "daily" and e.limit_usd == 0.03
    assert e.settled_usd == pytest.approx(ports.ledger.book.spent("daily"))
    assert e.settled_usd + e.amount_usd > e.limit_usd and e.reserved_usd == 0.0
    assert "can never fit" in str(e)


def test_the_80_percent_rule_follows_expected_spend_not_worst_case_reservations():
    budgets = BudgetSettings(daily_usd=1.0)

    def loaded(learn: bool):
        p, ports, _ = make(budgets=budgets)
        book = ports.ledger.book
        if learn:  # calls of this model and route have cost a fifth of their worst case
            for i in range(30):
                book.admit(f"l{i}", None, None, "normal", 0.001, model=SONNET, route="requested")
                book.settle(f"l{i}", 0.0002)
        # another request in flight holds 85 % of the budget in worst case
        assert book.admit("big", None, None, "normal", 0.85, model=SONNET, route="requested", owner="x|y|z").granted
        return p

    assert run(loaded(learn=True), req()).model == SONNET   # expected: ~20 % of the budget
    res = run(loaded(learn=False), req())                    # nothing learned: expected = worst case, 85 %
    assert res.model == HAIKU and res.route_reason == "budget downgrade: downgraded to haiku"


def test_a_duplicate_id_is_refused_while_the_first_waits_or_holds_and_frees_nothing():
    transport = HeldTransport()
    p, ports, clock = make(budgets=BudgetSettings(daily_usd=0.03), transport=transport)
    other = Pipeline(S, ports, caller="caller-1", life="life-7", clock=clock, wall=p.wall, sleep=clock.sleep)
    book = ports.ledger.book

    async def main():
        transport.hold["filler"] = asyncio.Event()
        transport.hold["dup"] = asyncio.Event()
        f = asyncio.ensure_future(p.run(req(max_tokens=2000, request_id="filler")))
        await until(lambda: "filler" in transport.entered)
        a = asyncio.ensure_future(p.run(req(max_tokens=2000, text="q", request_id="dup")))
        await until(lambda: ports.ledger.gate.waiting == 1)
        first = book.holder("dup")
        with pytest.raises(InvalidRequest):  # waiting: a second run may not take its place in the queue
            await other.run(req(max_tokens=2000, text="q", request_id="dup"))
        assert book.holder("dup") == first and first.queued
        transport.hold["filler"].set()
        await f
        await until(lambda: "dup" in transport.entered)
        held = book.reserved("daily")
        with pytest.raises(InvalidRequest):  # holding: its failure row must not settle the first's room
            await other.run(req(max_tokens=2000, text="q", request_id="dup"))
        assert book.reserved("daily") == held and book.holder("dup").owner == first.owner
        transport.hold["dup"].set()
        return await a

    assert asyncio.run(main()).model == SONNET
    assert book.outstanding == 0


def test_no_admission_in_time_voids_the_intent_and_sends_nothing():
    adm = Admission(refuse=RateLimitedPastDeadline("no grant", reason="sonnet:otpm"))
    p, ports, _ = make(admission=adm)
    r = req()
    with pytest.raises(RateLimitedPastDeadline):
        run(p, r)
    assert ports.transport.calls == [] and ports.ledger.states(r.request_id) == {1: "void"}
    assert ports.ledger.book.outstanding == 0


def test_a_duplicate_request_id_is_refused_before_anything_is_sent():
    p, ports, _ = make()

    async def dup_begin(b: Begin) -> Begun:
        return Begun(None, 0, duplicate_of="caller-1|x|y")

    ports.ledger.begin = dup_begin
    with pytest.raises(InvalidRequest) as exc:
        run(p, req(request_id="same-id"))
    assert exc.value.field == "request_id" and ports.transport.calls == []


# -- sizing: reservations are upper bounds ---------------------------------------------------------------------

S_BUDGET = S.model_copy(update={"budgets": S.budgets.model_copy(update={"daily_usd": 1_000.0})})


def test_unsure_prompts_are_counted_by_the_api_and_priced_at_that_count_where_a_budget_applies():
    p, ports, _ = make(count=10_000, settings=S_BUDGET)
    r = req(text="この文書を要約してください。" * 20)
    run(p, r)
    assert ports.transport.counted == 1
    from runtime.pricing import bound_cost
    # no cache_control anywhere (too short for automatic placement): nothing can be written, all plain input
    assert ports.ledger.begins[0].reserve_usd == pytest.approx(
        bound_cost(SONNET, 10_000, 64, S, cacheable_tokens_bound=0, cache_ttl=None))
    # with automatic caching off the user's markers are not looked at: every token at the dearest rate
    p3, ports3, _ = make(count=10_000, settings=S_BUDGET)
    run(p3, req(text="この文書を要約してください。" * 20, prompt_cache=False))
    assert ports3.ledger.begins[0].reserve_usd == pytest.approx(bound_cost(SONNET, 10_000, 64, S))
    p2, ports2, _ = make(settings=S_BUDGET)
    run(p2, req(text="Plain English prose about the weather and the sea."))
    assert ports2.transport.counted == 0  # prose is bounded locally


def test_without_a_budget_nothing_is_counted_and_the_reservation_is_the_structural_bound():
    # code, digits and other scripts are all "unsure": counting each would put every such request behind
    # the count_tokens rate limit and a round trip, for a figure nothing needs when no budget applies
    from runtime.estimate import input_upper_bound
    from runtime.pricing import bound_cost
    p, ports, _ = make(count=10_000)
    r = req(text="def f(x): return {k: v**2 for k, v in x.items()}  # 42")
    run(p, r)
    assert ports.transport.counted == 0
    bound = input_upper_bound(r.params).tokens
    assert ports.ledger.begins[0].reserve_usd == pytest.approx(
        bound_cost(SONNET, bound, 64, S, worst_tier=True, cacheable_tokens_bound=0, cache_ttl=None))


def test_always_counts_even_without_a_budget():
    always = S.model_copy(update={"estimate": S.estimate.model_copy(update={"count_tokens": "always"})})
    p, ports, _ = make(count=10_000, settings=always)
    run(p, req(text="Plain English prose about the weather and the sea."))
    assert ports.transport.counted == 1


def test_without_a_count_an_unsure_prompt_is_priced_at_the_dearest_tier():
    p, ports, _ = make(count=None)  # count_tokens fails
    run(p, req(text="这是一个很长的中文句子。" * 3000, model=HAIKU, max_tokens=16))
    from runtime.estimate import input_upper_bound
    from runtime.pricing import bound_cost
    bound = input_upper_bound(req(text="这是一个很长的中文句子。" * 3000, model=HAIKU).params).tokens
    assert ports.ledger.begins[0].reserve_usd == pytest.approx(
        bound_cost(HAIKU, bound, 16, S, worst_tier=True, cacheable_tokens_bound=0, cache_ttl=None))


def test_a_bill_over_its_reservation_is_reported():
    p, ports, _ = make({SONNET: [message(SONNET, inp=10_000_000, out=5)]})
    run(p, req())
    assert len(ports.ledger.exceeded) == 1 and p.stats["reservation_exceeded"] == 1


# -- streaming --------------------------------------------------------------------------------------------------

async def _collect(p, r, stop_after=None):
    out = []
    agen = p.stream(r)
    async for e in agen:
        out.append(e)
        if stop_after is not None and len(out) >= stop_after:
            await agen.aclose()
            break
    return out


def test_a_stream_yields_the_api_events_and_bills_once():
    p, ports, _ = make({SONNET: [fail(529), message(SONNET, text="streamed words here")]})
    r = req()
    events = asyncio.run(_collect(p, r))
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "streamed words here"
    assert ports.ledger.states(r.request_id) == {1: "void", 2: "billed"}  # a retry before the first event


def test_a_stream_cut_after_it_began_is_a_typed_error_and_the_call_is_booked():
    p, ports, _ = make()
    ports.transport.cut_after = 3
    r = req()
    with pytest.raises(UpstreamTimeout):
        asyncio.run(_collect(p, r))
    assert ports.ledger.states(r.request_id) == {1: "unreconciled"}
    assert len(ports.transport.calls) == 1  # never retried: the consumer had part of the answer


def test_a_consumer_that_leaves_early_still_gets_the_call_settled():
    p, ports, _ = make()
    r = req()

    async def go():
        got = await _collect(p, r, stop_after=2)
        while p._detached:  # the rest of the stream is read in the background
            await asyncio.sleep(0)
        return got

    got = asyncio.run(go())
    assert len(got) == 2 and ports.ledger.states(r.request_id) == {1: "billed"}
