"""Metrics through ``ray.util.metrics`` (exported on each node's Prometheus endpoint, every name prefixed
``ray_`` by Ray) and the JSON log line per request.

``RequestObserver`` is the pipeline's observer port (runtime/observe.py) in a caller process: counters and
histograms per request, and one log line. ``GaugeExporter`` runs in the pool manager and sets the gauges that
are read from the singletons (buckets, budgets, cache size, callers). Metric objects are made once per process
(``_metrics()``); every caller on a node reports through its node's metrics agent.

    requests        claude_runtime_requests_total{model,upstream,outcome,cache}
    tokens          claude_runtime_tokens_total{model,kind}          kind: input|output|cache_read|cache_write
    money           claude_runtime_spend_usd_total{model,upstream}, claude_runtime_saved_usd_total{model,cache}
    limiter         claude_runtime_limiter_wait_seconds{model_class,priority} (histogram),
                    claude_runtime_429s_prevented_total{model_class,priority},
                    claude_runtime_429s_received_total{model,upstream},
                    claude_runtime_attempt_failures_total{model,upstream,status},
                    claude_runtime_fallbacks_total{model}
    latency         claude_runtime_latency_seconds{model,cache,outcome} (histogram)
    gauges          claude_runtime_budget_used_ratio{budget}, claude_runtime_budget_spent_usd{budget},
                    claude_runtime_bucket_level_ratio{bucket}, claude_runtime_cache_entries,
                    claude_runtime_callers{state}, claude_runtime_in_flight
"""

from __future__ import annotations

import logging
import os
import sys
from logging.handlers import RotatingFileHandler
from typing import Any

from runtime.observe import dumps, error_line, fallbacks, result_line, usage_of

PREFIX = "claude_runtime_"
REQUEST_LOG = "claude_runtime.requests"
REQUEST_LOG_FILE_PREFIX = "claude_runtime_requests-"  # + pid + ".jsonl", in the node's Ray logs folder

_METRICS: dict[tuple[float, ...], dict[str, Any]] = {}


def _metrics(buckets: tuple[float, ...]) -> dict[str, Any]:
    """This process's metric objects (Ray registers each name once per process)."""
    got = _METRICS.get(buckets)
    if got is not None:
        return got
    from ray.util.metrics import Counter, Gauge, Histogram

    b = list(buckets)
    m = {
        "requests": Counter(PREFIX + "requests_total", "requests by model, upstream, outcome and cache kind",
                            tag_keys=("model", "upstream", "outcome", "cache")),
        "tokens": Counter(PREFIX + "tokens_total", "billed tokens by model and kind",
                          tag_keys=("model", "kind")),
        "spend": Counter(PREFIX + "spend_usd_total", "USD billed", tag_keys=("model", "upstream")),
        "saved": Counter(PREFIX + "saved_usd_total", "USD the cache saved", tag_keys=("model", "cache")),
        "wait": Histogram(PREFIX + "limiter_wait_seconds", "time from asking the limiter to a grant", boundaries=b,
                          tag_keys=("model_class", "priority")),
        "prevented": Counter(PREFIX + "429s_prevented_total",
                             "requests the limiter held back instead of letting the server refuse them",
                             tag_keys=("model_class", "priority")),
        "received": Counter(PREFIX + "429s_received_total", "429s the API sent", tag_keys=("model", "upstream")),
        "failures": Counter(PREFIX + "attempt_failures_total", "failed API calls by status",
                            tag_keys=("model", "upstream", "status")),
        "fallbacks": Counter(PREFIX + "fallbacks_total", "moves to another model or upstream after a failure",
                             tag_keys=("model",)),
        "latency": Histogram(PREFIX + "latency_seconds", "request latency inside the runtime", boundaries=b,
                             tag_keys=("model", "cache", "outcome")),
        # gauges, set by the pool manager from the singletons' state
        "budget_ratio": Gauge(PREFIX + "budget_used_ratio", "settled spend / budget", tag_keys=("budget",)),
        "budget_usd": Gauge(PREFIX + "budget_spent_usd", "settled spend this period", tag_keys=("budget",)),
        "bucket": Gauge(PREFIX + "bucket_level_ratio", "limiter bucket level / capacity", tag_keys=("bucket",)),
        "cache_entries": Gauge(PREFIX + "cache_entries", "rows in the response cache"),
        "callers": Gauge(PREFIX + "callers", "caller actors by state", tag_keys=("state",)),
        "in_flight": Gauge(PREFIX + "in_flight", "requests in flight on the callers"),
    }
    _METRICS[buckets] = m
    return m


