"""The cluster's one rate limiter (a detached Ray actor) and the per-process client that batches into it.

One actor serves a few thousand calls a second, so callers never make one call per decision: each caller
process runs one ``LimiterClient`` that coalesces its concurrent ``acquire``\\ s into one ``acquire_many`` (a
lone request goes at once; while a batch is on the wire the next one fills) and sends reconciles in the
background. The actor never blocks: it answers ``Grant`` (possibly with a short send delay) or ``RetryAfter``,
and the waiting happens in the caller, holding nothing::

    handle = get_or_create_limiter(settings)
    client = LimiterClient(handle, max_wait_s=settings.limiter.max_wait_s)
    grant = await client.acquire(estimate, deadline_s=30)      # raises RateLimitedPastDeadline / InvalidRequest
    ...call the API...
    client.reconcile(Outcome(grant.lease_id, usage, status, headers, time.time()))

State is soft: after a restart the actor starts with full buckets and forgets leases (their reconciles are
then ignored); the first responses' ``remaining`` headers pull the levels back to the server's view.

The actor also hosts the cluster's prompt-cache ``PrefixTracker`` (runtime/prompt_cache.py): every request
with a tracked prefix asks it, so N callers with the same new prefix make one write. ``PrefixClient`` is its
per-process side (runtime/prefixes.py says how a claim waits). It is soft state too: after a restart every
prefix is cold again, which costs at most one write per prefix.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from runtime.admission import NOT_SENT, Admission, Estimate, Grant, Outcome, RetryAfter
from runtime.groupsubmit import GroupSubmitter
from runtime.leases import LeaseBook
from runtime.prefixes import PrefixAsk, PrefixReport, Waiting, decide_many, report_many
from runtime.prompt_cache import Decision, PrefixTracker
from runtime.errors import InvalidRequest, RateLimitedPastDeadline
from runtime.settings import ClassLimits, LimiterSettings, UserLimits

NAMESPACE = "claude_runtime"
ACTOR_NAME = "limiter"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LimiterActor:
    def __init__(self, limits: dict[str, ClassLimits], user_limits: dict[str, UserLimits] | UserLimits,
                 limiter: LimiterSettings, lease_timeout_s: float = 600.0,
                 groups: dict[str, dict[str, ClassLimits]] | None = None,
                 group_weights: dict[str, float] | None = None, settings: Any = None) -> None:
        self._adm = Admission(limits, user_limits, limiter, lease_timeout_s=lease_timeout_s, groups=groups,
                              group_weights=group_weights)
        if settings is None:
            from runtime.settings import Settings

            settings = Settings()
        self._prefixes = PrefixTracker(settings)

    # -- prompt-cache prefixes (runtime/prefixes.py) ----------------------------------------------------------
    def prefix_begin_many(self, asks: list[PrefixAsk]) -> list[Decision]:
        return decide_many(self._prefixes, asks, time.monotonic())

    def prefix_report_many(self, reports: list[PrefixReport]) -> list[bool]:
        return report_many(self._prefixes, reports, time.monotonic())

    def prefix_stats(self) -> dict[str, Any]:
        return {"prefixes": len(self._prefixes), **self._prefixes.stats}

    def acquire_many(self, estimates: list[Estimate]) -> list[Grant | RetryAfter]:
        return self._adm.acquire_many(estimates)

    def acquire(self, estimate: Estimate) -> Grant | RetryAfter:
        """One decision per call: the slow path, kept for comparison and for one-off tools."""
        return self._adm.acquire(estimate)

    def reconcile_many(self, outcomes: list[Outcome]) -> None:
        self._adm.reconcile_many(outcomes)

    def lease_many(self, requests: list) -> list:
        return self._adm.lease_many(requests)

    def return_many(self, returns: list) -> None:
        self._adm.return_many(returns)

    def report(self, group: str, model_class: str, status: int, headers: dict, received_at: float) -> None:
        self._adm.report(group, model_class, status, headers, received_at)

    def snapshot(self) -> dict[str, Any]:
        return self._adm.snapshot()

    def set_limits(self, limits: dict[str, ClassLimits] | None = None,
                   user_limits: dict[str, UserLimits] | UserLimits | None = None,
                   limiter: LimiterSettings | None = None, groups: dict[str, dict[str, ClassLimits]] | None = None,
                   group_weights: dict[str, float] | None = None) -> None:
        self._adm.set_limits(limits, user_limits, limiter, groups, group_weights)

    def ping(self) -> bool:
        return True


def get_or_create_limiter(settings: Any, *, name: str = ACTOR_NAME, namespace: str = NAMESPACE,
                          lease_timeout_s: float = 600.0, scheduling_strategy: Any = None,
                          groups: dict[str, dict[str, ClassLimits]] | None = None,
                          group_weights: dict[str, float] | None = None) -> "ray.actor.ActorHandle":
    """The cluster's limiter singleton; racing creators all get the same actor.

    ``settings`` is a ``runtime.Settings`` (its limits, user_limits and limiter sections are used); ``groups``
    the upstreams' limit groups (runtime/upstreams.py). The arguments only matter to whoever creates it;
    change live limits with ``set_limits``.
    """
    return LimiterActor.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        scheduling_strategy=scheduling_strategy,
    ).remote(dict(settings.limits), dict(settings.user_limits), settings.limiter, lease_timeout_s, groups,
             group_weights, settings.without_secrets() if hasattr(settings, "without_secrets") else None)


class LimiterClient:
    """One per caller process: batched admission and background reconciles over the limiter actor.

    Grants are never lost: a waiter that gives up (deadline, cancellation) before its batch is sent is dropped
    from the batch; one that gives up after the send, or during a grant's scheduled delay, has its grant
    handed back as ``NOT_SENT`` (everything refunded, the request slot included)."""

    def __init__(self, actor_handle: Any, max_wait_s: float = 120.0, batch_window_s: float = 0.001, *,
                 reconcile_window_s: float = 0.02, max_batch: int = 2_000, max_inflight_batches: int = 4,
                 unavailable_retry_s: float = 0.2, leases: bool = False, caller: str = "caller",
                 lease_term_s: float = 2.0, capped: Any = None) -> None:
        self._actor = actor_handle
        self.max_wait_s = max_wait_s
        self._unavailable_retry_s = unavailable_retry_s
        # capacity leases: most admissions happen here, on a slice of the buckets (runtime/leases.py)
        self.book = LeaseBook(caller=caller, term_s=lease_term_s) if leases else None
        self._capped = capped or (lambda e: False)  # requests under per-user caps always ask the limiter
        self._refresher: asyncio.Task | None = None
        self._lease_loop: asyncio.AbstractEventLoop | None = None
        # requests arriving in the same loop tick share a call; the window is only waited while earlier
        # batches are on the wire, so a lone request pays no added latency
        self._acquires: GroupSubmitter[Estimate, Grant | RetryAfter] = GroupSubmitter(
            self._send_acquires, max_batch=max_batch, max_inflight=max_inflight_batches,
            busy_linger_s=batch_window_s, on_orphan=self._refund_orphan, name="limiter-acquire")
        self._reconciles: GroupSubmitter[Outcome, None] = GroupSubmitter(
            self._send_outcomes, max_batch=max_batch, max_inflight=1, linger_s=reconcile_window_s,
            on_error=lambda exc, items: None,  # the actor restarted: its leases are gone, nothing to settle
            name="limiter-reconcile")
        self.stats = {"acquire_calls": 0, "decisions": 0, "retries": 0, "reconcile_calls": 0, "orphans": 0}

    # -- admission ----------------------------------------------------------------------------------------
    async def acquire(self, e: Estimate, deadline_s: float | None = None) -> Grant:
        """Wait for a grant. ``deadline_s``: seconds from now (capped at ``max_wait_s``; None = max_wait_s).

        Raises RateLimitedPastDeadline when no grant can come in time and InvalidRequest when the request can
        never fit the limits.
        """
        budget = self.max_wait_s if deadline_s is None else min(max(0.0, deadline_s), self.max_wait_s)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + budget
        if self.book is not None and not self._capped(e):
            local = self.book.try_admit(e)
            self._ensure_refresher()
            if local is not None:
                return local
        while True:
            left = give_up_at - loop.time()
            try:
                # the deadline holds while waiting for the actor too (a slow or restarting limiter)
                decision = await self._acquires.submit(e, timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                raise RateLimitedPastDeadline(f"no admission within {budget:.3g}s (limiter did not answer)",
                                              request_id=e.request_id, reason="limiter unavailable",
                                              retry_after_s=None) from None
            except RayTaskError:
                raise
            except RayError:
                # actor restarting or unreachable: like a short RetryAfter, bounded by the same deadline
                decision = RetryAfter(e.request_id, self._unavailable_retry_s, "limiter unavailable")
            if isinstance(decision, Grant):
                if decision.delay_s > give_up_at - loop.time():
                    # scheduled past the caller's deadline: the capacity goes back, the caller hears at once
                    self.give_back(decision)
                    raise RateLimitedPastDeadline(
                        f"no admission within {budget:.3g}s (granted for {decision.delay_s:.3g}s from now)",
                        request_id=e.request_id, reason="scheduled past the deadline",
                        retry_after_s=decision.delay_s)
                if decision.delay_s > 0.0:
                    try:
                        await asyncio.sleep(decision.delay_s)
                    except BaseException:
                        # cancelled while waiting for its send time: the capacity was taken, give it back
                        self.give_back(decision)
                        raise
                return decision
            if math.isinf(decision.seconds):
                raise InvalidRequest(f"request can never fit the rate limits: {decision.reason}",
                                     request_id=e.request_id, field="max_tokens")
            # jitter spreads the waiters that were refused together, so they do not all return at once
            pause = decision.seconds * (1.0 + 0.05 * random.random()) + 0.002 * random.random()
            left = give_up_at - loop.time()
            if pause > left:
                raise RateLimitedPastDeadline(
                    f"no admission within {budget:.3g}s ({decision.reason} needs {decision.seconds:.3g}s more)",
                    request_id=e.request_id, reason=decision.reason, retry_after_s=decision.seconds)
            self.stats["retries"] += 1
            await asyncio.sleep(pause)

    def try_acquire(self, e: Estimate) -> Grant | None:
        """A grant from this caller's leases now (no wait, no round trip), or None: ``acquire`` then. For an
        admission made before it is known whether the request will go out (the pipeline admits while the
        cache looks up): ``e`` counts toward the demand that sizes leases only once ``admitted(e)`` says it
        goes; one that does not goes back through ``give_back``."""
        if self.book is None or self._capped(e):
            return None
        grant = self.book.try_admit(e, note=False)
        self._ensure_refresher()
        return grant

    def admitted(self, e: Estimate) -> None:
        """``e``'s early grant (``try_acquire``) is used: count it in the demand, as ``acquire`` would have."""
        if self.book is not None:
            self.book.note(e)

    async def _send_acquires(self, batch: list[Estimate]) -> list[Grant | RetryAfter]:
        self.stats["acquire_calls"] += 1
        self.stats["decisions"] += len(batch)
        return await self._actor.acquire_many.remote(batch)

    def _refund_orphan(self, e: Estimate, decision: Grant | RetryAfter) -> None:
        if isinstance(decision, Grant):
            self.stats["orphans"] += 1
            self.give_back(decision)

    def give_back(self, grant: Grant) -> None:
        """A grant whose request will not be sent: everything comes back."""
        self.reconcile(Outcome(grant.lease_id, None, NOT_SENT, {}, time.time()))

    # -- leases -------------------------------------------------------------------------------------------
    def _ensure_refresher(self) -> None:
        loop = asyncio.get_running_loop()
        if self._refresher is None or self._refresher.done() or self._lease_loop is not loop:
            self._lease_loop = loop
            self._refresher = loop.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        # asks for leases where demand shows and hands back expired ones; quiet when there is no demand
        idle = 0
        while idle < 50:
            try:
                busy = await self.refresh()
            except Exception:  # noqa: BLE001 - the limiter restarting: ask again on the next round
                busy = True
            idle = 0 if busy else idle + 1
            await asyncio.sleep(self.book.term_s * self.book.renew_at / 4)
        await self.refresh(close=True)

    async def refresh(self, close: bool = False) -> bool:
        """One round: new leases for current demand, expired ones back. Returns whether anything happened."""
        book = self.book
        asks = [] if close else book.demand()
        dues = book.due(all_now=close)
        if dues:
            await self._actor.return_many.remote(dues)
        if asks:
            try:
                got = await self._actor.lease_many.remote(asks)
            except Exception:
                for a in asks:
                    book.add(None, a)
                raise
            for a, lease in zip(asks, got):
                book.add(lease, a)
        return bool(asks or dues or book.snapshot().keys() - {"stats"})

    # -- reconcile ----------------------------------------------------------------------------------------
    def reconcile(self, o: Outcome) -> None:
        """Queue an outcome; sent with others in the background. Never blocks."""
        if self.book is not None and LeaseBook.owns(o.lease_id):
            inf = self.book._inflight.get(o.lease_id)
            self.book.settle(o.lease_id, o.usage, o.status, o.headers, o.received_at)
            if o.status == 429 and inf is not None:  # the limiter must pause this class at once
                self._actor.report.remote(inf.key[0], inf.key[1], o.status, o.headers, o.received_at)
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # no loop (sync code): send it on its own, fire and forget
            self._actor.reconcile_many.remote([o])
            self.stats["reconcile_calls"] += 1
            return
        self._reconciles.submit_nowait(o)

    async def _send_outcomes(self, batch: list[Outcome]) -> list[None]:
        self.stats["reconcile_calls"] += 1
        await self._actor.reconcile_many.remote(batch)
        return [None] * len(batch)

    async def flush(self) -> None:
        """Send queued reconciles (and hand back every lease) now and wait until the actor has applied them."""
        await self._acquires.flush()
        await self._reconciles.flush()
        if self.book is not None:
            await self.refresh(close=True)


