"""One request, end to end, as a pure async state machine over ports.

    cache ──hit──► record the hit, answer ($0, no limiter capacity)
      │ miss (single-flight leader) / bypass
    route ─► budget + write-ahead intent ─► admit ─► call ─► settle
                  │ refused: BudgetExceeded       │ error: fallback state machine (runtime/fallback.py)
                  │ 80 %: downgrade to Haiku      │   retry same / next model / surface a typed error

While the cache looks up (embedding, search: ~10 ms), the first attempt is admitted on the caller's lease where
the admission port can do that at once (``try_acquire``); a hit gives that grant back, a miss sends on it.

The pipeline owns no state beyond the request it runs and the caller-wide helpers it is given (estimator,
circuit breaker); everything durable or shared sits behind a port:

    AdmissionPort   the cluster's limiter: ``acquire`` a grant (or raise), ``reconcile`` the outcome
    LedgerPort      ``begin`` (reserve + intent), ``intent`` (a later attempt), ``commit`` (durable record),
                    ``release`` (a reservation that will not be billed)
    CachePort       ``lookup`` / ``store`` / ``release``, and ``holding`` a single-flight claim alive
    Transport       ``create`` (one call; raises ``CallFailed``) and ``count_tokens``
    PrefixPort      prompt-cache prefixes (runtime/prefixes.py): ``claim`` (warm / lead / pass, waiting out
                    another request's write), ``finish`` / ``abandon``; default: one tracker in this process

Automatic prompt caching (runtime/prompt_cache.py) changes only what is sent: each attempt's params get
``cache_control`` at their stable prefixes (``Settings.prompt_caching``, ``NormalizedRequest.prompt_cache``).
The response cache and the ledger see the request as given. The admission estimate leaves out a prefix
believed warm (cache reads do not count toward ITPM); the budget reservation stays a bound for any outcome.
    Observer        optional: told of results, errors, admission waits and failed attempts (runtime/observe.py)

``actors/caller.py`` builds the real ports (actor handles, the SDK); tests build in-memory ones and run every
path in milliseconds.

What it guarantees, whatever fails where:
* every request ends in one ``Result`` or one typed error (``runtime.errors``), carrying its request id;
* every attempt's intent is written before its call leaves and ends in a billed row, a void mark (certainly
  not billed) or an unreconciled row (may have been billed: a timeout after the send);
* the budget reservation is an upper bound of the bill: a prompt the local estimate cannot bound reliably is
  counted by the API (``count_tokens``) first, or priced at its structural bound in the dearest tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from runtime.admission import COUNT_TOKENS_CLASS, NOT_SENT, SENT_NO_ANSWER, Estimate, Grant, Outcome
from runtime.budget import CANNOT_FIT
from runtime.errors import (AuthenticationError, ClaudeRuntimeError, InvalidRequest, OverloadedAfterFallback,
                            UpstreamError, UpstreamTimeout)
from runtime.estimate import TokenEstimator, input_upper_bound
from runtime.fallback import CircuitBreaker, FallbackPolicy, FallbackRun, Move, fallback_chain
from runtime.intents import Begin, Begun, Owner
from runtime.prefixes import LocalPrefixes, PrefixAsk, PrefixPort
from runtime.observe import Observer
from runtime.pricing import bound_cost, price
from runtime.prompt_cache import Decision, Plan, admission_input_tokens, outcome, plan as place_markers, \
    prefix_params
from runtime.records import Record
from runtime.request import AUTO, NormalizedRequest
from runtime.result import Result
from runtime.router import route
from runtime.settings import Settings, UpstreamSettings
from runtime.streaming import message_events
from runtime.transport import CallFailed, Transport
from runtime.upstreams import pick
from runtime.usage import Usage

log = logging.getLogger("claude_runtime.pipeline")
_OBSERVE_AFTER_S = 0.002
# an early grant (admitted while the cache looked up) is used only this soon after it was made: a lookup that
# took longer waited for another request's answer, and capacity admitted for later would sit unused meanwhile
_EARLY_MAX_AGE_S = 0.5


# -- ports ------------------------------------------------------------------------------------------------------

class AdmissionPort(Protocol):
    async def acquire(self, estimate: Estimate, deadline_s: float | None = None) -> Grant: ...

    def reconcile(self, outcome: Outcome) -> None: ...

    def give_back(self, grant: Grant) -> None: ...

    # optional: a grant now, with no wait and no round trip (a caller's lease), or None; not counted as demand
    # until ``admitted``. The pipeline admits this way while the cache looks up (see ``_admit_early``)
    #   def try_acquire(self, estimate: Estimate) -> Grant | None: ...
    #   def admitted(self, estimate: Estimate) -> None: ...


class LedgerPort(Protocol):
    async def begin(self, b: Begin) -> Begun: ...

    async def intent(self, request_id: str, attempt: int, model: str, owner: str, reserved_usd: float) -> None: ...

    async def commit(self, record: Record, *, tries: int = 1) -> bool: ...

    async def release(self, request_id: str, owner: str) -> None: ...

    async def check_cost(self, request_id: str, reserved_usd: float, billed_usd: float) -> None: ...


class CachePort(Protocol):
    async def lookup(self, params: dict, model: str, tenant: str | None, cache_enabled: bool = True, *,
                     owner: str | None = None, wait_s: float | None = None, request_id: str | None = None
                     ) -> Any: ...

    async def store(self, outcome: Any, message: dict, model_used: str, cost_usd: float, *,
                    wait: bool = True) -> bool: ...

    def store_later(self, outcome: Any, message: Any, model_used: str, cost_usd: float) -> None: ...

    async def release(self, outcome: Any) -> None: ...

    def holding(self, outcome: Any) -> contextlib.AbstractAsyncContextManager: ...


@dataclass
class Ports:
    """``transport`` alone serves a single unnamed upstream; with several upstreams, ``transports`` maps each
    upstream's name to its transport (and the pipeline is given the upstreams' settings)."""

    admission: AdmissionPort
    ledger: LedgerPort
    transport: Transport | None = None
    cache: CachePort | None = None
    transports: dict[str, Transport] = field(default_factory=dict)
    prefixes: PrefixPort | None = None
    observer: Observer | None = None


# -- the pipeline ------------------------------------------------------------------------------------------------

@dataclass
class _Attempts:
    """What one execution of one request did, attempt by attempt."""

    owner: Owner
    attempt: int = 0               # the current attempt number (0: none written yet)
    reserved_usd: float = 0.0      # the reservation the current attempt runs under
    holds_reservation: bool = False
    void: list[int] = field(default_factory=list)
    calls: int = 0
    prompt: "_PromptUse | None" = None   # the current attempt's prompt-cache placement and decision


@dataclass
class _Early:
    """A grant made while the cache looked up: used by the first attempt if that attempt asks for exactly this
    estimate, else given back."""

    model: str
    estimate: Estimate
    grant: Grant
    at: float
    reserve_usd: float | None   # the attempt's reservation, worked out meanwhile too (None: it needs a count)
    taken: bool = False   # used by the first attempt, or given back


@dataclass
class _PromptUse:
    """One attempt's automatic prompt caching: what is sent, and what the tracker is owed afterwards."""

    plan: Plan
    model: str
    key: str = ""                      # the tracked prefix, scoped to the attempt's upstreams
    decision: Decision | None = None   # None: no tracked prefix
    owed: bool = False                 # a finish (a response came) or an abandon (none did) is still due


