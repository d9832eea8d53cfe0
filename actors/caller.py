"""Caller actors: stateless async shells that run ``runtime.pipeline.Pipeline`` with real ports.

Everything that decides lives in the pipeline (runtime/pipeline.py); this actor only builds the ports (the
limiter, ledger and cache clients over their actor handles, the SDK transport) and hands each request to it.

Whatever a caller holds in memory (estimator calibration, circuit breaker counts) may be lost on restart without
harm. Callers are members of a pool (actors/pool.py) that reads their load (``load``, answered on a control
concurrency group so a busy caller still answers), drains them before stopping them, and asks one of them to
``spawn`` new ones (the callers are the only actors that hold the upstreams' credentials). Ray re-runs a killed caller's requests on its restarted process; the pipeline's intents, owned by
(actor name, process life, execution), let the ledger book what the dead process may have been billed and
number the re-run's attempts after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
import uuid

import ray

from actors.cache import CacheClient
from actors.journal import Journal
from actors.ledger import LedgerClient
from actors.local_ledger import LocalLedgerClient
from actors.limiter import LimiterClient, PrefixClient
from actors.metrics import RequestObserver
from runtime.errors import ClaudeRuntimeError
from runtime.pipeline import Pipeline, Ports
from runtime.request import NormalizedRequest
from runtime.result import Result
from runtime.settings import Settings, UpstreamSettings
from runtime.transport import build_transport


def secrets_fingerprint(upstreams: list[UpstreamSettings]) -> str:
    """A digest of the upstreams' credentials: lets ``runtime.start`` tell that a key changed without the key
    ever leaving the process that holds it."""
    blob = json.dumps([[u.name, {k: (v.get_secret_value() if hasattr(v, "get_secret_value") else v)
                                 for k, v in u.secrets().items()}] for u in upstreams], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


log = logging.getLogger(__name__)

CONTROL = "control"  # the concurrency group of the pool's calls: answered even when every request slot is taken


def caller_options(settings: Settings, name: str, namespace: str, node_id: str | None) -> dict:
    """Ray options for a caller: named and detached (``runtime.connect()`` finds it by name), restarted on
    failure with its requests re-run, softly placed on ``node_id`` (a caller whose node dies restarts on
    another one)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cs = settings.callers
    opts = dict(name=name, namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1,
                max_task_retries=-1, max_concurrency=cs.max_concurrency, num_cpus=cs.num_cpus)
    if node_id is not None:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return opts


def journal_path(settings: Settings, caller: str) -> str:
    """One journal per caller name and runtime (its data_dir), on node-local disk unless configured."""
    import tempfile
    from pathlib import Path

    base = Path(settings.ledger.journal_dir or Path(tempfile.gettempdir()) / "claude_runtime_journal")
    tag = hashlib.sha256(str(settings.data_dir).encode()).hexdigest()[:12]
    return str(base / tag / f"{caller}.jsonl")


def _log_close_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing a replaced SDK client failed: %s", type(task.exception()).__name__)


