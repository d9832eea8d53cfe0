"""The limiter actor and its client on a real single-node Ray: shared singleton, cluster-wide enforcement."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import pytest
import ray
from ray import cloudpickle

from actors.limiter import NAMESPACE, LimiterClient, get_or_create_limiter
from runtime.admission import Estimate, Grant, Outcome
from runtime.errors import InvalidRequest, RateLimitedPastDeadline
from runtime.settings import ClassLimits, LimiterSettings, Settings, UserLimits
from runtime.usage import Usage

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    # workers cannot import this test module by name: ship its classes by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def settings(rpm=60, itpm=1_000_000, otpm=1_000_000, users=UserLimits(rpm=0, tpm=0)):
    return Settings(limits={c: ClassLimits(rpm=rpm, itpm=itpm, otpm=otpm)
                            for c in ("haiku", "sonnet", "opus", "fable")},
                    user_limits=users, limiter=LimiterSettings(safety_margin=0.0))


def unique_name() -> str:
    return f"limiter-test-{uuid.uuid4().hex[:8]}"


def est(i, prio="critical", inp=100, out=100, user=None):
    return Estimate(f"r{i}", "sonnet", user, prio, inp, out)


@ray.remote(num_cpus=0)
class Hammer:
    """A caller process: many coroutines acquiring through one LimiterClient."""

    def __init__(self, name: str) -> None:
        self.client = LimiterClient(ray.get_actor(name, namespace=NAMESPACE), max_wait_s=30)

    async def run(self, coroutines: int, until: float) -> list[float]:
        stamps: list[float] = []

        async def worker(k: int) -> None:
            i = 0
            while time.time() < until:
                i += 1
                try:
                    await self.client.acquire(est(f"{k}-{i}"), deadline_s=max(0.0, until - time.time()))
                except RateLimitedPastDeadline:
                    return
                stamps.append(time.time())

        await asyncio.gather(*(worker(k) for k in range(coroutines)))
        return stamps


def test_singleton_is_shared(ray_local):
    name = unique_name()
    a = get_or_create_limiter(settings(), name=name)
    b = get_or_create_limiter(settings(rpm=1), name=name)  # the second creator's arguments are ignored
    assert a._actor_id == b._actor_id

    @ray.remote(num_cpus=0)
    def from_a_task(n):
        return get_or_create_limiter(settings(rpm=2), name=n)._actor_id.hex()

    assert ray.get(from_a_task.remote(name)) == a._actor_id.hex()
    assert ray.get(a.snapshot.remote())["classes"]["sonnet"]["rpm"]["limit"] == 60


def test_default_singleton_is_named_and_detached(ray_local):
    h = get_or_create_limiter(settings())
    assert ray.get_actor("limiter", namespace="claude_runtime")._actor_id == h._actor_id
    ray.kill(h)


async def test_many_callers_never_exceed_the_limit(ray_local):
    name = unique_name()
    rpm = 30  # a full bucket of 30, then one every 2 s
    handle = get_or_create_limiter(settings(rpm=rpm), name=name)
    await handle.ping.remote()
    hammers = [Hammer.remote(name) for _ in range(3)]
    await asyncio.gather(*(h.__ray_ready__.remote() for h in hammers))
    start = time.time()
    duration = 5.0
    per = await asyncio.gather(*(h.run.remote(15, start + duration) for h in hammers))
    stamps = sorted(t for s in per for t in s)
    cap, rate = float(rpm), rpm / 60.0
    # the buckets' bound over the whole run, with all three processes competing
    assert len(stamps) <= cap + rate * (time.time() - start) + 1e-9
    assert len(stamps) >= cap  # the burst was used: limiting, not starving
    # and over every window (a reply's transit can make two grants look closer than they were: one of slack)
    for i in range(len(stamps)):
        for j in range(i, len(stamps)):
            assert j - i + 1 <= cap + rate * (stamps[j] - stamps[i]) + 1
    snap = await handle.snapshot.remote()
    assert snap["stats"]["granted"] == len(stamps)
    assert snap["stats"]["refused"] > 0
    for h in hammers:
        ray.kill(h)


async def test_retry_after_waits_then_succeeds(ray_local):
    handle = get_or_create_limiter(settings(rpm=60), name=unique_name())
    client = LimiterClient(handle, max_wait_s=10)
    # the bucket refills from its first grant on, so the late grant is a second after that at the earliest;
    # timed from the end of the burst, a burst slowed by a busy machine (0.5 s) left less than a second to wait
    t0 = time.monotonic()
    grants = await asyncio.gather(*(client.acquire(est(i)) for i in range(60)))
    assert all(isinstance(g, Grant) for g in grants)
    assert client.stats["acquire_calls"] < 10  # 60 concurrent acquires were coalesced
    g = await client.acquire(est("late"))
    assert isinstance(g, Grant)
    assert time.monotonic() - t0 >= 0.9  # one request's refill at 1/s
    assert client.stats["retries"] >= 1


async def test_past_deadline_and_impossible_requests_raise(ray_local):
    handle = get_or_create_limiter(settings(rpm=6, otpm=1_000), name=unique_name())
    client = LimiterClient(handle, max_wait_s=60)
    await asyncio.gather(*(client.acquire(est(i)) for i in range(6)))
    t0 = time.monotonic()
    with pytest.raises(RateLimitedPastDeadline) as err:
        await client.acquire(est("x"), deadline_s=0.5)  # the next slot is ~10 s away: fail now, not later
    assert err.value.request_id == "rx"
    assert time.monotonic() - t0 < 5
    with pytest.raises(InvalidRequest):
        await client.acquire(est("big", out=5_000))


async def test_a_grant_scheduled_past_the_deadline_is_given_back_and_refused_at_once(ray_local):
    # 60 RPM and the default schedule-ahead: once the bucket is empty the next slot frees within a second and
    # is granted with a send-at delay; a caller with 50 ms left must hear no at once, and the slot stays free
    handle = get_or_create_limiter(settings(rpm=60).model_copy(update={"limiter": LimiterSettings()}),
                                   name=unique_name())
    client = LimiterClient(handle, max_wait_s=60)
    level = lambda snap: snap["classes"]["sonnet"]["rpm"]["level"]  # noqa: E731
    while level(await handle.snapshot.remote()) >= 1.0:
        await client.acquire(est(f"fill-{time.monotonic_ns()}"))
    t0 = time.monotonic()
    with pytest.raises(RateLimitedPastDeadline) as err:
        await client.acquire(est("late"), deadline_s=0.05)
    assert time.monotonic() - t0 < 0.5 and err.value.request_id == "rlate"
    # the refused grant's slot went back: the next patient caller is granted within about one refill
    t1 = time.monotonic()
    await client.acquire(est("patient"))
    assert time.monotonic() - t1 < 1.5


async def test_reconcile_through_client_returns_capacity(ray_local):
    handle = get_or_create_limiter(settings(otpm=10_000, users=UserLimits(rpm=100, tpm=100_000)),
                                   name=unique_name())
    client = LimiterClient(handle, max_wait_s=5)
    grants = await asyncio.gather(*(client.acquire(est(i, out=1_000, user="u")) for i in range(5)))
    snap = await handle.snapshot.remote()
    assert snap["classes"]["sonnet"]["otpm"]["level"] == pytest.approx(5_000, abs=50)
    for g in grants:
        client.reconcile(Outcome(g.lease_id, Usage(input_tokens=100, output_tokens=100), 200, {}, time.time()))
        client.reconcile(Outcome(g.lease_id, Usage(input_tokens=100, output_tokens=100), 200, {}, time.time()))
    await client.flush()
    snap = await handle.snapshot.remote()
    assert snap["leases"] == 0
    assert snap["stats"]["ignored_outcomes"] == 5  # duplicates counted once
    assert snap["classes"]["sonnet"]["otpm"]["level"] == pytest.approx(9_500, abs=50)


async def test_set_limits_and_header_learning_via_actor(ray_local):
    handle = get_or_create_limiter(settings(rpm=600), name=unique_name())
    client = LimiterClient(handle, max_wait_s=5)
    g = await client.acquire(est(1))
    # the server says the key's limit is lower than configured (shared with another service): adopted
    client.reconcile(Outcome(g.lease_id, Usage(100, 100), 200, {"anthropic-ratelimit-requests-limit": "300"},
                             time.time()))
    await client.flush()
    assert (await handle.snapshot.remote())["classes"]["sonnet"]["rpm"]["limit"] == 300
    await handle.set_limits.remote({"sonnet": ClassLimits(rpm=5, itpm=1_000, otpm=1_000)})
    snap = await handle.snapshot.remote()
    assert snap["classes"]["sonnet"]["rpm"]["capacity"] == 5


async def test_cancelled_waiters_leave_no_lease_behind(ray_local):
    handle = get_or_create_limiter(settings(rpm=100_000), name=unique_name())
    client = LimiterClient(handle, max_wait_s=5)
    tasks = [asyncio.ensure_future(client.acquire(est(i, out=1_000))) for i in range(200)]
    # cancel some before their batch is sent and some while it is on the wire
    for k, t in enumerate(tasks):
        if k % 3 == 0:
            t.cancel()
        if k % 50 == 0:
            await asyncio.sleep(0.001)
    done = await asyncio.gather(*tasks, return_exceptions=True)
    held = [g for g in done if isinstance(g, Grant)]
    assert 0 < len(held) < 200
    for g in held:
        client.reconcile(Outcome(g.lease_id, Usage(100, 1_000), 200, {}, time.time()))
    await client.flush()  # answers to cancelled waiters (refunded on arrival) and every reconcile are applied
    snap = await handle.snapshot.remote()
    assert snap["leases"] == 0
    # every grant was settled: by its waiter, or refunded because nobody was waiting for it any more
    assert snap["stats"]["granted"] == snap["stats"]["reconciled"] >= len(held)
    assert snap["stats"]["ignored_outcomes"] == 0


@ray.remote(num_cpus=0)
class _Stalled:
    """A limiter that takes its time answering (a restart, an overloaded head node)."""

    async def acquire_many(self, estimates):
        await asyncio.sleep(3600)

    def reconcile_many(self, outcomes):
        return None


async def test_the_deadline_holds_while_the_limiter_does_not_answer(ray_local):
    client = LimiterClient(_Stalled.remote(), max_wait_s=30)
    t0 = time.monotonic()
    with pytest.raises(RateLimitedPastDeadline):
        await client.acquire(est(1), deadline_s=0.3)
    assert time.monotonic() - t0 < 5


async def test_a_grant_cancelled_while_waiting_for_its_send_time_is_given_back(ray_local):
    # schedule-ahead grants carry a send delay; cancel the waiter during it
    s = Settings(limits={c: ClassLimits(rpm=60, itpm=1_000_000, otpm=1_000_000)
                         for c in ("haiku", "sonnet", "opus", "fable")},
                 user_limits=UserLimits(rpm=0, tpm=0),
                 limiter=LimiterSettings(safety_margin=0.05, schedule_ahead_s=3.0, critical_reserve=0.0))
    handle = get_or_create_limiter(s, name=unique_name())
    client = LimiterClient(handle, max_wait_s=30)
    grants = [await client.acquire(est(i)) for i in range(57)]  # the whole bucket (60 less the margin)
    assert all(g.delay_s == 0 for g in grants)
    late = asyncio.ensure_future(client.acquire(est(99)))
    deadline = time.monotonic() + 30
    while (await handle.snapshot.remote())["leases"] < 58:  # granted, and now sleeping until its send time
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not late.done()
    late.cancel()
    for g in grants:
        client.reconcile(Outcome(g.lease_id, Usage(100, 100), 200, {}, time.time()))
    await client.flush()
    snap = await handle.snapshot.remote()
    assert snap["leases"] == 0 and snap["stats"]["reconciled"] == 58
