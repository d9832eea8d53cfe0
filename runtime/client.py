"""The Runtime handle: ``start``, ``connect``, ``submit``, ``map``, spend queries, ``shutdown``.

The handle is small and picklable (actor handles plus settings), so tasks and actors anywhere in the cluster can
receive it, or call ``runtime.connect()`` to attach to the running singletons by name.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Iterable, Iterator

import ray

from runtime.errors import ConfigurationError, InvalidRequest
from runtime.request import validate
from runtime.settings import Settings

if TYPE_CHECKING:
    from runtime.result import Result

NAMESPACE = "claude_runtime"
CALLER_PREFIX = "caller-"
# a handle asks the pool for its callers this often, in the background; past callers.drain_grace_s / 2 without
# an answer it asks and waits, so it never routes to a caller the pool has stopped
_MEMBERS_REFRESH_S = 1.0
from runtime.upstreams import FAKE_API_KEY  # noqa: E402 - re-exported: tests and tools use it


_END = object()


async def _await_value(ref_or_exc: Any) -> Any:
    """A submitted request's result, or its typed error as a value."""
    if isinstance(ref_or_exc, BaseException):
        return ref_or_exc
    try:
        return await ref_or_exc
    except ray.exceptions.RayTaskError as exc:
        return exc.cause if getattr(exc, "cause", None) is not None else exc
    except Exception as exc:  # noqa: BLE001 - errors as values
        return exc


def _since_ts(since: float | str | datetime | None) -> float | None:
    """Accept unix seconds, a datetime, or a span like '7d', '12h', '30m'."""
    if since is None or isinstance(since, (int, float)):
        return since
    if isinstance(since, datetime):
        return since.timestamp()
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", since)
    if not m:
        raise ValueError(f"since must be unix seconds, a datetime or a span like '7d', not {since!r}")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return time.time() - float(m.group(1)) * unit