class CallerActor:
    def __init__(self, settings: Settings, upstreams: list[UpstreamSettings], limiter, ledger, cache=None,
                 name: str | None = None) -> None:
        self._life = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._name = name or ray.get_runtime_context().get_actor_name() or "caller"
        self._limiter, self._ledger, self._cache_handle = limiter, ledger, cache
        self._in_flight = 0
        self._served = 0
        self._draining = False
        # reconfigure builds a new pipeline; the old one's requests finish on it, and then its transports (an
        # SDK client and its connection pool each) are closed
        self._running: dict[int, int] = {}   # id(pipeline) -> requests running on it
        self._retired: list[Pipeline] = []
        self._cache = CacheClient(cache, settings) if cache is not None else None
        self._node_id = ray.get_runtime_context().get_node_id()
        self._started = time.time()
        self._journal = None
        if settings.ledger.local_journal:
            self._journal = Journal(journal_path(settings, self._name))
        self._build(settings, upstreams)
        if self._journal is not None:
            # what an earlier life of this caller left: drained first, its unanswered calls booked
            self.pipeline.ports.ledger.recover_sync(self._name, self._life)
        if self._cache is not None:
            # find the embedding pool before the first request; the model lives there, never in a caller
            self._cache.embedder.discover()

    def _build(self, settings: Settings, upstreams: list[UpstreamSettings]) -> None:
        old = getattr(self, "pipeline", None)
        # the caller is the one place that holds credentials: each upstream gets its SDK client here
        self.settings = settings.without_secrets()
        self._upstreams = list(upstreams)  # for callers this one spawns for the pool, and count_tokens
        self._fingerprint = secrets_fingerprint(upstreams)
        if self._journal is not None:
            budgeted = settings.budgets.configured
            ledger_port = LocalLedgerClient(self._ledger, self._journal, owner=f"{self._name}|{self._life}",
                                            budgeted=budgeted, lease_term_s=settings.ledger.budget_lease_term_s,
                                            drain_interval_s=settings.ledger.journal_drain_s)
            ledger_port.alone = lambda: self._in_flight <= 1
        else:
            ledger_port = LedgerClient(self._ledger)
        ports = Ports(
            admission=LimiterClient(self._limiter, settings.limiter.max_wait_s, leases=settings.limiter.leases,
                                    caller=f"{self._name}|{self._life}",
                                    lease_term_s=settings.limiter.lease_term_s,
                                    capped=lambda e: settings.user_caps(e.user_id, e.tenant) is not None),
            ledger=ledger_port,
            transports={u.name: build_transport(u, settings.retry) for u in upstreams},
            cache=self._cache,
            # prompt-cache prefixes: the limiter actor's tracker, so one write per new prefix cluster-wide
            prefixes=PrefixClient(self._limiter, settings),
            observer=RequestObserver(self.settings),
        )
        self.pipeline = Pipeline(self.settings, ports, caller=self._name, life=self._life,
                                 upstreams=[u.without_secrets() for u in upstreams])
        if old is not None:
            self._retired.append(old)
            self._close_retired()

    def _close_retired(self) -> None:
        """Close the transports of replaced pipelines that no request runs on any more."""
        for p in [p for p in self._retired if not self._running.get(id(p))]:
            self._retired.remove(p)
            for transport in p.ports.transports.values():
                close = getattr(transport, "aclose", None)
                if close is not None:
                    task = asyncio.ensure_future(close())
                    task.add_done_callback(_log_close_failure)

    def _enter(self) -> Pipeline:
        p = self.pipeline
        self._running[id(p)] = self._running.get(id(p), 0) + 1
        return p

    def _leave(self, p: Pipeline) -> None:
        left = self._running[id(p)] - 1
        if left:
            self._running[id(p)] = left
        else:
            del self._running[id(p)]
            if self._retired:
                self._close_retired()

    @ray.method(concurrency_group=CONTROL)
    def ready(self) -> str:
        return self._node_id

    # -- the pool's side ---------------------------------------------------------------------------------------
    @ray.method(concurrency_group=CONTROL)
    def load(self) -> dict:
        """What the pool sizes itself by: requests in this caller now, and whether it is draining."""
        return {"name": self._name, "in_flight": self._in_flight, "draining": self._draining,
                "node": self._node_id, "life": self._life, "served": self._served, "leases": self._leases()}

    def _leases(self) -> dict:
        """The capacity (and, where the ledger port reports them, budget) leases this caller holds, for
        ``claude-runtime status``."""
        out = {}
        book = getattr(self.pipeline.ports.admission, "book", None)
        if book is not None:
            out["capacity"] = book.snapshot()
        budget = getattr(self.pipeline.ports.ledger, "lease_snapshot", None)  # a hook for budget leases
        if callable(budget):
            out["budget"] = budget()
        return out

    @ray.method(concurrency_group=CONTROL)
    def drain(self, on: bool = True) -> dict:
        """Leave (or rejoin) rotation. Routers stop sending here; a request that still arrives (a handle that
        has not refreshed its list yet) is served all the same: the pool stops this caller only once it holds
        nothing and the grace period is over."""
        self._draining = bool(on)
        return self.load()

    @ray.method(concurrency_group=CONTROL)
    def spawn(self, names: list[str], nodes: list[str | None], namespace: str) -> list[str]:
        """Start callers ``names`` (on ``nodes``, softly) with this caller's settings and upstreams: the pool
        manager never holds credentials, so a running caller creates its siblings."""
        for name, node in zip(names, nodes):
            RemoteCaller.options(**caller_options(self.settings, name, namespace, node)).remote(
                self.settings, self._upstreams, self._limiter, self._ledger, self._cache_handle, name)
        return list(names)

    def life(self) -> str:
        """This process's id: it changes when Ray restarts the actor."""
        return self._life

    def loaded_modules(self) -> list[str]:
        """Debugging and tests: what this process has imported (a caller must never hold torch)."""
        return sorted(sys.modules)

    def rss_bytes(self) -> int:
        """Debugging and benchmarks: this process's resident memory."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def get_settings(self) -> Settings:
        # for runtime.connect(): everything but the secrets
        return self.settings

    def fingerprint(self) -> str:
        return self._fingerprint

    async def reconfigure(self, settings: Settings, upstreams: list[UpstreamSettings]) -> str:
        """New limits, retry policy and upstreams for requests that start from now on (running ones finish
        under the settings they started with, and then the old SDK clients are closed)."""
        self._build(settings, upstreams)
        return self._life

    def pipeline_stats(self) -> dict:
        return dict(self.pipeline.stats)

    async def flush(self) -> int:
        """Everything journaled so far is in the ledger (and every cache write and statistic at the cache) when
        this returns."""
        if self._cache is not None:
            try:
                await self._cache.drain()
            except Exception:  # noqa: BLE001 - a restarting cache actor: its writes released their claims
                pass
        ledger = self.pipeline.ports.ledger
        return await ledger.drain() if isinstance(ledger, LocalLedgerClient) else 0

    async def handle(self, req: NormalizedRequest) -> Result:
        self._in_flight += 1
        p = self._enter()
        try:
            return await p.run(req)
        except ClaudeRuntimeError as exc:
            raise exc.with_request_id(req.request_id)
        finally:
            self._leave(p)
            self._in_flight -= 1
            self._served += 1

    async def handle_stream(self, req: NormalizedRequest):
        """The answer as the API's stream events (a Ray streaming generator: call with
        ``num_returns="streaming"``)."""
        self._in_flight += 1
        p = self._enter()
        try:
            async for event in p.stream(req):
                yield event
        finally:
            self._leave(p)
            self._in_flight -= 1
            self._served += 1

    # -- beside the pipeline: token counting for the front door, cache probes for batch jobs ----------------
    async def count_tokens(self, req: NormalizedRequest) -> int:
        """``messages.count_tokens`` for a validated request (its model routed as the pipeline would), admitted
        against the count_tokens rate limit like the pipeline's own counts."""
        from runtime.errors import UpstreamError
        from runtime.router import route

        model = route(req.requested_model, req.params, self.settings).model
        ups = [u for u in self._upstreams if u.kind != "bedrock"]
        if self._upstreams and not ups:
            raise UpstreamError("no upstream of this runtime counts tokens (Bedrock has no count_tokens)",
                                request_id=req.request_id, status=None, error_type="not_supported")
        name = ups[0].name if ups else ""
        groups = (ups[0].group,) if ups else ()
        p = self._enter()   # its transports stay open until this count is done
        try:
            return await self._count_tokens(p.ports, req, model, name, groups)
        finally:
            self._leave(p)

    async def _count_tokens(self, ports: Ports, req: NormalizedRequest, model: str, name: str,
                            groups: tuple[str, ...]) -> int:
        from runtime.admission import COUNT_TOKENS_CLASS, NOT_SENT, Estimate, Outcome
        from runtime.errors import OverloadedAfterFallback, UpstreamError
        from runtime.errors import AuthenticationError as UpstreamAuthError
        from runtime.transport import CallFailed
        from runtime.usage import Usage

        e = Estimate(request_id=req.request_id, model_class=COUNT_TOKENS_CLASS, user_id=None,
                     priority=req.priority, input_tokens=0, max_output_tokens=0, groups=groups)
        grant = await ports.admission.acquire(e, deadline_s=req.deadline_s)
        transport = ports.transports[name] if name else ports.transport
        try:
            n = await transport.count_tokens(model, req.params)
        except CallFailed as f:
            ports.admission.reconcile(Outcome(grant.lease_id, None, f.status if f.sent == "yes" else NOT_SENT,
                                              f.headers, time.time()))
            common = dict(request_id=req.request_id, status=f.status, error_type=f.error_type, attempts=[])
            if f.status in (401, 403):
                raise UpstreamAuthError(f"{f.status} {f.error_type}: {f.message}", **common) from None
            if f.status in (0, 408, 409, 429) or f.status >= 500:
                raise OverloadedAfterFallback(f"count_tokens failed: {f.status} {f.error_type}: {f.message}",
                                              **common) from None
            raise UpstreamError(f"{f.status} {f.error_type}: {f.message}", **common) from None
        ports.admission.reconcile(Outcome(grant.lease_id, Usage(), 200, {}, time.time()))
        return n

    async def cache_probe(self, items: list[tuple[dict, str, str | None, bool]]) -> list[dict | None]:
        """For batch jobs: per (params, routed model, tenant, cache enabled), the cached answer as
        ``{"kind", "message", "saved_usd"}``, or None. Never waits for, nor keeps, a single-flight claim: a
        batch answers hours later, so the live path must not wait for it."""
        import asyncio

        if self._cache is None:
            return [None] * len(items)

        async def one(params: dict, model: str, tenant: str | None, enabled: bool) -> dict | None:
            out = await self._cache.lookup(params, model, tenant, cache_enabled=enabled, wait_s=0.0)
            if out.hit:
                return {"kind": out.kind, "message": out.message, "saved_usd": out.saved_usd}
            await self._cache.release(out)
            return None

        return list(await asyncio.gather(*(one(*it) for it in items)))

    async def cache_put(self, items: list[tuple[dict, str, str | None, dict, float]]) -> int:
        """For batch jobs: store answers (params, model, tenant, message, cost) the way a live miss stores
        its own; requests the cache bypasses (real-time prompts) are skipped. Returns how many were stored."""
        import asyncio

        from runtime import cache_policy as policy

        if self._cache is None:
            return 0
        cs = self.settings.cache

        async def one(params: dict, model: str, tenant: str | None, message: dict, cost: float) -> bool:
            if policy.bypass_reason(params, cs, True) is not None:
                return False
            from actors.cache import CacheOutcome

            outcome = CacheOutcome("miss", None, 0.0, key=policy.exact_key(params, model, tenant),
                                   scope_id=policy.scope_for(params, model, tenant).scope_id(), vector=None,
                                   leader=False, reason=None, prompt=policy.last_user_text(params),
                                   tenant=tenant or "", max_tokens=params.get("max_tokens"), model=model)
            return await self._cache.store(outcome, message, model, cost)

        return sum(await asyncio.gather(*(one(*it) for it in items)))


# the control group answers the pool (load, drain, spawn) even when every request slot is taken
RemoteCaller = ray.remote(concurrency_groups={CONTROL: 4})(CallerActor)
