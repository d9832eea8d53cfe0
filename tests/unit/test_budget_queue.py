"""Budget admission that waits instead of refusing early (issue 16): queue order, head of line, cancellation and
expiry, thresholds on expected spend, learned cost ratios, owners, corrections, the snapshot."""

import json
import random
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.budget import CANCELLED, CANNOT_FIT, EXPIRED, NO_ROOM, QUEUE_FULL, REPLACED, BudgetBook
from runtime.buckets import ManualClock
from runtime.errors import BudgetExceeded
from runtime.pricing import max_cost, price
from runtime.settings import BudgetSettings, Settings
from runtime.usage import Usage

pytestmark = pytest.mark.pure

T0 = datetime(2026, 11, 5, 12, 0, tzinfo=timezone.utc).timestamp()
SONNET = "claude-sonnet-5-5"


def book(clock=None, **kw):
    return BudgetBook(BudgetSettings(**kw), clock or ManualClock(T0))


# -- the scenario, pure --------------------------------------------------------------------------------
def _scenario_requests(rng: random.Random, n: int) -> list[tuple[str, float, float]]:
    """(request id, worst case, real cost): ~1,000-token Sonnet prompts, max_tokens 200, real usage ~60 % of
    the worst case, as the issue measured."""
    s = Settings()
    out = []
    for i in range(n):
        est = rng.randint(900, 1100)
        worst = max_cost(SONNET, est, 200, s)
        real = price(Usage(input_tokens=int(est * rng.uniform(1.0, 1.25)), output_tokens=rng.randint(150, 200)),
                     SONNET, s).total_usd
        assert real <= worst
        out.append((f"r{i}", worst, real))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_200_concurrent_requests_fill_the_budget_without_overshoot(seed):
    rng = random.Random(seed)
    limit = 0.10
    b = book(daily_usd=limit, per_user_daily_usd=1.0)  # per-user caps not binding
    reqs = _scenario_requests(rng, 200)
    worst = {r: w for r, w, _ in reqs}
    real = {r: c for r, _, c in reqs}
    assert 1.5 < sum(worst.values()) / sum(real.values()) < 2.0
    in_flight: list[str] = []
    refused: list[tuple[str, float]] = []  # (request, settled spend when it was refused)
    spent = 0.0

    def take(res):
        if res.granted:
            in_flight.append(res.request_id)
        elif not res.queued:
            assert res.reason == CANNOT_FIT and res.budget == "daily"
            # it really could not fit: settled + its worst case > the budget, and the figures say so
            assert res.settled_usd + res.amount_usd > limit and res.settled_usd == pytest.approx(spent)
            assert res.limit_usd == limit and res.amount_usd == worst[res.request_id]
            refused.append((res.request_id, spent))

    for rid, w, _ in reqs:  # all 200 arrive at once
        take(b.admit(rid, f"u{rid}", None, "normal", w, model=SONNET, route="auto"))
    assert b.waiting > 150  # most had to wait, none was refused while the budget was empty
    assert not refused
    while in_flight:
        rid = in_flight.pop(rng.randrange(len(in_flight)))
        b.settle(rid, real[rid])
        spent += real[rid]
        for res in b.on_change():
            take(res)
        assert spent + sum(worst[r] for r in in_flight) <= limit + 1e-12  # the guarantee, at every step
    assert b.waiting == 0 and b.outstanding == 0
    answered = 200 - len(refused)
    assert spent <= limit + 1e-12
    assert spent >= 0.90 * limit
    assert b.spent("daily") == pytest.approx(spent)
    assert answered + len(refused) == 200
    # only what could not fit was refused: even at the end, settled + its worst case passes the budget
    assert all(spent + worst[r] > limit for r, _ in refused)


def test_the_old_reserve_refuses_early_in_the_same_scenario():
    # the baseline the queue fixes: reserve() (no queue) refuses while reservations fill the budget
    rng = random.Random(0)
    b = book(daily_usd=0.10)
    reqs = _scenario_requests(rng, 200)
    granted = [(r, c) for r, w, c in reqs if b.reserve(r, None, None, "normal", w).granted]
    for r, c in granted:
        b.settle(r, c)
    assert b.spent("daily") < 0.75 * 0.10


