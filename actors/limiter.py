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
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from runtime.admission import Admission, Estimate, Grant, Outcome, RetryAfter
from runtime.errors import InvalidRequest, RateLimitedPastDeadline
from runtime.settings import ClassLimits, LimiterSettings, UserLimits

NAMESPACE = "claude_runtime"
ACTOR_NAME = "limiter"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LimiterActor:
    def __init__(self, limits: dict[str, ClassLimits], user_limits: UserLimits, limiter: LimiterSettings,
                 lease_timeout_s: float = 600.0) -> None:
        self._adm = Admission(limits, user_limits, limiter, lease_timeout_s=lease_timeout_s)

    def acquire_many(self, estimates: list[Estimate]) -> list[Grant | RetryAfter]:
        return self._adm.acquire_many(estimates)

    def acquire(self, estimate: Estimate) -> Grant | RetryAfter:
        """One decision per call: the slow path, kept for comparison and for one-off tools."""
        return self._adm.acquire(estimate)

    def reconcile_many(self, outcomes: list[Outcome]) -> None:
        self._adm.reconcile_many(outcomes)

    def snapshot(self) -> dict[str, Any]:
        return self._adm.snapshot()

    def set_limits(self, limits: dict[str, ClassLimits] | None = None, user_limits: UserLimits | None = None,
                   limiter: LimiterSettings | None = None) -> None:
        self._adm.set_limits(limits, user_limits, limiter)

    def ping(self) -> bool:
        return True


def get_or_create_limiter(settings: Any, *, name: str = ACTOR_NAME, namespace: str = NAMESPACE,
                          lease_timeout_s: float = 600.0, scheduling_strategy: Any = None
                          ) -> "ray.actor.ActorHandle":
    """The cluster's limiter singleton; racing creators all get the same actor.

    ``settings`` is a ``runtime.Settings`` (its limits, user_limits and limiter sections are used). The
    arguments only matter to whoever creates it; change live limits with ``set_limits``.
    """
    return LimiterActor.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        scheduling_strategy=scheduling_strategy,
    ).remote(dict(settings.limits), settings.user_limits, settings.limiter, lease_timeout_s)


class LimiterClient:
    """One per caller process: batched admission and background reconciles over the limiter actor."""

    def __init__(self, actor_handle: Any, max_wait_s: float = 120.0, batch_window_s: float = 0.001, *,
                 reconcile_window_s: float = 0.02, max_batch: int = 2_000, max_inflight_batches: int = 4,
                 unavailable_retry_s: float = 0.2) -> None:
        self._actor = actor_handle
        self.max_wait_s = max_wait_s
        self.batch_window_s = batch_window_s
        self.reconcile_window_s = reconcile_window_s
        self.max_batch = max_batch
        self._max_inflight = max_inflight_batches
        self._unavailable_retry_s = unavailable_retry_s
        # asyncio objects are made on first use, inside the loop that will run them
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[Estimate, asyncio.Future]] = []
        self._acq_task: asyncio.Task | None = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight = 0
        self._outcomes: list[Outcome] = []
        self._rec_task: asyncio.Task | None = None
        self._rec_inflight: set[Any] = set()
        self.stats = {"acquire_calls": 0, "decisions": 0, "retries": 0, "reconcile_calls": 0}

    # -- admission ----------------------------------------------------------------------------------------
    async def acquire(self, e: Estimate, deadline_s: float | None = None) -> Grant:
        """Wait for a grant. ``deadline_s``: seconds from now (capped at ``max_wait_s``; None = max_wait_s).

        Raises RateLimitedPastDeadline when no grant can come in time and InvalidRequest when the request can
        never fit the limits.
        """
        budget = self.max_wait_s if deadline_s is None else min(deadline_s, self.max_wait_s)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + max(0.0, budget)
        while True:
            try:
                decision = await self._decide(e)
            except RayTaskError:
                raise
            except RayError:
                # actor restarting or unreachable: like a short RetryAfter, bounded by the same deadline
                decision = RetryAfter(e.request_id, self._unavailable_retry_s, "limiter unavailable")
            if isinstance(decision, Grant):
                if decision.delay_s > 0.0:
                    await asyncio.sleep(decision.delay_s)
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

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._pending = []
            self._acq_task = None
            self._sem = asyncio.Semaphore(self._max_inflight)
            self._inflight = 0
            self._rec_task = None

    def _decide(self, e: Estimate) -> asyncio.Future:
        self._bind()
        fut = self._loop.create_future()
        self._pending.append((e, fut))
        if self._acq_task is None or self._acq_task.done():
            self._acq_task = self._loop.create_task(self._acquire_flusher())
        return fut

    async def _acquire_flusher(self) -> None:
        while self._pending:
            # requests arriving in the same loop tick always share a call; the batching window is only waited
            # while earlier batches are on the wire, so a lone request pays no added latency
            await asyncio.sleep(0)
            if self._sem.locked() or self._inflight:
                await asyncio.sleep(self.batch_window_s)
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                await self._sem.acquire()
                # sends overlap: the next window fills while this batch is on the wire
                self._inflight += 1
                self._loop.create_task(self._send(batch))

    async def _send(self, batch: list[tuple[Estimate, asyncio.Future]]) -> None:
        batch = [(e, fut) for e, fut in batch if not fut.done()]  # waiters cancelled before the send
        if not batch:
            self._inflight -= 1
            self._sem.release()
            return
        try:
            self.stats["acquire_calls"] += 1
            self.stats["decisions"] += len(batch)
            results = await self._actor.acquire_many.remote([e for e, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to each waiter, which decides
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for (_, fut), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)
                elif isinstance(r, Grant):
                    # its waiter was cancelled: hand the tokens back rather than leave them to the refill
                    self.reconcile(Outcome(r.lease_id, None, 0, {}, time.time()))
        finally:
            self._inflight -= 1
            self._sem.release()

    # -- reconcile ----------------------------------------------------------------------------------------
    def reconcile(self, o: Outcome) -> None:
        """Queue an outcome; sent with others in the background. Never blocks."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # no loop (sync code): send it on its own, fire and forget
            self._actor.reconcile_many.remote([o])
            self.stats["reconcile_calls"] += 1
            return
        self._bind()
        self._outcomes.append(o)
        if self._rec_task is None or self._rec_task.done():
            self._rec_task = self._loop.create_task(self._reconcile_flusher())

    async def _reconcile_flusher(self) -> None:
        while self._outcomes:
            await asyncio.sleep(self.reconcile_window_s)
            self._send_outcomes()

    def _send_outcomes(self) -> None:
        if not self._outcomes:
            return
        batch, self._outcomes = self._outcomes, []
        ref = self._actor.reconcile_many.remote(batch)
        self.stats["reconcile_calls"] += 1
        self._rec_inflight.add(ref)
        # keep the ref until done so flush() can wait on it; failures are the actor's restart (leases gone)
        fut = asyncio.wrap_future(ref.future())
        fut.add_done_callback(lambda f, r=ref: (self._rec_inflight.discard(r), f.exception()))

    async def flush(self) -> None:
        """Send queued reconciles now and wait until the actor has applied them."""
        self._send_outcomes()
        refs = list(self._rec_inflight)
        if refs:
            await asyncio.gather(*refs, return_exceptions=True)
            for r in refs:
                self._rec_inflight.discard(r)