def _request_logger(to: str) -> logging.Logger:
    log = logging.getLogger(REQUEST_LOG)
    if not log.handlers:
        # its own handler: a Ray worker's root logger drops INFO, and these lines are the point
        h = _log_handler(to)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _log_handler(to: str) -> logging.Handler:
    """"file": a rotating file in this node's Ray session logs (what ``ray logs``, the dashboard and a log
    shipper on /tmp/ray/session_latest/logs read). Ray forwards workers' stderr to the driver, so "stderr" would
    print a line per request into the user's console (or notebook, over the progress bar)."""
    if to == "file":
        try:
            from ray._private.worker import _global_node

            logs = _global_node.get_logs_dir_path() if _global_node is not None else None
        except Exception:  # noqa: BLE001 - not a Ray worker: stderr below
            logs = None
        if logs:
            path = os.path.join(logs, f"{REQUEST_LOG_FILE_PREFIX}{os.getpid()}.jsonl")
            return RotatingFileHandler(path, maxBytes=100 << 20, backupCount=3, encoding="utf-8")
    return logging.StreamHandler(sys.stderr)


class RequestObserver:
    """The pipeline's observer in a caller: metrics (``settings.observability.metrics``) and the request log
    line (``settings.observability.request_log``)."""

    def __init__(self, settings: Any) -> None:
        o = settings.observability
        self._m = _metrics(tuple(o.latency_buckets_s)) if o.metrics else None
        self._log = _request_logger(o.request_log_to) if o.request_log else None

    def on_result(self, req: Any, result: Any) -> None:
        if self._log is not None:
            self._log.info(dumps(result_line(req, result)))
        m = self._m
        if m is None:
            return
        model, up = result.model or "none", result.upstream or "none"
        m["requests"].inc(1, {"model": model, "upstream": up, "outcome": "ok", "cache": result.cache})
        m["latency"].observe(float(result.latency_s), {"model": model, "cache": result.cache, "outcome": "ok"})
        u = usage_of(result)
        for kind, n in (("input", u.input_tokens), ("output", u.output_tokens),
                        ("cache_read", u.cache_read_tokens), ("cache_write", u.cache_write_tokens)):
            if n:
                m["tokens"].inc(n, {"model": model, "kind": kind})
        if result.cost_usd:
            m["spend"].inc(float(result.cost_usd), {"model": model, "upstream": up})
        if result.saved_usd:
            m["saved"].inc(float(result.saved_usd), {"model": model, "cache": result.cache})
        n = fallbacks(result.history)
        if n:
            m["fallbacks"].inc(n, {"model": model})

    def on_error(self, req: Any, exc: BaseException, latency_s: float) -> None:
        if self._log is not None:
            self._log.info(dumps(error_line(req, exc, latency_s)))
        m = self._m
        if m is None:
            return
        model = getattr(req, "requested_model", None) or "none"
        outcome = type(exc).__name__
        m["requests"].inc(1, {"model": model, "upstream": "none", "outcome": outcome, "cache": "none"})
        m["latency"].observe(float(latency_s), {"model": model, "cache": "none", "outcome": outcome})

    def on_admission(self, model_class: str, priority: str, wait_s: float, delayed: bool) -> None:
        m = self._m
        if m is None:
            return
        tags = {"model_class": model_class, "priority": priority}
        m["wait"].observe(max(0.0, float(wait_s)), tags)
        if delayed:
            m["prevented"].inc(1, tags)

    def on_attempt_failed(self, model: str, upstream: str, status: int) -> None:
        m = self._m
        if m is None:
            return
        up = upstream or "none"
        m["failures"].inc(1, {"model": model, "upstream": up, "status": str(status)})
        if status == 429:
            m["received"].inc(1, {"model": model, "upstream": up})


class GaugeExporter:
    """Sets the gauges from a status snapshot (``runtime.status.collect``'s dict)."""

    def __init__(self, settings: Any) -> None:
        o = settings.observability
        self._m = _metrics(tuple(o.latency_buckets_s)) if o.metrics else None

    def export(self, snap: dict[str, Any]) -> None:
        m = self._m
        if m is None:
            return
        for name, b in (snap.get("budgets") or {}).items():
            if b.get("limit_usd"):
                m["budget_ratio"].set(float(b["settled_usd"]) / float(b["limit_usd"]), {"budget": name})
            m["budget_usd"].set(float(b.get("settled_usd") or 0.0), {"budget": name})
        for name, ratio in (snap.get("bucket_levels") or {}).items():
            m["bucket"].set(float(ratio), {"bucket": name})
        cache = snap.get("cache") or {}
        if "entries" in cache:
            m["cache_entries"].set(float(cache["entries"]))
        pool = snap.get("callers") or {}
        if pool:
            m["callers"].set(float(pool.get("active", 0)), {"state": "active"})
            m["callers"].set(float(pool.get("draining", 0)), {"state": "draining"})
            m["in_flight"].set(float(pool.get("in_flight", 0)))