# -- order and head of line -----------------------------------------------------------------------------------
def _fill(b, amount=1.0, rid="filler"):
    res = b.admit(rid, None, None, "normal", amount)
    assert res.granted
    return res


def test_queue_order_is_priority_then_arrival():
    b = book(daily_usd=1.0, critical_hard_cap=1.0)
    _fill(b)
    order = [("b1", "bulk"), ("n1", "normal"), ("c1", "critical"), ("n2", "normal"), ("b2", "bulk"),
             ("c2", "critical")]
    tickets = {}
    for rid, prio in order:
        res = b.admit(rid, None, None, prio, 0.1)
        assert res.queued and not res.granted and res.reason == NO_ROOM and res.budget == "daily"
        assert res.decision == "queued" and res.spent_usd == pytest.approx(1.0)
        tickets[rid] = res.ticket
    assert len(set(tickets.values())) == 6
    b.settle("filler", 0.0)  # room for all six
    admitted = b.on_change()
    assert [r.request_id for r in admitted] == ["c1", "c2", "n1", "n2", "b1", "b2"]
    assert all(r.granted and r.ticket == tickets[r.request_id] for r in admitted)
    assert b.on_change() == []


def test_room_goes_to_critical_first_then_normal_then_bulk():
    b = book(daily_usd=1.0)
    _fill(b)
    b.admit("b", None, None, "bulk", 0.3)
    b.admit("n", None, None, "normal", 0.3)
    b.admit("c", None, None, "critical", 0.3)
    b.release("filler")
    b.admit("hold", None, None, "normal", 0.0)  # nothing changes: zero-cost requests always fit
    b.admit("x", None, None, "critical", 0.35)  # a new critical request passes the waiting normal and bulk ones
    got = b.on_change()
    assert [r.request_id for r in got] == ["c", "n"]
    assert b.reserved("daily") == pytest.approx(0.35 + 0.3 + 0.3)
    assert b.waiting == 1  # bulk waits for room


def test_a_later_small_request_does_not_starve_an_earlier_big_one():
    b = book(daily_usd=1.0)
    _fill(b, 0.9)
    big = b.admit("big", None, None, "normal", 0.5)
    assert big.queued
    # 0.05 would fit beside the 0.9 in flight, but the big one waiting ahead claims its room first
    small = b.admit("small", None, None, "normal", 0.05)
    assert small.queued
    # a stream of small ones keeps waiting too, however many in-flight reservations come and go
    b.settle("filler", 0.3)
    got = b.on_change()
    assert [r.request_id for r in got] == ["big", "small"]
    assert b.reserved("daily") == pytest.approx(0.55)


def test_a_lower_priority_small_request_waits_behind_a_higher_priority_big_one():
    b = book(daily_usd=1.0)
    _fill(b, 0.9)
    assert b.admit("big", None, None, "normal", 0.5).queued
    assert b.admit("bulk-small", None, None, "bulk", 0.05).queued
    # but a critical one is not held back by waiting normal traffic
    assert b.admit("crit-small", None, None, "critical", 0.05).granted


def test_head_of_line_is_per_budget_a_disjoint_user_goes_ahead():
    b = book(per_user_daily_usd=1.0, daily_usd=10.0)
    assert b.admit("a0", "alice", None, "normal", 0.9).granted
    assert b.admit("a1", "alice", None, "normal", 0.5).queued       # alice's own budget is full
    assert b.admit("b1", "bob", None, "normal", 0.5).granted        # bob's is not, the global has room
    b.settle("a0", 0.2)
    assert [r.request_id for r in b.on_change()] == ["a1"]


def test_a_blocked_ticket_claims_room_in_all_its_budgets():
    # alice's ticket waits for her own budget; bob's later ticket may not take the global room she will need
    b = book(daily_usd=1.0, per_user_daily_usd=0.5)
    assert b.admit("a0", "alice", None, "normal", 0.5).granted
    assert b.admit("b0", "bob", None, "normal", 0.3).granted
    assert b.admit("a1", "alice", None, "normal", 0.4).queued
    assert b.admit("b1", "bob", None, "normal", 0.2).queued  # 0.8 + alice's 0.4 + 0.2 > 1
    b.release("b0")
    assert b.on_change() == []  # daily has 0.5 free, but 0.4 of it is claimed by alice, who is ahead
    b.settle("a0", 0.1)
    assert [r.request_id for r in b.on_change()] == ["a1", "b1"]
    assert b.reserved("daily") == pytest.approx(0.6) and b.spent("daily") == pytest.approx(0.1)