class Pipeline:
    """Runs requests for one caller. ``caller`` names the process's actor (stable across restarts) and
    ``life`` this process (new after a restart): together with a per-request execution id they make the
    intents' owner, which is how the ledger tells a re-run from a duplicate."""

    def __init__(self, settings: Settings, ports: Ports, *, caller: str = "local", life: str | None = None,
                 estimator: TokenEstimator | None = None, breaker: CircuitBreaker | None = None,
                 policy: FallbackPolicy | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, sleep: Callable[[float], Any] = asyncio.sleep,
                 upstreams: list[UpstreamSettings] | None = None, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.ports = ports
        self.upstreams = {u.name: u for u in (upstreams or [])}
        if set(self.upstreams) - set(ports.transports):
            raise ValueError(f"no transport for upstreams {sorted(set(self.upstreams) - set(ports.transports))}")
        if not self.upstreams and ports.transport is None:
            raise ValueError("a pipeline needs a transport or upstreams with transports")
        self.rng = rng or random.Random()
        self._detached: set[asyncio.Task] = set()  # streams whose consumer left, read to their end
        self.caller = caller
        self.life = life or uuid.uuid4().hex[:12]
        self.estimator = estimator or TokenEstimator()
        self.breaker = breaker or CircuitBreaker(settings.retry.breaker_failures, settings.retry.breaker_cooldown_s,
                                                 clock=clock)
        self.policy = policy or FallbackPolicy(settings.retry)
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.observe_after_s = _OBSERVE_AFTER_S
        self.stats = {"requests": 0, "hits": 0, "calls": 0, "count_tokens": 0, "unreconciled": 0,
                      "reservation_exceeded": 0, "prompt_cache_placed": 0}
        self.prefixes: PrefixPort = ports.prefixes or LocalPrefixes(settings)
        # placements per request and model, so the reservation and the call price and send the same markers
        self._plans: dict[str, dict[str, Plan]] = {}

    # -- entry point -------------------------------------------------------------------------------------------
    async def run(self, req: NormalizedRequest) -> Result:
        self.stats["requests"] += 1
        t0 = self.clock()
        try:
            return self._observed(req, await self._run(req, t0))
        except ClaudeRuntimeError as exc:
            raise self._observed_error(req, exc.with_request_id(req.request_id), t0)
        except Exception as exc:
            raise self._observed_error(req, exc, t0)
        finally:
            self._plans.pop(req.request_id, None)

    async def stream(self, req: NormalizedRequest) -> AsyncIterator[dict[str, Any]]:
        """The same path as ``run``, yielding the API's stream events (dicts) as they arrive; a cache hit is
        streamed from the stored message. Fallback and retries happen only before the first event; a stream
        cut after it began is a typed error, and its call is booked (unreconciled: its bill is unknown).

        A consumer that stops reading does not stop the call: the upstream stream is read to its end, so the
        answer is billed, recorded and (when complete) cached all the same."""
        self.stats["requests"] += 1
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def produce() -> None:
            t0 = self.clock()
            try:
                self._observed(req, await self._run(req, t0, emit=queue.put_nowait))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                self._observed_error(req, exc, t0)
                queue.put_nowait(exc.with_request_id(req.request_id) if isinstance(exc, ClaudeRuntimeError)
                                 else exc)
            finally:
                self._plans.pop(req.request_id, None)
                queue.put_nowait(done)

        task = asyncio.ensure_future(produce())
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                # the consumer left: the answer is still paid for, so read it to the end and settle
                self._detached.add(task)
                task.add_done_callback(self._detached.discard)

    async def _run(self, req: NormalizedRequest, t0: float, emit: Callable[[dict], None] | None = None) -> Result:
        s = self.settings
        chosen = route(req.requested_model, req.params, s)
        model, reason = chosen.model, chosen.reason
        deadline_at = t0 + (req.deadline_s if req.deadline_s is not None else s.limiter.max_wait_s)
        run = _Attempts(Owner(self.caller, self.life, uuid.uuid4().hex[:12]))
        cache = self.ports.cache

        outcome = None
        early: _Early | None = None
        if cache is not None:
            look = asyncio.ensure_future(cache.lookup(
                req.params, model, req.tenant, cache_enabled=req.cache_enabled, owner=str(run.owner),
                wait_s=max(0.0, deadline_at - self.clock()), request_id=req.request_id))
            try:
                if req.cache_enabled and getattr(self.ports.admission, "try_acquire", None) is not None:
                    # admission runs while the lookup is out (embedding, search): once its round trip has
                    # left, which one turn of the loop lets it do. A hit gives the grant back
                    await asyncio.sleep(0)
                    early = self._admit_early(req, model)
                outcome = await look
            except BaseException:
                look.cancel()
                self._give_back_early(early)
                raise
            if early is not None and (outcome.kind in ("exact", "semantic")
                                      or self.clock() - early.at > _EARLY_MAX_AGE_S):
                self._give_back_early(early)
                early = None
            if outcome.kind in ("exact", "semantic"):
                result = await self._cache_hit(req, outcome, t0, reason)
                if emit is not None:
                    for event in message_events(outcome.message):
                        emit(event)
                return result
        # no cache configured, cache=False or a real-time prompt: the answer neither came from nor goes to it
        cache_kind = "miss" if outcome is not None and outcome.kind == "miss" else "bypass"
        leading = outcome is not None and outcome.kind == "miss" and getattr(outcome, "leader", False)

        try:
            holder = cache.holding(outcome) if leading else contextlib.nullcontext()
            async with holder:
                result = await self._call(req, model, reason, cache_kind, t0, deadline_at, run, emit, early)
        except BaseException as exc:
            self._give_back_early(early)  # failed before its first attempt took it
            await self._clean_up(req, model, run, outcome if leading else None, exc, t0)
            raise
        if outcome is not None and outcome.kind == "miss":
            try:
                # the answer goes now; it is serialised and its write sent just after (CacheClient.store_later),
                # and its waiters get it from the cache as it lands
                cache.store_later(outcome, result.message, result.model, result.cost_usd)
            except Exception:  # noqa: BLE001 - the answer is paid for and goes back regardless
                log.warning("cache store failed for %s", req.request_id)
        return result

    def _admit_early(self, req: NormalizedRequest, model: str) -> _Early | None:
        """The first attempt's grant, if the admission port can give it at once (a lease with room): the
        estimate as ``_call`` will build it for the routed model on all its upstreams. None where that estimate
        is not known yet (a tracked prompt-cache prefix: its claim decides the input tokens) or no lease has
        room. Never waits, never fails the request."""
        try:
            p = self._plan(req, model)
            if p.prefix_hash is not None:
                return None
            info = self.settings.models[model]
            est = self.estimator.estimate(req.params, info.tokenizer)
            candidates = [self.upstreams[n] for n in self._upstream_names(model) if n in self.upstreams]
            estimate = self._estimate(req, info.model_class, candidates, admission_input_tokens(est, 0))
            grant = self.ports.admission.try_acquire(estimate)
        except Exception:  # noqa: BLE001 - an optimisation: the first attempt asks as usual
            log.warning("early admission failed for %s", req.request_id, exc_info=True)
            return None
        if grant is None:
            return None
        try:
            reserve = self._bound_now(req, model)
        except Exception:  # noqa: BLE001 - the attempt works it out itself
            log.warning("early reservation figure failed for %s", req.request_id, exc_info=True)
            reserve = None
        return _Early(model, estimate, grant, self.clock(), reserve)

    @staticmethod
    def _estimate(req: NormalizedRequest, model_class: str, candidates: list[UpstreamSettings],
                  input_tokens: int) -> Estimate:
        # the limiter grants on whichever candidate upstream's group has the most headroom
        return Estimate(request_id=req.request_id, model_class=model_class, user_id=req.user_id,
                        priority=req.priority, input_tokens=input_tokens, max_output_tokens=req.max_tokens,
                        groups=tuple(dict.fromkeys(u.group for u in candidates)), tenant=req.tenant)

    def _give_back_early(self, early: _Early | None) -> None:
        if early is not None and not early.taken:
            early.taken = True
            self.ports.admission.give_back(early.grant)

    async def _clean_up(self, req: NormalizedRequest, model: str, run: _Attempts, outcome: Any,
                        exc: BaseException, t0: float) -> None:
        # each step on its own: one failing must not skip the others (a leaked reservation would hold budget
        # until the sweep; unclosed intents would turn into unreconciled rows)
        self._prompt_done(run, None)
        steps = []
        if outcome is not None:
            steps.append(self.ports.cache.release(outcome))
        if run.holds_reservation:
            steps.append(self.ports.ledger.release(req.request_id, str(run.owner)))
        if isinstance(exc, ClaudeRuntimeError):
            steps.append(self._commit_failure(req, model, run, exc, t0))
        for step in steps:
            try:
                await step
            except Exception:  # noqa: BLE001
                log.warning("clean-up step failed for %s", req.request_id, exc_info=True)

    # -- the cache hit ---------------------------------------------------------------------------------------
    async def _cache_hit(self, req: NormalizedRequest, outcome: Any, t0: float, reason: str) -> Result:
        import anthropic

        self.stats["hits"] += 1
        message = anthropic.types.Message.model_validate(outcome.message)
        latency = self.clock() - t0
        await self.ports.ledger.commit(Record(
            request_id=req.request_id, attempt=0, message_id=None, ts=self.wall(), user_id=req.user_id,
            tenant=req.tenant, priority=req.priority, model=message.model, usage=Usage(), cost=None,
            cache=outcome.kind, saved_usd=outcome.saved_usd, latency_s=latency, attempts=0, status="ok",
            error_type=None, environment=self.settings.environment,
        ), tries=4)
        return Result(message=message, model=message.model, cache=outcome.kind, cost_usd=0.0, attempts=0,
                      latency_s=latency, request_id=req.request_id, saved_usd=outcome.saved_usd,
                      route_reason=reason, user_id=req.user_id, tenant=req.tenant)

    # -- sizing ------------------------------------------------------------------------------------------------
    # -- upstreams ----------------------------------------------------------------------------------------------
    def _upstream_names(self, model: str) -> list[str]:
        return list(self.upstreams) or [""]

    def _transport(self, name: str) -> Transport:
        return self.ports.transports[name] if name else self.ports.transport

    def _price_factor(self, name: str | None = None) -> float:
        """An upstream's price factor; without one, the dearest (a reservation made before the upstream is
        chosen must cover whichever it turns out to be)."""
        if name:
            return self.upstreams[name].price_factor
        return max((u.price_factor for u in self.upstreams.values()), default=1.0)

    # -- sizing ------------------------------------------------------------------------------------------------
    async def _reservation(self, req: NormalizedRequest, model: str, deadline_at: float) -> float:
        """The most this attempt can cost: an upper bound of the bill, never an estimate of it."""
        s = self.settings
        mode = s.estimate.count_tokens
        bound = input_upper_bound(req.params)
        if self._counts_first(bound):
            # "auto" counts only where a budget needs the tighter figure, and only if counting capacity is free
            # at once: waiting for it would put the count_tokens rate limit (100 RPM at the lowest tier) and a
            # round trip on every code or non-English prompt; the structural bound below is an upper bound too
            until = deadline_at if mode == "always" else min(deadline_at, self.clock() + s.estimate.count_wait_s)
            counted = await self._count_tokens(req, model, until)
            if counted is not None:
                return bound_cost(model, counted, req.max_tokens, s, price_factor=self._price_factor(),
                                  **self._cache_bound(req, model))
        return self._structural_bound(req, model, bound)

    def _bound_now(self, req: NormalizedRequest, model: str) -> float | None:
        """``_reservation`` where it needs no count from the API (no wait, no I/O), else None."""
        bound = input_upper_bound(req.params)
        return None if self._counts_first(bound) else self._structural_bound(req, model, bound)

    def _counts_first(self, bound: Any) -> bool:
        mode = self.settings.estimate.count_tokens
        return mode == "always" or (mode == "auto" and self.settings.budgets.configured and not bound.sure)

    def _structural_bound(self, req: NormalizedRequest, model: str, bound: Any) -> float:
        """The reservation with no count from the API: the local estimate, raised to the prompt's structural
        ``bound``; where the estimate cannot be trusted, that bound priced at the dearest tier it could fall in."""
        s = self.settings
        f = self._price_factor()
        markers = self._cache_bound(req, model)
        if bound.sure:
            est = self.estimator.estimate(req.params, s.models[model].tokenizer)
            return bound_cost(model, max(int(est * 1.3), bound.tokens), req.max_tokens, s, price_factor=f,
                              **markers)
        return bound_cost(model, bound.tokens, req.max_tokens, s, worst_tier=True, price_factor=f, **markers)

    def _cache_bound(self, req: NormalizedRequest, model: str) -> dict[str, Any]:
        """What the markers this request is sent with allow to be written or read: the part up to the last one
        (a structural token bound, so it holds however the estimate errs), at their longest TTL. Nothing
        known about the markers (caching off: the user's own are not looked at): every token at any rate."""
        p = self._plan(req, model)
        if p.reason == "off":
            return {}
        if p.cacheable_upto is None:   # a marker in the last turn: the whole prompt may be written
            return {"cache_ttl": p.max_ttl}
        part = prefix_params(p.params, p.cacheable_upto)
        return {"cacheable_tokens_bound": input_upper_bound(part).tokens if part else 0, "cache_ttl": p.max_ttl}

    # -- automatic prompt caching ------------------------------------------------------------------------------
    def _plan(self, req: NormalizedRequest, model: str) -> Plan:
        plans = self._plans.setdefault(req.request_id, {})
        p = plans.get(model)
        if p is None:
            p = plans[model] = place_markers(req.params, model, self.settings, self.estimator,
                                             prompt_cache=req.prompt_cache)
        return p

    async def _prompt_cache(self, req: NormalizedRequest, model: str, run: _Attempts, deadline_at: float,
                            est: int, scope: str = "") -> int:
        """Place this attempt's markers and, for a tracked prefix, claim it (waiting briefly while another
        request writes it). ``scope``: the upstreams this attempt may go to (each keeps its own cache).
        Returns the input tokens to reserve against ITPM."""
        self._prompt_done(run, None)  # an earlier attempt's claim (a retry, a downgrade) ends here
        p = self._plan(req, model)
        if p.added:
            self.stats["prompt_cache_placed"] += 1
        if p.prefix_hash is None:
            run.prompt = _PromptUse(p, model)
            return est
        key = f"{p.prefix_hash}@{scope}" if scope else p.prefix_hash
        d = await self.prefixes.claim(PrefixAsk(key, model, p.prefix_tokens,
                                                deadline_in_s=max(0.0, deadline_at - self.clock())))
        if p.added and d.ttl != p.ttl and not run.holds_reservation:
            # the reservation (made next, in _begin) prices this TTL; an attempt that runs under an earlier
            # reservation keeps the TTL that one priced
            p = p.with_ttl(d.ttl)
            self._plans[req.request_id][model] = p
        run.prompt = _PromptUse(p, model, key, d, owed=True)
        return admission_input_tokens(est, p.prefix_tokens if d.kind == "warm" else 0)

    def _on_start(self, run: _Attempts, emit: Callable[[dict], None]) -> Callable[[dict], None]:
        """A streamed answer's first event already says what it wrote and read: tell the tracker then, so
        requests waiting for this write need not wait for the whole answer."""
        def watched(event: dict) -> None:
            if isinstance(event, dict) and event.get("type") == "message_start":
                usage = (event.get("message") or {}).get("usage")
                if usage:
                    self._prompt_done(run, Usage.from_api(usage))
            emit(event)

        return watched

    def _prompt_done(self, run: _Attempts, usage: Usage | None) -> None:
        """Tell the tracker what the current attempt's tracked prefix got: the response's usage, or no response
        (``usage`` None: a failed call, a cancellation, a change of model)."""
        use = run.prompt
        if use is None or not use.owed or use.decision is None:
            return
        use.owed = False
        p, d = use.plan, use.decision
        if usage is not None:
            wrote, read = outcome(usage)
            self.prefixes.finish(use.key, use.model, wrote, read, ttl=p.ttl, token=d.token)
        elif d.kind == "lead":
            self.prefixes.abandon(use.key, use.model, d.token)

    async def _count_tokens(self, req: NormalizedRequest, model: str, deadline_at: float) -> int | None:
        # Bedrock has no token counting: ask an upstream that does
        names = [n for n, u in self.upstreams.items() if u.kind != "bedrock"] if self.upstreams else [""]
        if not names:
            return None
        name = names[0]
        group = self.upstreams[name].group if name else None
        e = Estimate(request_id=req.request_id, model_class=COUNT_TOKENS_CLASS, user_id=None,
                     priority=req.priority, input_tokens=0, max_output_tokens=0,
                     groups=(group,) if group else ())
        try:
            grant = await self.ports.admission.acquire(e, deadline_s=max(0.0, deadline_at - self.clock()))
        except ClaudeRuntimeError:
            return None
        try:
            n = await self._transport(name).count_tokens(model, req.params)
        except CallFailed as f:
            self.ports.admission.reconcile(Outcome(grant.lease_id, None, f.status if f.sent == "yes" else
                                                   NOT_SENT, f.headers, self.wall()))
            return None
        self.ports.admission.reconcile(Outcome(grant.lease_id, Usage(), 200, {}, self.wall()))
        self.stats["count_tokens"] += 1
        return n

    # -- calls, with fallback ------------------------------------------------------------------------------
    async def _call(self, req: NormalizedRequest, model: str, reason: str, cache_kind: str, t0: float,
                    deadline_at: float, run: _Attempts, emit: Callable[[dict], None] | None = None,
                    early: _Early | None = None) -> Result:
        s = self.settings
        routed = model
        fb = FallbackRun(fallback_chain(model, s), self.policy, self.breaker, deadline_at=deadline_at,
                         clock=self.clock, upstreams=self._upstream_names)
        step = fb.start()
        need_begin = True          # the next attempt needs a (new) budget reservation
        intent_written = False     # the next attempt's intent is already written (by a downgrade's begin)
        downgrade_checked = False
        last_failure: CallFailed | None = None
        while True:
            if step.move is Move.SURFACE:
                raise self._surface(req, last_failure, fb.history)
            if step.delay_s > 0:
                await self.sleep(step.delay_s)
            model = step.model
            if step.why.startswith("fallback"):
                reason = step.why
            info = s.models[model]
            est = self.estimator.estimate(req.params, info.tokenizer)
            candidates = [self.upstreams[n] for n in step.upstreams if n in self.upstreams]
            itpm = await self._prompt_cache(req, model, run, deadline_at, est, scope=",".join(step.upstreams))
            estimate = self._estimate(req, info.model_class, candidates, itpm)
            # the write-ahead intent (with the budget reservation when one is needed) and the admission wait
            # overlap; both finish before the call leaves
            asked = self.clock()
            reserve_usd = None
            if early is not None and not early.taken and early.model == model and early.estimate == estimate:
                # admitted while the cache looked up: this grant (and reservation figure) is the first attempt's
                early.taken = True
                reserve_usd = early.reserve_usd
                self.ports.admission.admitted(estimate)
                grant_task = asyncio.get_running_loop().create_future()
                grant_task.set_result(early.grant)
            else:
                self._give_back_early(early)
                grant_task = asyncio.ensure_future(self.ports.admission.acquire(
                    estimate, deadline_s=max(0.0, deadline_at - self.clock())))
            try:
                if need_begin:
                    may_downgrade = (not downgrade_checked and req.priority != "critical"
                                     and info.model_class != "haiku" and model == routed)
                    begun = await self._begin(req, model, run, deadline_at, raise_refusal=not may_downgrade,
                                              amount=reserve_usd)
                    need_begin = False
                    downgrade_checked = True
                    res = begun.reservation
                    if not res.granted and res.reason != CANNOT_FIT:
                        raise res.refusal(req.request_id)  # no room before the deadline: Haiku would not help
                    if may_downgrade and (not res.granted or res.state in ("downgrade", "stop")):
                        # at 80 % of a budget (settled spend + the expected cost of what is in flight), or when
                        # the routed model's worst case can never fit beside the settled spend, non-critical
                        # traffic goes to Haiku: re-reserve for it, under the same attempt number when the first
                        # reservation was granted (the intent's model is updated before anything is sent)
                        self._drop_grant(grant_task)
                        grant_task = None
                        haiku = s.router.haiku_model
                        await self._begin(req, haiku, run, deadline_at,
                                          attempt=run.attempt if res.granted else None)
                        reason = (f"budget {res.state}: downgraded to haiku" if res.granted else
                                  f"budget refused {model} ({res.reason}): downgraded to haiku")
                        step = fb.restart(fallback_chain(haiku, s), why="budget downgrade")
                        intent_written = True
                        continue
                elif intent_written:
                    intent_written = False
                else:
                    run.attempt += 1
                    await self.ports.ledger.intent(req.request_id, run.attempt, model, str(run.owner),
                                                   run.reserved_usd)
            except BaseException:
                self._drop_grant(grant_task)
                raise
            try:
                grant = await grant_task
            except BaseException:
                # never sent: its intent is void
                run.void.append(run.attempt)
                raise
            self._observe("on_admission", info.model_class, req.priority, self.clock() - asked, grant.delay_s > 0)
            upstream = pick(candidates, grant.group, self.rng).name if candidates else ""
            try:
                run.calls += 1
                self.stats["calls"] += 1
                transport = self._transport(upstream)
                sent = run.prompt.plan.params   # the request, with the markers automatic caching placed
                if emit is None:
                    resp = await transport.create(model, sent, request_id=req.request_id,
                                                  attempt=run.attempt, max_tokens=req.max_tokens)
                else:
                    resp = await transport.stream(model, sent, request_id=req.request_id, attempt=run.attempt,
                                                  max_tokens=req.max_tokens, emit=self._on_start(run, emit))
            except CallFailed as f:
                last_failure = f
                self._prompt_done(run, None)
                self._observe("on_attempt_failed", model, upstream, f.status)
                self.ports.admission.reconcile(Outcome(grant.lease_id, None, _limiter_status(f), f.headers,
                                                       self.wall()))
                if f.maybe_billed:
                    await self._unreconciled(req, model, run)
                    need_begin = True
                else:
                    run.void.append(run.attempt)
                step = fb.failed(f.status, f.retry_after, upstream)
                if f.emitted:  # the consumer has part of this answer: another attempt cannot continue it
                    raise self._surface(req, f, fb.history)
                continue
            except BaseException:
                # cancelled mid-call (the caller is shutting down): the request went out
                self.ports.admission.reconcile(Outcome(grant.lease_id, None, SENT_NO_ANSWER, {}, self.wall()))
                raise
            return await self._settle(req, model, reason, cache_kind, t0, run, fb, grant, resp, est, upstream)

    async def _begin(self, req: NormalizedRequest, model: str, run: _Attempts, deadline_at: float,
                     attempt: int | None = None, *, raise_refusal: bool = True, amount: float | None = None
                     ) -> Begun:
        """Reserve the attempt's worst case and write its intent. When the budget has no room now but the
        worst case fits beside the settled spend, the ledger answers once room comes (or the request's deadline
        passes). A refusal raises ``BudgetExceeded`` with the figures, or with ``raise_refusal=False`` comes
        back in the ``Begun`` (nothing is held then). ``amount``: the reservation, when already worked out."""
        if attempt is None and run.attempt > 0:
            attempt = run.attempt + 1  # a new reservation for a later attempt of this execution
        if amount is None:
            amount = await self._reservation(req, model, deadline_at)
        begun = await self.ports.ledger.begin(Begin(
            request_id=req.request_id, owner=str(run.owner), attempt=attempt, model=model, user_id=req.user_id,
            tenant=req.tenant, priority=req.priority, reserve_usd=amount, unique=not req.id_given,
            # the ledger's clock is the wall clock; the request's deadline is on ours
            deadline_at=self.wall() + max(0.0, deadline_at - self.clock()),
            route="auto" if req.requested_model == AUTO else "requested", max_tokens=req.max_tokens))
        self.stats["unreconciled"] += begun.unreconciled
        if begun.duplicate_of is not None:
            raise InvalidRequest(f"request_id {req.request_id!r} is already in flight; request ids must be "
                                 "unique per request", request_id=req.request_id, field="request_id")
        if not begun.reservation.granted:
            if raise_refusal:
                raise begun.reservation.refusal(req.request_id)
            return begun
        run.attempt = begun.attempt
        run.reserved_usd = amount
        run.holds_reservation = True
        return begun

    async def _unreconciled(self, req: NormalizedRequest, model: str, run: _Attempts) -> None:
        """A call that went out and whose answer was lost: booked now at its reservation (which this settles),
        so a retry runs under a fresh one and the money is never unaccounted for."""
        from runtime.intents import OpenIntent, unreconciled_record

        it = OpenIntent(req.request_id, run.attempt, model, self.wall(), str(run.owner), run.reserved_usd,
                        req.user_id, req.tenant, req.priority)
        await self.ports.ledger.commit(unreconciled_record(it, self.settings.environment, self.wall()), tries=4)
        run.holds_reservation = False
        self.stats["unreconciled"] += 1

    async def _settle(self, req: NormalizedRequest, model: str, reason: str, cache_kind: str, t0: float,
                      run: _Attempts, fb: FallbackRun, grant: Grant, resp: Any, est: int, upstream: str) -> Result:
        s = self.settings
        message = resp.message
        usage = Usage.from_api(message.usage)
        self._prompt_done(run, usage)
        self.ports.admission.reconcile(Outcome(grant.lease_id, usage, 200, resp.headers, self.wall()))
        fb.succeeded(upstream)
        self.estimator.observe(est, usage.itpm_tokens + usage.cache_read_tokens, s.models[model].tokenizer)
        cost = price(usage, model, s, price_factor=self._price_factor(upstream) if upstream else 1.0)
        if cost.total_usd > run.reserved_usd + 1e-9:
            self.stats["reservation_exceeded"] += 1
            log.error("request %s billed $%.6f over its reservation $%.6f", req.request_id, cost.total_usd,
                      run.reserved_usd)
            await self.ports.ledger.check_cost(req.request_id, run.reserved_usd, cost.total_usd)
        latency = self.clock() - t0
        await self.ports.ledger.commit(Record(
            request_id=req.request_id, attempt=run.attempt, message_id=message.id, ts=self.wall(),
            user_id=req.user_id, tenant=req.tenant, priority=req.priority, model=model, usage=usage,
            cost=cost, cache=cache_kind, saved_usd=0.0, latency_s=latency, attempts=run.attempt, status="ok",
            error_type=None, environment=s.environment, void_attempts=tuple(run.void), upstream=upstream or None,
        ), tries=4)
        run.holds_reservation = False
        run.void.clear()
        return Result(message=message, model=model, cache=cache_kind, cost_usd=cost.total_usd,
                      attempts=run.attempt, latency_s=latency, request_id=req.request_id, route_reason=reason,
                      user_id=req.user_id, tenant=req.tenant, history=fb.history, upstream=upstream or None)

    # -- observation (never fails a request) -------------------------------------------------------------------
    def _observe(self, event: str, *args: Any) -> None:
        if self.ports.observer is not None:
            try:
                getattr(self.ports.observer, event)(*args)
            except Exception:  # noqa: BLE001
                log.warning("observer %s failed", event, exc_info=True)

    def _observed(self, req: NormalizedRequest, result: Result) -> Result:
        # metrics and the log line are not the caller's business: they run just after the result has gone back
        # (a moment later, not next on the loop: the thread waiting for this result needs the GIL first)
        try:
            loop = asyncio.get_running_loop()
            if self.observe_after_s > 0:
                loop.call_later(self.observe_after_s, self._observe, "on_result", req, result)
            else:
                loop.call_soon(self._observe, "on_result", req, result)
        except RuntimeError:  # no loop running (never on the pipeline's paths): observe now
            self._observe("on_result", req, result)
        return result

    def _observed_error(self, req: NormalizedRequest, exc: BaseException, t0: float) -> BaseException:
        if not isinstance(exc, asyncio.CancelledError):
            self._observe("on_error", req, exc, self.clock() - t0)
        return exc

    # -- failures ----------------------------------------------------------------------------------------------
    def _drop_grant(self, task: asyncio.Future | None) -> None:
        """Give back a grant whose request will not be sent (or stop waiting for one); None: already done."""
        if task is None:
            return
        if not task.done():
            task.cancel()  # the admission port refunds a grant that arrives for a cancelled waiter
        elif not task.cancelled() and task.exception() is None:
            self.ports.admission.give_back(task.result())

    @staticmethod
    def _surface(req: NormalizedRequest, f: CallFailed | None, history: list[dict[str, Any]]
                 ) -> ClaudeRuntimeError:
        rid = req.request_id
        if f is None:
            return OverloadedAfterFallback("no model of the fallback chain could be tried", request_id=rid,
                                           status=None, error_type=None, attempts=history)
        common = dict(request_id=rid, status=f.status, error_type=f.error_type, attempts=history,
                      api_request_id=f.api_request_id)
        if f.status in (401, 403):
            return AuthenticationError(f"{f.status} {f.error_type}: {f.message}", **common)
        if f.status == 0 and f.sent == "maybe":
            return UpstreamTimeout(
                f"no answer from the API ({f.error_type}); the call may have been billed and is recorded as "
                "unreconciled in the ledger", **common)
        if f.status == 429 or f.status in (0, 408, 409) or f.status >= 500:
            return OverloadedAfterFallback(
                f"every model in the fallback chain failed; last: {f.status} {f.error_type}: {f.message}",
                **common)
        return UpstreamError(f"{f.status} {f.error_type}: {f.message}", **common)

    async def _commit_failure(self, req: NormalizedRequest, model: str, run: _Attempts, exc: ClaudeRuntimeError,
                              t0: float) -> None:
        await self.ports.ledger.commit(Record(
            request_id=req.request_id, attempt=run.attempt, message_id=None, ts=self.wall(),
            user_id=req.user_id, tenant=req.tenant, priority=req.priority, model=model, usage=Usage(), cost=None,
            cache="miss", saved_usd=0.0, latency_s=self.clock() - t0, attempts=run.calls, status="error",
            error_type=type(exc).__name__, environment=self.settings.environment,
            void_attempts=tuple(run.void),
        ), tries=4)


def _limiter_status(f: CallFailed) -> int:
    if f.sent == "no":
        return NOT_SENT
    if f.sent == "maybe":
        return SENT_NO_ANSWER
    return f.status

