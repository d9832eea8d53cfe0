"""What the request pipeline tells the outside world: the observer port and the per-request log line.

The pipeline calls an ``Observer`` at a few points (a request answered or failed, admission granted, an attempt
that failed); ``actors/metrics.py`` implements it with ``ray.util.metrics`` and a JSON log line, tests with a
list. An observer must never fail a request: the pipeline swallows (and logs) whatever it raises.

The log line is built from a fixed list of fields (ids, model, cache, attempts, tokens, cost, latency), never
from the request or the message, so a prompt, a response or a key cannot reach the logs through it.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from runtime.usage import Usage


class Observer(Protocol):
    def on_result(self, req: Any, result: Any) -> None:
        """A request answered (from the API or the cache)."""

    def on_error(self, req: Any, exc: BaseException, latency_s: float) -> None:
        """A request that ended in an error (typed or not)."""

    def on_admission(self, model_class: str, priority: str, wait_s: float, delayed: bool) -> None:
        """A grant in hand after ``wait_s``; ``delayed``: the limiter held the request back (capacity was not
        there when it asked), i.e. a 429 the server did not have to send."""

    def on_attempt_failed(self, model: str, upstream: str, status: int) -> None:
        """One call that failed (429, 529, 5xx, 0 for no answer, ...), whether or not another attempt follows."""


def fallbacks(history: list[dict[str, Any]]) -> int:
    """How many times a request moved on to another model or upstream after a failure."""
    tried = [(h.get("model"), h.get("upstream")) for h in history if h.get("status") != "circuit_open"]
    return sum(1 for a, b in zip(tried, tried[1:]) if a != b)


def usage_of(result: Any) -> Usage:
    message = getattr(result, "message", None)
    u = getattr(message, "usage", None)
    if u is None or getattr(result, "cache", "") in ("exact", "semantic"):
        return Usage()  # a cache hit was not billed: its message carries the original call's usage
    return Usage.from_api(u)


def result_line(req: Any, result: Any) -> dict[str, Any]:
    """The log record of an answered request: counts and ids only."""
    u = usage_of(result)
    message = getattr(result, "message", None)
    return {
        "event": "request", "outcome": "ok", "request_id": result.request_id,
        "message_id": getattr(message, "id", None), "user_id": result.user_id, "tenant": result.tenant,
        "priority": getattr(req, "priority", None), "requested_model": getattr(req, "requested_model", None),
        "model": result.model, "upstream": result.upstream, "cache": result.cache, "attempts": result.attempts,
        "fallbacks": fallbacks(result.history), "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
        "cache_read_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens,
        "cost_usd": round(float(result.cost_usd), 8), "saved_usd": round(float(result.saved_usd), 8),
        "latency_s": round(float(result.latency_s), 4),
    }


def error_line(req: Any, exc: BaseException, latency_s: float) -> dict[str, Any]:
    """The log record of a failed request: the error's type and status, never its message (an upstream's
    error text may quote the request)."""
    fields = getattr(exc, "fields", {}) or {}
    history = fields.get("attempts") if isinstance(fields.get("attempts"), list) else []
    return {
        "event": "request", "outcome": "error", "request_id": getattr(req, "request_id", None),
        "user_id": getattr(req, "user_id", None), "tenant": getattr(req, "tenant", None),
        "priority": getattr(req, "priority", None), "requested_model": getattr(req, "requested_model", None),
        "error_type": type(exc).__name__, "status": fields.get("status"), "attempts": len(history),
        "fallbacks": fallbacks(history), "latency_s": round(float(latency_s), 4),
    }


def dumps(line: dict[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":"), sort_keys=True, default=str)