def test_a_waiting_ticket_that_can_no_longer_fit_is_refused_with_the_figures():
    b = book(daily_usd=1.0)
    _fill(b, 0.6, "f1")
    _fill(b, 0.3, "f2")
    q = b.admit("q", "u", None, "normal", 0.45)
    assert q.queued and q.state in ("normal", "downgrade")
    b.settle("f1", 0.58)  # settled 0.58 + 0.45 > 1: it can never fit now
    got = b.on_change()
    assert len(got) == 1
    r = got[0]
    assert (r.request_id, r.granted, r.queued, r.reason, r.state) == ("q", False, False, CANNOT_FIT, "stop")
    assert r.budget == "daily" and r.settled_usd == pytest.approx(0.58) and r.reserved_usd == pytest.approx(0.3)
    assert r.amount_usd == 0.45 and r.limit_usd == 1.0 and r.ticket == q.ticket
    exc = r.refusal()
    assert isinstance(exc, BudgetExceeded) and exc.request_id == "q" and exc.budget == "daily"
    assert exc.settled_usd == pytest.approx(0.58) and exc.amount_usd == 0.45 and exc.reason == CANNOT_FIT
    assert "can never fit" in str(exc) and "$0.5800" in str(exc)


def test_admit_refuses_at_once_only_what_can_never_fit():
    b = book(daily_usd=1.0, critical_hard_cap=1.5)
    b.settle("old", 0.7)
    _fill(b, 0.3)
    assert b.admit("fits-later", None, None, "normal", 0.3).queued
    r = b.admit("never", None, None, "normal", 0.31)
    assert r.decision == "refused" and r.reason == CANNOT_FIT and r.state == "stop"
    assert r.refusal("rid").request_id == "rid"
    # critical may go to its hard cap: settled 0.7 + 0.7 <= 1.5 can fit later, so it waits
    assert b.admit("crit-wait", None, None, "critical", 0.7).queued
    assert b.admit("crit-never", None, None, "critical", 0.81).reason == CANNOT_FIT
    b.release("filler")
    assert [r.request_id for r in b.on_change()] == ["crit-wait"]  # critical first, then 1.4 leaves no room
    assert b.reserved("daily") == pytest.approx(0.7) and b.waiting == 1


# -- cancellation, expiry, replacement --------------------------------------------------------------------------
def test_cancel_frees_the_claim_and_reports_the_refusal():
    b = book(daily_usd=1.0)
    _fill(b, 0.9)
    big = b.admit("big", None, None, "normal", 0.5)
    small = b.admit("small", None, None, "normal", 0.1)
    assert big.queued and small.queued
    gone = b.cancel(big.ticket)
    assert gone.request_id == "big" and gone.reason == CANCELLED and not gone.granted and not gone.queued
    assert "cancelled" in str(gone.refusal())
    assert b.cancel(big.ticket) is None  # only once
    assert [r.request_id for r in b.on_change()] == ["small"]  # 0.9 + 0.1 fits once big no longer claims
    assert b.cancel(small.ticket) is None  # admitted: the caller releases it instead
    assert b.holder("small").queued is False


def test_tickets_expire_at_their_deadline():
    clock = ManualClock(T0)
    b = book(clock, daily_usd=1.0)
    _fill(b)
    a = b.admit("a", None, None, "normal", 0.2, deadline=T0 + 5)
    c = b.admit("c", None, None, "normal", 0.2, deadline=T0 + 2)
    n = b.admit("n", None, None, "normal", 0.2)  # no deadline: waits as long as it takes
    assert a.queued and c.queued and n.queued
    assert b.next_deadline() == T0 + 2
    assert b.on_change() == []
    clock.advance(2)
    got = b.on_change()
    assert [(r.request_id, r.reason) for r in got] == [("c", EXPIRED)]
    assert "deadline" in str(got[0].refusal())
    assert b.next_deadline() == T0 + 5
    clock.advance(10)
    assert [(r.request_id, r.reason) for r in b.on_change()] == [("a", EXPIRED)]
    assert b.next_deadline() is None
    b.release("filler")
    assert [r.request_id for r in b.on_change()] == ["n"]
    # a request whose deadline has already passed is not queued
    _fill(b, 0.8, "f2")
    late = b.admit("late", None, None, "normal", 0.5, deadline=clock())
    assert late.decision == "refused" and late.reason == EXPIRED