class PrefixClient(Waiting):
    """One per caller process: prompt-cache claims and reports against the limiter actor's tracker, batched
    like the limiter's own calls. A waiter here is woken at once when a report from this process ends the
    write it waits for; a write ending elsewhere is seen at its next re-ask (every ``poll_s``)."""

    def __init__(self, actor_handle: Any, settings: Any, *, max_batch: int = 2_000) -> None:
        super().__init__(settings.prompt_cache.wait_poll_s)
        self._actor = actor_handle
        self._asks: GroupSubmitter[PrefixAsk, Decision] = GroupSubmitter(
            self._send_asks, max_batch=max_batch, max_inflight=4, name="prefix-begin")
        self._reports: GroupSubmitter[PrefixReport, bool] = GroupSubmitter(
            self._send_reports, max_batch=max_batch, max_inflight=2,
            on_error=lambda exc, items: None,  # the actor restarted: its claims are gone, nothing to end
            name="prefix-report")
        self.stats.update(ask_calls=0, report_calls=0, unavailable=0)

    async def _ask(self, ask: PrefixAsk) -> Decision:
        timeout = None if ask.deadline_in_s is None else max(ask.deadline_in_s, 0.001)
        try:
            return await self._asks.submit(ask, timeout=timeout)
        except RayTaskError:
            raise
        except (RayError, asyncio.TimeoutError):
            # the limiter is restarting or slow: send without waiting for anyone (a possible second write,
            # never a stall past the request's deadline)
            self.stats["unavailable"] += 1
            return Decision("pass", "5m", reason="tracker-unavailable")

    async def _send_asks(self, batch: list[PrefixAsk]) -> list[Decision]:
        self.stats["ask_calls"] += 1
        return await self._actor.prefix_begin_many.remote(batch)

    def _report(self, r: PrefixReport) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._actor.prefix_report_many.remote([r])
            return
        self._reports.submit_nowait(r)

    async def _send_reports(self, batch: list[PrefixReport]) -> list[bool]:
        self.stats["report_calls"] += 1
        ended = await self._actor.prefix_report_many.remote(batch)
        for r, e in zip(batch, ended):
            if e:
                self._wake(r.prefix, r.model)
        return ended

    async def flush(self) -> None:
        await self._asks.flush()
        await self._reports.flush()