class Runtime:
    def __init__(self, settings: Settings, callers: list, limiter, ledger, cache=None, fake_api=None,
                 namespace: str = NAMESPACE, pool=None, placement_group=None, _fresh: bool = True,
                 local=None) -> None:
        if not callers:
            raise ConfigurationError("a runtime needs at least one caller actor")
        # the handle travels to tasks and actors: it keeps the secrets only in the process that has them
        self._secret_settings = settings if settings.configured_upstreams() else None
        self.settings = settings.without_secrets()
        self._callers = list(callers)
        self.limiter = limiter
        self.ledger = ledger
        self.cache = cache
        self.fake_api = fake_api
        self.namespace = namespace
        # the caller pool's manager (actors/pool.py): which callers are live and not draining
        self.pool = pool
        self._placement_group = placement_group
        self._members_at = time.monotonic() if _fresh else float("-inf")
        self._members_ref = None
        self._rr = itertools.count()
        # actors/inprocess.py: this process's own caller (Settings.callers.in_process), never pickled
        self._local = local

    @property
    def embedders(self) -> list:
        """The embedding pool's live replicas (its floor, plus any it grew to)."""
        from actors.embedder import find_replicas

        return list(find_replicas(self.settings).values())

    def __reduce__(self):  # the round-robin counter is per process, and no secret is pickled
        return (Runtime, (self.settings, self._callers, self.limiter, self.ledger, self.cache, self.fake_api,
                          self.namespace, self.pool, self._placement_group, False))

    # -- routing -------------------------------------------------------------------------------------------
    @property
    def callers(self) -> list:
        """The callers new requests go to: live and not draining (the pool's view, at most a second old)."""
        if self.pool is None:
            return self._callers
        now = time.monotonic()
        if self._members_ref is not None and ray.wait([self._members_ref[0]], timeout=0)[0]:
            (ref, asked_at), self._members_ref = self._members_ref, None
            self._take_members(ref, asked_at)
        # a list is as old as the question it answers: one asked for before an idle spell is stale when it
        # is read after it
        age = now - self._members_at
        if age >= self.settings.callers.drain_grace_s / 2:
            self._members_ref = None
            self._take_members(self.pool.members.remote(), now)
        elif age >= _MEMBERS_REFRESH_S and self._members_ref is None:
            self._members_ref = (self.pool.members.remote(), now)
        return self._callers

    def _take_members(self, ref: Any, asked_at: float) -> None:
        try:
            members = ray.get(ref, timeout=10)
        except Exception:  # noqa: BLE001 - the pool is restarting: keep the last list, ask again later
            members = None
        self._members_at = asked_at
        if members:
            self._callers = [h for _name, h in members]

    def _pick(self):
        callers = self.callers
        return callers[next(self._rr) % len(callers)]

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, request: dict[str, Any], *, user_id: str | None = None, tenant: str | None = None,
               priority: str = "normal", cache: bool = True, request_id: str | None = None,
               deadline_s: float | None = None, prompt_cache: bool | None = None) -> ray.ObjectRef:
        """Send one request; returns a ref to a ``runtime.Result``. Bad input raises ``InvalidRequest`` here,
        before anything is reserved or sent; every other failure is raised as a typed error by ``ray.get``.

        ``prompt_cache``: automatic ``cache_control`` on the request's stable prefixes (None: as
        ``Settings.prompt_caching`` says; False: send it exactly as given; True: place markers even when the
        settings say "off"). The response cache and the ledger see the request as given either way."""
        req = validate(request, self.settings, user_id=user_id, tenant=tenant, priority=priority, cache=cache,
                       request_id=request_id, deadline_s=deadline_s, prompt_cache=prompt_cache)
        return self.submit_validated(req)

    def submit_validated(self, req: Any) -> ray.ObjectRef:
        """``submit`` for a request already through ``runtime.request.validate`` (the front door validates
        first, to size a key's budget reservation, and need not do it twice)."""
        return self._pick().handle.remote(req)

    def call(self, request: dict[str, Any], **kwargs: Any) -> Result:
        """Send one request and wait for its ``Result``; same keyword arguments as ``submit`` (``deadline_s``
        bounds the wait). Failures are raised as the typed errors themselves. In the process that started the
        runtime with ``Settings.callers.in_process=True`` the pipeline runs here, with no Ray hop; elsewhere this
        is ``ray.get(rt.submit(...))``."""
        req = validate(request, self.settings, **kwargs)
        if self._local is not None:
            return self._local.call(req)
        ref = self.submit_validated(req)
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None

    async def acall(self, request: dict[str, Any], **kwargs: Any) -> Result:
        """``call``'s async twin: ``result = await rt.acall(request)``."""
        req = validate(request, self.settings, **kwargs)
        if self._local is not None:
            return await self._local.acall(req)
        try:
            return await self.submit_validated(req)
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None

    def stream(self, request: dict[str, Any], **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The answer as the API's stream events (``message_start``, ``content_block_delta``, ...,
        ``message_stop``), as dicts, through a Ray streaming generator; same keyword arguments as ``submit``.
        A cache hit streams too. Bad input raises ``InvalidRequest`` here; later failures are raised from the
        iteration, typed."""
        gen = self._stream_refs(request, kwargs)
        for ref in gen:
            yield self._unwrap(ref)

    async def astream(self, request: dict[str, Any], **kwargs: Any):
        """``stream``'s async twin: ``async for event in rt.astream(request): ...``."""
        async for event in self.astream_validated(validate(request, self.settings, streaming=True, **kwargs)):
            yield event

    def _stream_refs(self, request: dict[str, Any], kwargs: dict[str, Any]):
        return self._stream_validated(validate(request, self.settings, streaming=True, **kwargs))

    def _stream_validated(self, req: Any):
        return self._pick().handle_stream.options(num_returns="streaming").remote(req)

    async def astream_validated(self, req: Any):
        """``astream`` for a request already through ``validate(..., streaming=True)``."""
        async for ref in self._stream_validated(req):
            try:
                yield await ref
            except ray.exceptions.RayTaskError as exc:
                raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None

    @staticmethod
    def _unwrap(ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None

    def map(self, requests: Iterable[dict[str, Any]], *, max_in_flight: int = 256, progress: bool = True,
            request_id: str | None = None, **kwargs: Any) -> Iterator[Any]:
        """Results in input order, at most ``max_in_flight`` outstanding; a failure is yielded as its exception
        (errors as values), so one bad request never stops a job. ``request_id`` is a prefix: request i gets
        ``f"{request_id}-{i}"`` (ids must be unique per request)."""
        from tqdm.auto import tqdm

        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequest("request_id must be a string prefix", field="request_id")
        total = len(requests) if hasattr(requests, "__len__") else None
        window: deque[Any] = deque()
        bar = tqdm(total=total, disable=not progress, desc="claude-runtime", unit="req")
        it = enumerate(requests)
        try:
            for i, req in itertools.islice(it, max_in_flight):
                window.append(self._submit_value(req, kwargs, request_id, i))
            while window:
                head = window.popleft()
                yield self._get_value(head)
                bar.update(1)
                nxt = next(it, None)
                if nxt is not None:
                    window.append(self._submit_value(nxt[1], kwargs, request_id, nxt[0]))
        finally:
            bar.close()

    async def amap(self, requests: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]], *,
                   ordered: bool = False, max_in_flight: int = 256, request_id: str | None = None,
                   with_index: bool = False, **kwargs: Any) -> AsyncIterator[Any]:
        """``map``'s async twin for large inputs: ``async for res in rt.amap(requests): ...``.

        The input (an iterable or an async iterable, e.g. a generator over a file of 10M requests) is consumed
        lazily: at most ``max_in_flight`` requests are submitted and not yet yielded, so neither the input nor
        the answers pile up. Each result, or its typed error (errors as values), is yielded as soon as it
        completes (``ordered=False``), or in input order (``ordered=True``: a slow request then holds back
        the ones after it, and the window). ``with_index=True`` yields ``(i, value)``. ``request_id`` is a
        prefix, as in ``map``; other keyword arguments go to ``submit``."""
        import asyncio

        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequest("request_id must be a string prefix", field="request_id")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError("max_in_flight must be a positive integer")
        source = requests.__aiter__() if hasattr(requests, "__aiter__") else iter(requests)
        is_async = hasattr(source, "__anext__")
        pending: dict[asyncio.Future, int] = {}
        ready: dict[int, Any] = {}  # ordered: finished, waiting for the ones before them
        next_out = 0
        count = 0
        exhausted = False

        async def pull() -> Any:
            if is_async:
                try:
                    return await source.__anext__()
                except StopAsyncIteration:
                    return _END
            return next(source, _END)

        try:
            while True:
                while not exhausted and len(pending) + len(ready) < max_in_flight:
                    req = await pull()
                    if req is _END:
                        exhausted = True
                        break
                    ref = self._submit_value(req, kwargs, request_id, count)
                    pending[asyncio.ensure_future(_await_value(ref))] = count
                    count += 1
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finished = sorted((pending.pop(f), f.result()) for f in done) if ordered else \
                    [(pending.pop(f), f.result()) for f in done]
                for i, value in finished:
                    if not ordered:
                        yield (i, value) if with_index else value
                    else:
                        ready[i] = value
                while next_out in ready:
                    value = ready.pop(next_out)
                    yield (next_out, value) if with_index else value
                    next_out += 1
        finally:
            # the consumer left early: stop waiting (the requests themselves run on and are billed)
            for f in pending:
                f.cancel()

    def _submit_value(self, req: dict[str, Any], kwargs: dict[str, Any], prefix: str | None = None,
                      i: int = 0) -> Any:
        try:
            rid = f"{prefix}-{i}" if prefix is not None else None
            return self.submit(req, request_id=rid, **kwargs)
        except Exception as exc:  # noqa: BLE001 - errors as values
            return exc

    @staticmethod
    def _get_value(ref_or_exc: Any) -> Any:
        if isinstance(ref_or_exc, BaseException):
            return ref_or_exc
        try:
            return ray.get(ref_or_exc)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return cause
        except Exception as exc:  # noqa: BLE001
            return exc

    def submit_batch(self, requests: Iterable[dict[str, Any]], *, user_id: str | None = None,
                     tenant: str | None = None, priority: str = "bulk", poll_s: float = 2.0,
                     progress: bool = True, timeout_s: float = 24 * 3600.0) -> list[Any]:
        """Run offline work through the Message Batches API at the batch discount and wait for it: ``batch``
        (see there), then ``wait`` and ``results``. Past ``timeout_s`` the job is cancelled; what the API had
        already answered is kept.

        Every request is validated first (``InvalidRequest`` is raised before anything is sent); cache hits
        are answered at once; each request sent has its worst-case batch cost reserved against the budgets with
        a write-ahead intent (refused ones come back as ``BudgetExceeded``). Returns, in input order, a
        ``Result`` or a typed error per request; every billed result is in the ledger (``batch`` set) once.
        A batch the API certainly did not create releases its reservations and closes its intents, and this
        raises ``UpstreamError``."""
        job = self.batch(requests, user_id=user_id, tenant=tenant, priority=priority)
        if not job.wait(timeout_s, poll_s=poll_s, progress=progress):
            job.cancel()
            job.wait(poll_s=poll_s, progress=progress)
        return job.results(wait=False)

    def batch(self, requests: Iterable[dict[str, Any]], *, user_id: str | None = None, tenant: str | None = None,
              priority: str = "bulk", cache: bool = True, max_requests_per_batch: int | None = None,
              max_bytes_per_batch: int | None = None) -> Any:
        """Start a batch job (``runtime.batchjob.BatchJob``) and return once its batches are created: requests
        validated and kept under data_dir (``InvalidRequest`` first, nothing sent), cache hits answered at once,
        repeats inside the job answered from their first occurrence's answer, the rest sent as Message Batches
        split to the API's limits (100,000 requests or 256 MB each), budget-reserved with write-ahead intents.
        ``job.wait()`` collects and bills the results (from any driver: ``runtime.connect().batch_job(id)``
        resumes a job whose driver died, and nothing is lost or billed twice)."""
        from runtime.batch import MAX_BATCH_BYTES, MAX_BATCH_REQUESTS
        from runtime.batchjob import BatchJob

        job = BatchJob.create(self, requests, user_id=user_id, tenant=tenant, priority=priority, cache=cache,
                              max_requests_per_batch=max_requests_per_batch or MAX_BATCH_REQUESTS,
                              max_bytes_per_batch=max_bytes_per_batch or MAX_BATCH_BYTES)
        job.step()
        return job

    def batch_job(self, job_id: str) -> Any:
        """A handle on a batch job started by any driver (this one, or one that died): ``wait()`` resumes it."""
        from runtime.batchjob import BatchJob

        return BatchJob(self, job_id)

    def batch_jobs(self) -> list[dict[str, Any]]:
        """The batch jobs under data_dir, newest first (id, state, size)."""
        from runtime.batchjob import list_jobs

        return list_jobs(self.settings)

    def reconcile(self, *, billing: str | Path | None = None, admin_key: str | None = None,
                  min_age_s: float = 0.0) -> dict[str, Any]:
        """Settle the ledger's unreconciled rows against what the API really billed.

        Locally (the embedded or a standalone fake API) against its billing log: exact, per request and
        attempt. On the real API, with an Admin API key (``admin_key`` or ``ANTHROPIC_ADMIN_KEY``), against the
        Usage report: by day and model only, so unreconciled rows become ``estimated`` shares that make the
        ledger's totals equal the API's. See runtime/reconcile.py for what each proves."""
        from runtime import reconcile as rec

        self.flush()
        placeholders = ray.get(self.ledger.placeholders.remote())
        if admin_key is None and billing is None and self.fake_api is None:
            admin_key = os.environ.get("ANTHROPIC_ADMIN_KEY")
        if admin_key is not None and billing is None:
            billed_rows = ray.get(self.ledger.records.remote(None, None))
            buckets = rec.fetch_usage_report(self._base_url() or "https://api.anthropic.com", admin_key,
                                             since=min((p["ts"] for p in placeholders), default=time.time()) - 86400)
            plan = rec.plan_from_usage(placeholders, billed_rows, buckets, self.settings)
        else:
            if billing is not None:
                lines = rec.read_billing_lines(Path(billing))
            else:
                lines = ray.get(self.fake_api.billing_lines.remote())
            known = set(ray.get(self.ledger.message_ids.remote()))
            plan = rec.plan_from_billing(placeholders, known, lines, self.settings,
                                         min_age_s=min_age_s, now=time.time())
        applied = ray.get(self.ledger.apply_reconcile.remote(plan.changes)) if plan.changes else {"applied": 0}
        return {**plan.summary(), **applied}

    def _batch_upstream(self):
        """The Anthropic upstream that runs Message Batches (the first one configured)."""
        s = self._secret_settings or self.settings
        ups = [u for u in s.configured_upstreams() if u.kind == "anthropic"]
        return ups[0] if ups else None

    def _base_url(self) -> str | None:
        if self.fake_api is not None:
            return ray.get(self.fake_api.url.remote())
        u = self._batch_upstream() if self._secret_settings is not None else None
        if u is not None:
            return u.base_url
        return os.environ.get("ANTHROPIC_BASE_URL") or self.settings.base_url

    def _api_key(self) -> str:
        if self.fake_api is not None:
            return FAKE_API_KEY
        u = self._batch_upstream() if self._secret_settings is not None else None
        if u is not None and u.api_key is not None:
            return u.api_key.get_secret_value()
        key = os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ConfigurationError("this handle carries no API key (handles never pickle secrets): call from "
                                     "the process that started the runtime, or set ANTHROPIC_API_KEY here")
        return key

    # -- ledger queries ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Everything the callers journaled so far is in the ledger when this returns (the ledger's readers
        below call it first, so a result's row is there once the result is)."""
        if self._local is not None:
            self._local.flush()
        callers = self._callers
        if self.pool is not None:
            try:  # draining callers too: they may still hold journaled records
                callers = [h for _n, h in ray.get(self.pool.all_members.remote(), timeout=30)] or callers
            except ray.exceptions.RayError:
                pass
        try:
            ray.get([c.flush.remote() for c in callers], timeout=120)
        except ray.exceptions.RayActorError:
            pass  # a caller restarting drains its journal itself when it comes back

    def spend(self, since: float | str | datetime | None = None, by: str = "model") -> dict[str, float]:
        self.flush()
        if by not in ("model", "user", "tenant", "day", "upstream"):
            raise ValueError("by must be one of model, user, tenant, day, upstream")
        return ray.get(self.ledger.spend.remote(_since_ts(since), by))

    def budgets(self) -> dict[str, Any]:
        """Where every budget stands now: per budget its limit, settled spend, worst cases reserved in flight,
        their expected cost (from learned actual/worst-case ratios), requests waiting for room (count and
        worst-case USD) and state (normal / downgrade / stop); then the learned ratios per model and route."""
        return ray.get(self.ledger.budgets.remote())

    def ledger_records(self, since: float | str | datetime | None = None, limit: int | None = None) -> list[dict]:
        self.flush()
        return ray.get(self.ledger.records.remote(_since_ts(since), limit))

    def cache_feedback(self, request_id: str, *, wrong: bool = True) -> dict[str, Any]:
        """Tell the cache that the answer request ``request_id`` got was wrong (or, ``wrong=False``, right).
        Wrong: the cache entry that answered it (or that its answer became) is evicted, and its neighbours'
        own thresholds rise so the same question no longer reaches them. Returns {"request_id", "found",
        "evicted", "tightened"}; found is False once the request is older than the cache remembers
        (``CacheSettings.feedback_window`` requests)."""
        if self.cache is None:
            raise ConfigurationError("the cache is disabled (Settings.cache.enabled=False)")
        return ray.get(self.cache.feedback.remote(str(request_id), bool(wrong)))

    def prompt_cache_savings(self, since: float | str | datetime | None = None) -> dict[str, Any]:
        """What prompt caching did, from the ledger's billed rows: ``calls``, ``reads`` / ``writes`` (calls
        that read / wrote the cache), ``read_tokens``, ``write_tokens``, ``read_usd``, ``write_usd``,
        ``as_input_usd`` (the same tokens at the plain input price) and ``saved_usd`` (the difference), in
        total and ``by_model``."""
        self.flush()
        return ray.get(self.ledger.prompt_cache.remote(_since_ts(since)))

    def stats(self) -> dict[str, Any]:
        self.flush()
        out: dict[str, Any] = {"ledger": ray.get(self.ledger.stats.remote()), "budgets": self.budgets(),
                               "limiter": ray.get(self.limiter.snapshot.remote()),
                               # the cluster's prefix tracker: decisions by kind (a waiter's re-asks count
                               # each time), responses that wrote / read, writes freed unanswered
                               "prompt_cache": {"tracker": ray.get(self.limiter.prefix_stats.remote()),
                                                **ray.get(self.ledger.prompt_cache.remote(None))}}
        if self.cache is not None:
            out["cache"] = ray.get(self.cache.stats.remote())
        if self.fake_api is not None:
            out["fake_api"] = ray.get(self.fake_api.stats.remote())
        if self.cache is not None:
            from actors.embedder import find_replicas

            out["embedding"] = ray.get([h.stats.remote() for h in find_replicas(self.settings).values()])
        return out

    def status(self) -> dict[str, Any]:
        """What ``claude-runtime status`` shows (runtime/status.py): callers and their in-flight requests, live
        buckets, budgets, cache size, leases."""
        from runtime import status as status_view

        if self.pool is not None:
            out = ray.get(self.pool.snapshot.remote(), timeout=60)
        else:
            stats = self.stats()
            out = status_view.view(limiter=stats.get("limiter"), budgets={}, cache=stats.get("cache"), members=[])
        if self.fake_api is not None:
            out["fake_api"] = ray.get(self.fake_api.stats.remote())
        return out

    def shutdown(self) -> None:
        """Stop every actor of this runtime (they are detached: they outlive drivers until this is called)."""
        if self._local is not None:
            from actors.inprocess import forget

            self._local.close()
            forget(self.namespace)
            self._local = None
        if self.fake_api is not None:
            try:
                ray.get(self.fake_api.stop.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - best effort, it is killed next
                pass
        callers = list(self._callers)
        if self.pool is not None:
            try:  # every caller the pool knows, draining and newly spawned ones included
                callers += ray.get(self.pool.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the pool is gone: fall back to the names
                callers += _running_callers(self.namespace)
        for actor in [self.pool, *callers, self.limiter, self.ledger, self.cache, self.fake_api]:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        from actors.placement import remove_singleton_group

        remove_singleton_group(self._placement_group)
        # by name, after the callers: replicas they started when scaling up are in no list here
        from actors.embedder import stop_pool

        stop_pool(self.settings)


def namespace_for(name: str) -> str:
    """Each named runtime has its own namespace; the default one keeps the historical ``claude_runtime``."""
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigurationError(f"a runtime name is letters, digits, - and _, not {name!r}", field="name")
    return NAMESPACE if name == "default" else f"{NAMESPACE}-{name}"


def _settings_diff(running: Settings, wanted: Settings) -> list[str]:
    a, b = running.model_dump(mode="json"), wanted.model_dump(mode="json")
    for d in (a, b):  # whether a driver runs a caller of its own is that driver's choice, not the runtime's
        d.get("callers", {}).pop("in_process", None)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _source_limits(settings: Settings, ups: list) -> tuple[Settings, list]:
    """Read each upstream's configured limits from the Admin API where an admin key is given, instead of
    guessing; a failure keeps the configured values (and says so)."""
    import logging

    from runtime.admission import DEFAULT_GROUP
    from runtime.upstreams import fetch_rate_limits, limits_from_rate_limits_api

    out = []
    for u in ups:
        if u.kind == "anthropic" and u.admin_api_key is not None:
            try:
                fetched = limits_from_rate_limits_api(fetch_rate_limits(u), settings.models)
            except Exception as exc:  # noqa: BLE001 - start with the configured limits
                logging.getLogger("claude_runtime").warning(
                    "could not read rate limits for upstream %s (%s): using the configured ones", u.name,
                    type(exc).__name__)
                fetched = {}
            if fetched:
                if u.group == DEFAULT_GROUP:
                    settings = settings.model_copy(update={"limits": {**settings.limits, **fetched}})
                else:
                    u = u.model_copy(update={"limits": {**(u.limits or settings.limits), **fetched}})
        out.append(u)
    return settings, out


def start(settings: Settings | None = None, *, name: str = "default", reconfigure: bool = False,
          fake_api_overrides: dict[str, Any] | None = None) -> Runtime:
    """Create (or attach to) a runtime's singletons and callers.

    It calls the upstreams in ``settings`` (``upstreams``, or the ``api_key`` / ``base_url`` shorthand, read from
    ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL). The embedded local API is used only when asked for
    (``Settings(fake_api=True)`` or ``CLAUDE_RUNTIME_FAKE_API=1``); with neither, this raises
    ``ConfigurationError`` rather than answer with made-up text.

    A runtime of the same ``name`` already running with other settings is an error, unless
    ``reconfigure=True``: then its limits, budgets and upstreams change live. Another ``name`` starts a second,
    independent runtime (its own actors, namespace and, by default, its own folder under ``data_dir``)."""
    from actors.cache import get_or_create_cache
    from actors.caller import RemoteCaller, caller_options, secrets_fingerprint
    from actors.embedder import start_pool
    from actors.fake_api import get_or_create_fake_api
    from actors.ledger import get_or_create_ledger
    from actors.limiter import get_or_create_limiter
    from actors.placement import check_state_paths, singleton_placement
    from actors.pool import find_pool, get_or_create_pool
    from runtime.placement import caller_nodes
    from runtime.upstreams import limit_groups, resolve

    settings = settings or Settings()
    namespace = namespace_for(name)
    # the embedding pool lives in the runtime's namespace; its clients (callers, the cache) find it through this
    settings = settings.model_copy(update={"embedding": settings.embedding.model_copy(
        update={"namespace": namespace})})
    if not settings.uses_fake_api and not settings.configured_upstreams():
        raise ConfigurationError(
            "no upstream to call: set ANTHROPIC_API_KEY (or Settings(api_key=..., upstreams=[...])) to call Claude, "
            "or opt in to the embedded local API with Settings(fake_api=True) / CLAUDE_RUNTIME_FAKE_API=1 for "
            "development and tests", field="upstreams")
    if name != "default" and settings.ledger.path is None and settings.cache.path is None:
        settings = settings.model_copy(update={"data_dir": settings.data_dir / name})
    if not ray.is_initialized():
        ray.init()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # the singletons keep their files (ledger, cache table) on their node's disk: they go where
    # settings.placement says (the head by default) and stay there, so a restart finds its files
    check_state_paths(settings)
    here, home, group = singleton_placement(settings, namespace)
    fake = None
    fake_url = None
    if settings.uses_fake_api:
        fake = get_or_create_fake_api(settings.without_secrets(), fake_api_overrides, scheduling_strategy=here,
                                      namespace=namespace)
        fake_url = ray.get(fake.url.remote())
    ups = resolve(settings, fake_url=fake_url)
    settings, ups = _source_limits(settings, ups)
    groups, weights = limit_groups(settings, ups)
    # the singletons never call the API: none of them receives a key (the ledger keeps the alert webhook)
    public = settings.without_secrets()
    pool = find_pool(namespace)
    running = [h for _n, h in ray.get(pool.all_members.remote())] if pool is not None else []
    running = running or _running_callers(namespace)
    if running:
        old = ray.get(running[0].get_settings.remote())
        diff = _settings_diff(old, public)
        if ray.get(running[0].fingerprint.remote()) != secrets_fingerprint(ups):
            diff.append("credentials")
        if diff and not reconfigure:
            raise ConfigurationError(
                f"a runtime named {name!r} is already running with different settings ({', '.join(diff)}): pass "
                "reconfigure=True to apply them live, or start another runtime with name=...", field=diff[0])
    limiter = get_or_create_limiter(public, scheduling_strategy=here, namespace=namespace, groups=groups,
                                    group_weights=weights)
    ledger = get_or_create_ledger(settings.without_secrets(keep_webhook=True), scheduling_strategy=here,
                                  namespace=namespace)
    cache = get_or_create_cache(public, scheduling_strategy=here, namespace=namespace) if settings.cache.enabled else None
    # the embedding pool owns the model (callers never load it); stateless, so not pinned: Ray places it
    # where its num_cpus / num_gpus fit
    if settings.cache.enabled:
        start_pool(public)
    pool = get_or_create_pool(public, namespace=namespace, scheduling_strategy=here)
    # the floor of the pool, round-robin over the worker nodes (every node when there is only one); soft
    # affinity, so a caller whose node dies restarts on another one. The pool adds and drains the rest
    nodes = caller_nodes(ray.nodes(), {home} if home else set(), settings.placement.callers)
    names = [f"{CALLER_PREFIX}{i}" for i in range(settings.callers.num_callers)]
    callers = [
        RemoteCaller.options(**caller_options(public, n, namespace, nodes[i % len(nodes)])).remote(
            public, ups, limiter, ledger, cache, n)
        for i, n in enumerate(names)
    ]
    ray.get([c.ready.remote() for c in callers])
    if running and reconfigure:
        ray.get(limiter.set_limits.remote(dict(public.limits), dict(public.user_limits), public.limiter, groups,
                                          weights))
        ray.get(ledger.reconfigure.remote(settings.without_secrets(keep_webhook=True)))
        members = {c._actor_id: c for c in [*callers, *running]}
        ray.get([c.reconfigure.remote(public, ups) for c in members.values()])
        # a lower ceiling drains the callers above it (they finish what they hold first)
        ray.get(pool.configure.remote(public))
    ray.get(pool.adopt.remote(names))
    local = None
    if settings.callers.in_process:
        from actors.inprocess import local_caller

        local = local_caller(namespace, public, ups, limiter, ledger, cache, reconfigure=bool(running and reconfigure),
                             pool=pool)
    return Runtime(settings, callers, limiter, ledger, cache, fake, namespace, pool, group, local=local)


def _running_callers(namespace: str) -> list:
    out = []
    for i in itertools.count():
        try:
            out.append(ray.get_actor(f"{CALLER_PREFIX}{i}", namespace=namespace))
        except ValueError:
            return out


def connect(name: str = "default") -> Runtime:
    """Attach to a running runtime from any driver, task or actor in the cluster."""
    if not ray.is_initialized():
        ray.init(address="auto")
    from actors.placement import find_singleton_group
    from actors.pool import find_pool

    namespace = namespace_for(name)
    pool = find_pool(namespace)
    callers = [h for _n, h in ray.get(pool.members.remote())] if pool is not None else []
    callers = callers or _running_callers(namespace)
    if not callers:
        raise ConfigurationError(f"no running claude-runtime named {name!r} found: call runtime.start() first")
    settings = ray.get(callers[0].get_settings.remote())

    def opt(actor: str):
        try:
            return ray.get_actor(actor, namespace=namespace)
        except ValueError:
            return None

    return Runtime(settings, callers, opt("limiter"), opt("ledger"), opt("cache"), opt("fake_api"), namespace, pool,
                   find_singleton_group(namespace))