def test_re_admitting_a_waiting_request_replaces_its_ticket():
    b = book(daily_usd=1.0)
    _fill(b, 0.8)
    first = b.admit("r", None, None, "normal", 0.5, owner="caller-1")
    second = b.admit("r", None, None, "normal", 0.15, owner="caller-1")  # e.g. downgraded to a cheaper model
    assert first.queued and second.granted  # its own old claim does not stand in its way
    assert [(x.request_id, x.reason, x.ticket) for x in b.on_change()] == [("r", REPLACED, first.ticket)]
    assert b.waiting == 0 and b.reserved("daily") == pytest.approx(0.95)
    third = b.admit("q", None, None, "normal", 0.5)
    fourth = b.admit("q", None, None, "normal", 0.4)
    assert third.queued and fourth.queued and fourth.ticket != third.ticket and b.waiting == 1
    assert [(x.request_id, x.reason) for x in b.on_change()] == [("q", REPLACED)]


def test_a_held_reservation_shrinks_at_once_and_never_waits_to_grow():
    b = book(daily_usd=1.0)
    assert b.admit("r", None, None, "normal", 0.5, owner="A").granted
    _fill(b, 0.5)
    assert b.admit("w", None, None, "normal", 0.3).queued  # waits for room, claims 0.3
    # a downgrade to a cheaper model is granted although tickets wait: it only gives room back ...
    down = b.admit("r", None, None, "normal", 0.2, owner="A")
    assert down.granted and b.reserved("daily") == pytest.approx(0.7)
    assert [x.request_id for x in b.on_change()] == ["w"]  # ... which goes to the waiting ticket
    # growing is granted or refused, never queued: holding room while waiting could block those ahead
    up = b.admit("r", None, None, "normal", 0.4, owner="A")
    assert up.decision == "refused" and up.reason == NO_ROOM and b.waiting == 0
    assert b.holder("r").amount_usd == 0.2  # what it held stands
    # a re-run by a new owner at the same worst case takes the reservation over even with tickets waiting
    assert b.admit("x", None, None, "normal", 0.1).queued
    rerun = b.admit("r", None, None, "normal", 0.2, owner="B")
    assert rerun.granted and b.holder("r").owner == "B"


def test_queue_limits():
    b = book(daily_usd=1.0, max_queued=2)
    _fill(b)
    assert b.admit("a", None, None, "normal", 0.1).queued
    assert b.admit("b", None, None, "normal", 0.1).queued
    full = b.admit("c", None, None, "normal", 0.1)
    assert full.decision == "refused" and full.reason == QUEUE_FULL
    nq = book(daily_usd=1.0, max_queued=0)  # the old behaviour: refuse when full
    _fill(nq)
    r = nq.admit("a", None, None, "normal", 0.1)
    assert r.decision == "refused" and r.reason == NO_ROOM and r.state == "stop"


def test_reserve_never_queues():
    b = book(daily_usd=1.0)
    _fill(b, 0.9)
    r = b.reserve("r", None, None, "normal", 0.2)
    assert not r.granted and not r.queued and r.reason == NO_ROOM and b.waiting == 0
    # and it respects the claims of waiting tickets: it cannot jump the queue either
    assert b.admit("w", None, None, "normal", 0.1).granted
    b.release("filler")
    _fill(b, 0.5)
    assert b.admit("big", None, None, "normal", 0.45).queued
    assert not b.reserve("small", None, None, "normal", 0.3).granted
    with pytest.raises(ValueError):
        b.admit("x", None, None, "urgent", 0.1)


