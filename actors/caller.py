"""Caller actors: stateless, async, scaled across the cluster. They orchestrate one request through the layers.

    cache (exact, semantic, single-flight) -> route -> budget reservation -> limiter grant + write-ahead intent
    -> messages.create (SDK, max_retries=0) -> reconcile limiter, commit ledger record, store in cache

The singletons never call each other; the caller does. Whatever a caller holds in memory (estimator calibration,
circuit breaker counts) may be lost on restart without harm: the request is re-run under the same request id.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import ray
from pydantic import SecretStr

from actors.cache import CacheClient
from actors.ledger import CommitBatcher
from actors.limiter import LimiterClient
from runtime.admission import NOT_SENT, Estimate, Outcome
from runtime.errors import (AuthenticationError, ClaudeRuntimeError, OverloadedAfterFallback,
                            UpstreamError, redact)
from runtime.estimate import TokenEstimator
from runtime.fallback import Action, CircuitBreaker, FallbackPolicy, fallback_chain
from runtime.pricing import max_cost, price
from runtime.records import Record
from runtime.request import NormalizedRequest
from runtime.result import Result
from runtime.router import route
from runtime.settings import Settings
from runtime.usage import Usage

RUNTIME_REQUEST_ID_HEADER = "x-claude-runtime-request-id"


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, anthropic.APIStatusError):
        return int(exc.status_code)
    return 0  # connection error, timeout


def _headers_of(exc_or_resp: Any) -> dict[str, str]:
    resp = getattr(exc_or_resp, "response", None) if isinstance(exc_or_resp, BaseException) else exc_or_resp
    headers = getattr(resp, "headers", None)
    if headers is None:
        return {}
    return {k.lower(): v for k, v in headers.items()
            if k.lower().startswith("anthropic-ratelimit-") or k.lower() in ("retry-after", "request-id")}


def _retry_after(headers: dict[str, str]) -> float | None:
    try:
        return float(headers["retry-after"]) if "retry-after" in headers else None
    except ValueError:
        return None


def _error_type(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("type"), str):
            return err["type"]
    return type(exc).__name__


class CallerActor:
    def __init__(self, settings: Settings, base_url: str | None, api_key: SecretStr | None,
                 limiter, ledger, cache=None) -> None:
        self.settings = settings
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key.get_secret_value() if api_key is not None else None,
            base_url=base_url, max_retries=0,  # the retry policy is ours (runtime/fallback.py)
            timeout=settings.retry.request_timeout_s,
        )
        self._limiter = LimiterClient(limiter, settings.limiter.max_wait_s)
        self._ledger = ledger
        # concurrent requests in this caller share one durable ledger write (group commit)
        self._commits = CommitBatcher(ledger)
        self._cache = CacheClient(cache, settings) if cache is not None else None
        self._estimator = TokenEstimator()
        self._policy = FallbackPolicy(settings.retry)
        self._breaker = CircuitBreaker(settings.retry.breaker_failures, settings.retry.breaker_cooldown_s)
        self._node_id = ray.get_runtime_context().get_node_id()
        if self._cache is not None:
            # find the embedding pool before the first request; the model lives there, never in a caller
            self._cache.embedder.discover()

    def ready(self) -> str:
        return self._node_id

    def loaded_modules(self) -> list[str]:
        """Debugging and tests: what this process has imported (a caller must never hold torch)."""
        import sys

        return sorted(sys.modules)

    def rss_bytes(self) -> int:
        """Debugging and benchmarks: this process's resident memory."""
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def get_settings(self) -> Settings:
        return self.settings

    async def handle(self, req: NormalizedRequest) -> Result:
        t0 = time.perf_counter()
        try:
            return await self._handle(req, t0)
        except ClaudeRuntimeError as exc:
            raise exc.with_request_id(req.request_id)

    async def _handle(self, req: NormalizedRequest, t0: float) -> Result:
        s = self.settings
        chosen = route(req.requested_model, req.params, s)
        model, reason = chosen.model, chosen.reason

        outcome = None
        if self._cache is not None:
            outcome = await self._cache.lookup(req.params, model, req.tenant, cache_enabled=req.cache_enabled)
            if outcome.kind in ("exact", "semantic"):
                return await self._cache_hit(req, outcome, t0, reason)
        # no cache configured, cache=False or a real-time prompt: the answer neither came from nor goes to it
        cache_kind = "miss" if outcome is not None and outcome.kind == "miss" else "bypass"

        try:
            result = await self._call_with_fallback(req, model, reason, cache_kind, t0)
        except BaseException as exc:
            # each clean-up on its own: one failing must not skip the others (a leaked reservation would hold
            # budget until the ledger restarts)
            try:
                if outcome is not None and outcome.leader:
                    await self._cache.release(outcome)
            finally:
                try:
                    await self._ledger.release.remote(req.request_id)
                finally:
                    if isinstance(exc, ClaudeRuntimeError):
                        await self._commit_failure(req, model, exc, t0)
            raise
        if outcome is not None and outcome.kind == "miss":
            await self._cache.store(outcome, result.message.model_dump(mode="json"), result.model,
                                    result.cost_usd)
        return result

    async def _cache_hit(self, req: NormalizedRequest, outcome, t0: float, reason: str) -> Result:
        message = anthropic.types.Message.model_validate(outcome.message)
        latency = time.perf_counter() - t0
        await self._commits.commit(Record(
            request_id=req.request_id, attempt=0, message_id=None, ts=time.time(), user_id=req.user_id,
            tenant=req.tenant, priority=req.priority, model=message.model, usage=Usage(), cost=None,
            cache=outcome.kind, saved_usd=outcome.saved_usd, latency_s=latency, attempts=0, status="ok",
            error_type=None, environment=self.settings.environment,
        ))
        return Result(message=message, model=message.model, cache=outcome.kind, cost_usd=0.0, attempts=0,
                      latency_s=latency, request_id=req.request_id, saved_usd=outcome.saved_usd,
                      route_reason=reason, user_id=req.user_id, tenant=req.tenant)

    def _estimate_input(self, req: NormalizedRequest, model: str) -> int:
        return self._estimator.estimate(req.params, self.settings.models[model].tokenizer)

    async def _begin(self, req: NormalizedRequest, routed: str, reason: str, attempt: int,
                     first_model: str) -> tuple[str, str]:
        """Reserve the worst-case cost of the routed model (and write the first attempt's intent). At 80 % of
        a budget non-critical traffic goes to Haiku; at 100 % Haiku may still fit."""
        s = self.settings

        async def begin(model: str, intent_model: str):
            est = self._estimate_input(req, model)
            return await self._ledger.begin.remote(req.request_id, attempt, intent_model, req.user_id, req.tenant,
                                                   req.priority, max_cost(model, est, req.max_tokens, s))

        res = await begin(routed, first_model)
        model = routed
        if (res.state in ("downgrade", "stop") and req.priority != "critical"
                and s.models[routed].model_class != "haiku"):
            # a second reservation for the same request replaces the first
            model, reason = s.router.haiku_model, f"budget {res.state}: downgraded to haiku"
            res = await begin(model, model)
        if not res.granted:
            raise res.refusal(req.request_id)
        return model, reason

    async def _call_with_fallback(self, req: NormalizedRequest, model: str, reason: str, cache_kind: str,
                                  t0: float) -> Result:
        s = self.settings
        chain = fallback_chain(model, s)
        history: list[dict[str, Any]] = []
        attempt = 0
        idx = 0
        tries_on_model = 0
        deadline = time.monotonic() + (req.deadline_s if req.deadline_s is not None else s.limiter.max_wait_s)
        routed = model
        first = True
        while True:
            model = chain[idx]
            has_next = idx + 1 < len(chain)
            if has_next and not self._breaker.allow(model):
                history.append({"model": model, "status": "circuit_open"})
                idx += 1
                tries_on_model = 0
                continue
            attempt += 1
            tries_on_model += 1
            info = s.models[model]
            est = self._estimate_input(req, model)
            estimate = Estimate(request_id=req.request_id, model_class=info.model_class, user_id=req.user_id,
                                priority=req.priority, input_tokens=est, max_output_tokens=req.max_tokens)
            # the write-ahead intent (with the budget reservation, on the first attempt) and the admission wait
            # overlap; both finish before the call leaves
            grant_task = asyncio.ensure_future(
                self._limiter.acquire(estimate, deadline_s=max(0.0, deadline - time.monotonic())))
            if first:
                first = False
                try:
                    budget_model, reason = await self._begin(req, routed, reason, attempt, model)
                except BaseException:
                    self._drop_grant(grant_task)
                    raise
                if budget_model != routed:  # downgraded: that grant was for the wrong class
                    self._drop_grant(grant_task)
                    chain, idx, tries_on_model = fallback_chain(budget_model, s), 0, 0
                    attempt -= 1
                    continue
            else:
                try:
                    await self._ledger.intent.remote(req.request_id, attempt, model)
                except BaseException:
                    self._drop_grant(grant_task)
                    raise
            grant = await grant_task
            try:
                raw = await self._client.messages.with_raw_response.create(
                    model=model, **req.params,
                    extra_headers={RUNTIME_REQUEST_ID_HEADER: req.request_id})
                message = await raw.parse()
            except (anthropic.APIStatusError, anthropic.APIConnectionError) as exc:
                status = _status_of(exc)
                headers = _headers_of(exc)
                self._limiter.reconcile(Outcome(lease_id=grant.lease_id, usage=None, status=status,
                                                headers=headers, received_at=time.time()))
                self._breaker.record(model, status)
                history.append({"model": model, "status": status})
                decision = self._policy.decide(status, tries_on_model, has_next, _retry_after(headers))
                if decision.action is Action.SURFACE:
                    raise self._surface(req, exc, status, history) from None
                if decision.action is Action.NEXT_MODEL:
                    idx += 1
                    tries_on_model = 0
                    reason = f"fallback after {status} on {model}"
                    continue
                if time.monotonic() + decision.delay_s > deadline:
                    raise self._surface(req, exc, status, history) from None
                await asyncio.sleep(decision.delay_s)
                continue
            except Exception as exc:  # not an API answer (a bug, a malformed response): typed, never retried
                self._limiter.reconcile(Outcome(lease_id=grant.lease_id, usage=None, status=0, headers={},
                                                received_at=time.time()))
                history.append({"model": model, "status": type(exc).__name__})
                raise UpstreamError(f"unexpected {type(exc).__name__} calling the API: {redact(str(exc))}",
                                    request_id=req.request_id, status=None, error_type=type(exc).__name__,
                                    attempts=history) from None

            headers = _headers_of(raw)
            usage = Usage.from_api(message.usage)
            self._limiter.reconcile(Outcome(lease_id=grant.lease_id, usage=usage, status=200, headers=headers,
                                            received_at=time.time()))
            self._breaker.record(model, 200)
            self._estimator.observe(est, usage.itpm_tokens + usage.cache_read_tokens, info.tokenizer)
            history.append({"model": model, "status": 200})
            cost = price(usage, model, s)
            latency = time.perf_counter() - t0
            await self._commit_billed(Record(
                request_id=req.request_id, attempt=attempt, message_id=message.id, ts=time.time(),
                user_id=req.user_id, tenant=req.tenant, priority=req.priority, model=model, usage=usage,
                cost=cost, cache=cache_kind, saved_usd=0.0, latency_s=latency, attempts=attempt, status="ok",
                error_type=None, environment=s.environment,
            ))
            return Result(message=message, model=model, cache=cache_kind, cost_usd=cost.total_usd,
                          attempts=attempt, latency_s=latency, request_id=req.request_id, route_reason=reason,
                          user_id=req.user_id, tenant=req.tenant, history=history)

    async def _commit_billed(self, record: Record, tries: int = 4) -> None:
        """A billed response must reach the ledger: Ray retries across a ledger restart by itself; a failed
        write (disk full, say) is retried here before the request gives up."""
        for n in range(tries):
            try:
                await self._commits.commit(record)
                return
            except ray.exceptions.RayTaskError:
                if n == tries - 1:
                    raise
                await asyncio.sleep(0.2 * 2 ** n)

    def _drop_grant(self, task: asyncio.Future) -> None:
        """Give back a grant whose request will not be sent (or stop waiting for one)."""
        if not task.done():
            task.cancel()
        elif not task.cancelled() and task.exception() is None:
            self._limiter.reconcile(Outcome(lease_id=task.result().lease_id, usage=None, status=NOT_SENT,
                                            headers={}, received_at=time.time()))

    def _surface(self, req: NormalizedRequest, exc: BaseException, status: int,
                 history: list[dict[str, Any]]) -> ClaudeRuntimeError:
        etype = _error_type(exc)
        msg = redact(getattr(exc, "message", None) or str(exc))
        if status in (401, 403):
            return AuthenticationError(f"{status} {etype}: {msg}", request_id=req.request_id, status=status,
                                       error_type=etype, attempts=history)
        if status == 429 or status in (0, 408, 409) or status >= 500:
            return OverloadedAfterFallback(
                f"every model in the fallback chain failed; last: {status} {etype}: {msg}",
                request_id=req.request_id, status=status, error_type=etype, attempts=history)
        return UpstreamError(f"{status} {etype}: {msg}", request_id=req.request_id, status=status,
                             error_type=etype, attempts=history)

    async def _commit_failure(self, req: NormalizedRequest, model: str, exc: ClaudeRuntimeError,
                              t0: float) -> None:
        attempts = len(getattr(exc, "attempts", None) or [])
        await self._commits.commit(Record(
            request_id=req.request_id, attempt=max(1, attempts), message_id=None, ts=time.time(),
            user_id=req.user_id, tenant=req.tenant, priority=req.priority, model=model, usage=Usage(), cost=None,
            cache="miss", saved_usd=0.0, latency_s=time.perf_counter() - t0, attempts=attempts, status="error",
            error_type=type(exc).__name__, environment=self.settings.environment,
        ))
