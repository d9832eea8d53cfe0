"""Capacity leases: what a caller admits on its own never lets the account's buckets overflow.

The server's view is the judge: every request a caller sends (per request, on a lease or not) is counted at its
send time with what it reserved, given back when its outcome shows less was used; in no window may that exceed
the bucket's capacity plus its refill."""

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from runtime.admission import NOT_SENT, Admission, Estimate, Grant, Outcome
from runtime.buckets import ManualClock
from runtime.leases import CapacityLease, LeaseBook, LeaseRequest
from runtime.settings import ClassLimits, LimiterSettings, UserLimits
from runtime.usage import Usage

CAP = {"rpm": 30.0, "itpm": 3_000.0, "otpm": 1_500.0}


def make(term=2.0, margin=0.05, horizon=0.5, floors=(0.1, 0.2), share=0.5):
    clock = ManualClock()
    adm = Admission({"sonnet": ClassLimits(rpm=30, itpm=3_000, otpm=1_500)}, UserLimits(),
                    LimiterSettings(safety_margin=margin, schedule_ahead_s=horizon, lease_term_s=term,
                                    critical_reserve=floors[0], bulk_headroom=floors[1], lease_share=share),
                    clock=clock)
    return adm, LeaseBook(clock=clock, term_s=term), clock


def est(i, inp=50, out=40, prio="critical"):
    return Estimate(f"r{i}", "sonnet", None, prio, inp, out)


def test_a_lease_admits_locally_and_its_unused_part_comes_back():
    adm, book, clock = make()
    for i in range(4):  # demand shows up as requests the book could not admit
        assert book.try_admit(est(i)) is None
    (ask,) = book.demand()
    lease = adm.lease(ask)
    assert isinstance(lease, CapacityLease) and lease.requests >= 1
    book.add(lease, ask)
    before = adm.snapshot()["classes"]["sonnet"]["itpm"]["level"]
    g = book.try_admit(est(9))
    assert isinstance(g, Grant) and LeaseBook.owns(g.lease_id)
    assert adm.snapshot()["classes"]["sonnet"]["itpm"]["level"] == before  # no limiter call
    book.settle(g.lease_id, Usage(30, 10), 200)
    clock.advance(10)
    adm.return_many(book.due())
    assert adm.snapshot()["stats"]["leases_returned"] == 1


def test_near_the_limit_no_lease_is_granted():
    adm, book, clock = make()
    while not isinstance(adm.acquire(est(0, inp=0, out=0, prio="critical")), type(None)):
        snap = adm.snapshot()["classes"]["sonnet"]["rpm"]["level"]
        if snap < 0.3 * 30:
            break
    assert adm.lease(LeaseRequest("c", "default", "sonnet", 5, 100, 100)) is None


ops = st.lists(st.tuples(
    st.floats(0, 1.5, allow_nan=False),
    st.sampled_from(["slow", "lease", "local", "local", "local", "settle", "settle", "return"]),
    st.integers(1, 400), st.integers(1, 300), st.integers(1, 8), st.floats(0, 1, allow_nan=False),
    st.sampled_from([200, 200, 200, 429, NOT_SENT])), min_size=1, max_size=120)


@pytest.mark.parametrize("term", [0.5, 2.0])
@hsettings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_sends_on_leases_and_grants_never_overflow_the_buckets(term, ops):
    # the harshest setting: no priority floors, a lease may take all spare capacity, the smallest margin the
    # scheduling horizon allows, and critical requests (no floor) on the slow path
    adm, book, clock = make(term=term, margin=0.5 / 60, horizon=0.5, floors=(0.0, 0.0), share=1.0)
    events: dict[str, list[tuple[float, float]]] = defaultdict(list)
    open_: list[tuple[Grant, float, int, int]] = []
    i = 0
    for dt, op, inp, out, n, frac, status in ops:
        clock.advance(dt)
        now = clock()
        i += 1
        if op == "slow":
            g = adm.acquire(est(i, inp, out))
            if isinstance(g, Grant):
                send = now + g.delay_s
                open_.append((g, send, inp, out))
                for name, v in (("rpm", 1), ("itpm", inp), ("otpm", out)):
                    events[name].append((send, v))
        elif op == "lease":
            book.add(adm.lease(LeaseRequest("c", "default", "sonnet", n, n * inp, n * out)))
        elif op == "local":
            g = book.try_admit(est(i, inp, out))
            if isinstance(g, Grant):
                open_.append((g, now, inp, out))
                for name, v in (("rpm", 1), ("itpm", inp), ("otpm", out)):
                    events[name].append((now, v))
        elif op == "settle" and open_:
            g, send, gin, gout = open_.pop(0)
            if send > now:
                clock.advance(send - now)
                now = clock()
            if status == 200:
                used_in, used_out = int(gin * frac), int(gout * frac)
                o = Outcome(g.lease_id, Usage(used_in, used_out), 200, {}, now)
                give = (gin - used_in, gout - used_out, 0)
            elif status == 429:
                o = Outcome(g.lease_id, None, 429, {}, now)
                give = (gin, gout, 0)
            else:
                o = Outcome(g.lease_id, None, NOT_SENT, {}, now)
                give = (gin, gout, 1)
            if LeaseBook.owns(g.lease_id):
                book.settle(g.lease_id, o.usage, o.status)
            else:
                adm.reconcile(o)
            events["itpm"].append((now, -give[0]))
            events["otpm"].append((now, -give[1]))
            events["rpm"].append((now, -give[2]))
        elif op == "return":
            adm.return_many(book.due(all_now=dt > 1.0))
    check(events)


def check(events: dict[str, list[tuple[float, float]]]) -> None:
    for name, evs in events.items():
        evs.sort(key=lambda e: e[0])
        cap, rate = CAP[name], CAP[name] / 60.0
        for k, (t0, _) in enumerate(evs):
            total = 0.0
            for t1, amount in evs[k:]:
                total += amount
                assert total <= cap + rate * (t1 - t0) + 1e-6, (name, t0, t1, total)


def test_a_lease_used_at_the_end_of_its_term_cannot_stack_on_refill_it_already_counted():
    # a lease taken from a full bucket and used at the end of its term: had the bucket counted the refill the
    # server loses to its cap meanwhile, the requests granted on that refill would land together with the
    # lease's and overflow the bucket
    adm, book, clock = make(term=2.0, margin=0.5 / 60, horizon=0.5, floors=(0.0, 0.0), share=1.0)
    events: dict[str, list[tuple[float, float]]] = defaultdict(list)
    book.add(adm.lease(LeaseRequest("c", "default", "sonnet", 1, 10, 40)))
    clock.advance(1.6)  # our bucket is full again (the lease's 40 refilled)
    g = adm.acquire(est(0, 1, 1_480))  # a big request on that refill
    if isinstance(g, Grant):
        events["otpm"].append((clock() + g.delay_s, 1_480))
    clock.advance(0.39)
    g = book.try_admit(est(99, 1, 40))
    assert isinstance(g, Grant)
    events["otpm"].append((clock(), 40))
    check(events)