# -- the guarantee, under arbitrary interleavings --------------------------------------------------------------
_op = st.one_of(
    st.tuples(st.just("admit"), st.sampled_from(["critical", "normal", "bulk"]), st.sampled_from(["a", "b", "c"]),
              st.floats(0.0, 0.4), st.sampled_from([None, 1.0, 5.0])),
    st.tuples(st.just("settle"), st.integers(0, 10_000), st.floats(0.0, 1.0)),
    st.tuples(st.just("release"), st.integers(0, 10_000)),
    st.tuples(st.just("cancel"), st.integers(0, 10_000)),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    st.tuples(st.just("adjust"), st.sampled_from(["a", "b", "c"]), st.floats(-0.2, 0.0)),
    # the same request id again (a downgrade, a fallback, a re-run), queueing or not
    st.tuples(st.just("again"), st.integers(0, 10_000), st.floats(0.0, 0.4), st.booleans()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=120), cap=st.sampled_from([1.0, 1.5]))
def test_no_interleaving_passes_a_budget_and_nothing_waits_forever(ops, cap):
    clock = ManualClock(T0)
    b = book(clock, daily_usd=1.0, per_user_daily_usd=0.6, critical_hard_cap=cap)
    held: dict[str, tuple[float, str, str]] = {}   # request -> (worst case, user, priority)
    tickets: dict[int, str] = {}
    spent = {"total": 0.0, "a": 0.0, "b": 0.0, "c": 0.0}
    n = 0

    last = {"prio": None}

    def take(res, user, prio):
        if res.granted:
            held[res.request_id] = (res.amount_usd, user, prio)
            tickets.pop(res.ticket, None)
            last["prio"] = prio
        elif res.queued:
            tickets[res.ticket] = res.request_id
        else:
            tickets.pop(res.ticket, None)

    users = {}
    prios = {}
    for op in ops:
        if op[0] == "admit":
            _, prio, user, amount, wait = op
            rid = f"r{n}"
            n += 1
            users[rid], prios[rid] = user, prio
            take(b.admit(rid, user, None, prio, amount, deadline=None if wait is None else clock() + wait),
                 user, prio)
        elif op[0] == "settle" and held:
            rid = sorted(held)[op[1] % len(held)]
            amount, user, _ = held.pop(rid)
            actual = amount * op[2]  # real cost never above the worst case
            assert b.settle(rid, actual)
            spent["total"] += actual
            spent[user] += actual
        elif op[0] == "release" and held:
            rid = sorted(held)[op[1] % len(held)]
            held.pop(rid)
            assert b.release(rid)
        elif op[0] == "cancel" and tickets:
            t = sorted(tickets)[op[1] % len(tickets)]
            gone = b.cancel(t)
            assert gone is not None and gone.reason == CANCELLED
            tickets.pop(t)
        elif op[0] == "again" and n:
            rid = f"r{op[1] % n}"
            take(b.admit(rid, users[rid], None, prios[rid], op[2], queue=op[3]), users[rid], prios[rid])
        elif op[0] == "tick":
            clock.advance(op[1])
        elif op[0] == "adjust":
            _, user, delta = op
            delta = max(delta, -spent[user])  # a correction never takes back more than was booked
            b.adjust_spend(user, None, delta, clock())
            spent[user] += delta
            spent["total"] += delta
        for res in b.on_change():
            take(res, users[res.request_id], prios[res.request_id])
        reserved = sum(a for a, _, _ in held.values())
        assert spent["total"] + reserved <= 1.0 * cap + 1e-9
        for u in ("a", "b", "c"):
            mine = sum(a for a, usr, _ in held.values() if usr == u)
            assert spent[u] + mine <= 0.6 * cap + 1e-9
        if last["prio"] in ("normal", "bulk"):
            # a normal or bulk grant (critical ones are decided before it) leaves settled + reserved <= 100 %
            assert spent["total"] + reserved <= 1.0 + 1e-9
        last["prio"] = None
        assert b.spent("daily") == pytest.approx(spent["total"], abs=1e-9)
        assert b.waiting == len(tickets)
    # liveness: once everything in flight settles, every ticket is decided, none waits forever
    for _ in range(len(tickets) + 1):
        for rid in list(held):
            b.settle(rid, 0.0)
            held.pop(rid)
        for res in b.on_change():
            take(res, users[res.request_id], prios[res.request_id])
        if not held:
            break
    assert b.waiting == 0 and not tickets


# -- thresholds from expected spend, learned ratios -------------------------------------------------------------
def test_downgrade_follows_expected_spend_not_worst_case_reservations():
    b = book(daily_usd=1.0)
    for i in range(40):  # calls cost half their worst case
        assert b.admit(f"l{i}", None, None, "normal", 0.001, model=SONNET, route="auto").granted
        b.settle(f"l{i}", 0.0005)
    assert b.expected_ratio(SONNET, "auto") == pytest.approx(0.5, abs=0.03)
    settled = b.spent("daily")
    # settled 0.02 + 0.9 reserved = 92 % in worst cases, but 0.02 + 0.45 expected: normal
    r = b.admit("big", None, None, "normal", 0.9, model=SONNET, route="auto")
    assert r.granted and r.state == "normal" and r.reserved_usd == pytest.approx(0.9)
    assert r.expected_usd == pytest.approx(0.9 * b.expected_ratio(SONNET, "auto"))
    assert r.spent_usd == pytest.approx(settled + 0.9)
    assert b.state(None, None) == "normal"
    # spend that really arrives crosses the threshold
    b.settle("big", 0.8)
    assert b.state(None, None) == "downgrade"
    r2 = b.admit("next", None, None, "normal", 0.1, model=SONNET, route="auto")
    assert r2.granted and r2.state == "downgrade"


def test_before_anything_is_learned_the_expectation_is_the_worst_case():
    b = book(daily_usd=1.0)
    assert b.expected_ratio() == 1.0 and b.expected_ratio(SONNET, "auto") == 1.0
    r = b.admit("r", None, None, "normal", 0.85, model=SONNET)
    assert r.granted and r.state == "downgrade" and r.expected_usd == pytest.approx(0.85)


def test_ratios_are_clamped_learned_per_key_and_fall_back_to_all_calls():
    b = book(daily_usd=100.0, cost_ratio_floor=0.2, cost_ratio_alpha=0.1)
    for i in range(50):
        b.admit(f"h{i}", None, None, "normal", 1.0, model="haiku", route="r", max_tokens=100)
        b.settle(f"h{i}", 0.01, output_tokens=30)   # 1 % of the worst case: clamped to the floor
    assert b.expected_ratio("haiku", "r") == 0.2
    assert b.output_ratio("haiku", "r") == pytest.approx(0.3, abs=0.05)
    b.admit("o", None, None, "normal", 1.0, model="opus", route="r")
    b.settle("o", 3.0)  # more than the worst case: an overrun, counted and clamped to 1
    assert b.expected_ratio("opus", "r") <= 1.0
    # a zero-cost settle (a failed call) teaches nothing
    before = b.expected_ratio("haiku", "r"), b.snapshot()["ratios"]["haiku/r"]["samples"]
    b.admit("f", None, None, "normal", 1.0, model="haiku", route="r")
    b.settle("f", 0.0)
    assert (b.expected_ratio("haiku", "r"), b.snapshot()["ratios"]["haiku/r"]["samples"]) == before
    # an unseen key uses what all calls taught
    assert b.expected_ratio("sonnet", "x") == b.expected_ratio()
    snap = b.snapshot()
    assert snap["ratios"]["opus/r"]["overruns"] == 1 and snap["ratio_all"]["overruns"] == 1
    assert snap["ratio_all"]["samples"] == 51


def test_one_odd_first_sample_does_not_swing_a_new_key():
    b = book(daily_usd=100.0)
    b.admit("a", None, None, "normal", 1.0, model="m")
    b.settle("a", 0.1)
    assert b.expected_ratio("m") == pytest.approx(0.55)  # halfway from the prior (1) to the sample


# -- owners (duplicate request ids vs re-runs) ------------------------------------------------------------------
def test_holder_names_the_owner_and_owner_checks_protect_a_re_run():
    b = book(daily_usd=1.0)
    assert b.holder("r") is None
    b.admit("r", "u", None, "normal", 0.3, owner="caller-A/1")
    h = b.holder("r")
    assert (h.owner, h.amount_usd, h.queued, h.priority) == ("caller-A/1", 0.3, False, "normal")
    # caller A died; its re-run on caller B replaces the reservation
    assert b.admit("r", "u", None, "normal", 0.4, owner="caller-B/1").granted
    assert b.holder("r").owner == "caller-B/1" and b.reserved("daily") == pytest.approx(0.4)
    # a late release or settle from the dead owner does not free B's room; its spend is still booked
    assert b.release("r", owner="caller-A/1") is False
    assert b.settle("r", 0.1, owner="caller-A/1", user_id="u") is False
    assert b.reserved("daily") == pytest.approx(0.4) and b.spent("daily") == pytest.approx(0.1)
    assert b.spent("user:u:daily") == 0.0  # no per-user budget configured: nothing to book there
    assert b.settle("r", 0.2, owner="caller-B/1") is True
    assert b.holder("r") is None and b.spent("daily") == pytest.approx(0.3)
    # a waiting request is reported as waiting, with its ticket
    _fill(b, 0.7)
    q = b.admit("w", None, None, "normal", 0.2, owner="caller-C/2")
    h = b.holder("w")
    assert h.queued and h.ticket == q.ticket and h.owner == "caller-C/2" and b.ticket_of("w") == q.ticket


# -- corrections ------------------------------------------------------------------------------------------------
def test_adjust_spend_corrects_down_and_frees_room_for_waiting_tickets():
    b = book(daily_usd=1.0, per_user_daily_usd=1.0)
    b.admit("x", "u", None, "normal", 0.6)
    b.settle("x", 0.6)  # booked at its worst case, unreconciled
    _fill(b, 0.3)
    assert b.admit("q", "v", None, "normal", 0.3).queued
    assert b.on_change() == []
    b.adjust_spend("u", None, -0.35, T0)  # the real bill was lower
    assert b.spent("daily") == pytest.approx(0.25) and b.spent("user:u:daily") == pytest.approx(0.25)
    assert [r.request_id for r in b.on_change()] == ["q"]
    b.adjust_spend("u", None, -5.0, T0)
    assert b.spent("daily") == 0.0  # never negative
    b.adjust_spend("u", None, 0.1, T0)
    assert b.spent("daily") == pytest.approx(0.1)


# -- telling the user -------------------------------------------------------------------------------------------
def test_snapshot_shows_settled_reserved_expected_and_queued_per_budget():
    b = book(daily_usd=0.7, monthly_usd=10.0, per_user_daily_usd=0.5, downgrade_at=0.7)
    b.admit("s", "alice", None, "normal", 0.2, model=SONNET, route="auto")
    b.settle("s", 0.1)
    assert b.admit("f", "bob", None, "normal", 0.3, model=SONNET, route="auto").granted
    assert b.admit("g", "bob", None, "normal", 0.2, model=SONNET, route="auto").granted
    assert b.admit("q1", "carol", None, "critical", 0.3).queued
    assert b.admit("q2", "carol", None, "bulk", 0.2).queued
    snap = b.snapshot()
    ratio = b.expected_ratio(SONNET, "auto")
    assert ratio == pytest.approx(0.75)
    d = snap["budgets"]["daily"]
    assert d["limit_usd"] == 0.7 and d["settled_usd"] == pytest.approx(0.1)
    assert d["reserved_usd"] == pytest.approx(0.5) and d["expected_in_flight_usd"] == pytest.approx(0.5 * ratio)
    assert d["queued"] == 2 and d["queued_usd"] == pytest.approx(0.5)
    assert d["state"] == "normal" and d["period"] == "2026-11-05"  # (0.1 + 0.375) / 0.7 < 70 %
    assert snap["budgets"]["monthly"]["settled_usd"] == pytest.approx(0.1)
    assert snap["budgets"]["monthly"]["period"] == "2026-11"
    assert snap["budgets"]["user:alice:daily"]["settled_usd"] == pytest.approx(0.1)
    bob = snap["budgets"]["user:bob:daily"]
    assert bob["reserved_usd"] == pytest.approx(0.5) and bob["state"] == "downgrade"  # 0.375 / 0.5
    assert snap["budgets"]["user:carol:daily"]["queued"] == 2
    assert snap["in_flight"] == 2 and snap["queued"] == {"critical": 1, "normal": 0, "bulk": 1}
    assert snap["ratios"][f"{SONNET}/auto"]["samples"] == 1
    assert snap["ratio_all"]["cost_ratio"] == pytest.approx(0.75)
    json.dumps(snap)  # plain data
