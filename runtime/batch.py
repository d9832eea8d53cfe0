"""The offline path: many requests as one Message Batch, billed at the batch discount.

Pure pieces (no Ray, no network): how a validated request becomes a batch entry, and how a batch result
becomes a ledger ``Record`` and a ``Result`` or a typed error. ``Runtime.submit_batch`` does the I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from runtime.errors import ClaudeRuntimeError, UpstreamError
from runtime.pricing import price
from runtime.records import Record
from runtime.request import NormalizedRequest
from runtime.result import Result
from runtime.settings import Settings
from runtime.usage import Usage


@dataclass
class BatchItem:
    request: NormalizedRequest
    model: str
    reason: str
    attempt: int = 1  # assigned by the ledger's begin


def batch_entry(item: BatchItem) -> dict[str, Any]:
    # the request id doubles as custom_id (it fits the API's ^[a-zA-Z0-9_-]{1,64}$)
    return {"custom_id": item.request.request_id, "params": {"model": item.model, **item.request.params}}


def settle(item: BatchItem, result: Any, settings: Settings, started: float
           ) -> tuple[Record, Result | ClaudeRuntimeError]:
    """One batch result (``MessageBatchIndividualResponse.result``) -> its ledger record and what the user gets."""
    req = item.request
    latency = time.time() - started
    kind = getattr(result, "type", "errored")
    common = dict(request_id=req.request_id, attempt=item.attempt, ts=time.time(), user_id=req.user_id, tenant=req.tenant,
                  priority=req.priority, model=item.model, latency_s=latency, attempts=1, batch=True,
                  environment=settings.environment, cache="bypass")
    if kind == "succeeded":
        message = result.message
        usage = Usage.from_api(message.usage)
        cost = price(usage, item.model, settings, batch=True)
        record = Record(message_id=message.id, usage=usage, cost=cost, saved_usd=0.0, status="ok",
                        error_type=None, **common)
        return record, Result(message=message, model=item.model, cache="bypass", cost_usd=cost.total_usd,
                              attempts=1, latency_s=latency, request_id=req.request_id, route_reason=item.reason,
                              user_id=req.user_id, tenant=req.tenant,
                              history=[{"model": item.model, "status": 200, "batch": True}])
    error = getattr(result, "error", None)
    inner = getattr(error, "error", None)
    etype = getattr(inner, "type", None) or kind
    message = getattr(inner, "message", None) or f"batch request {kind}"
    # an errored, canceled or expired batch request is not billed: its intent is void
    record = Record(message_id=None, usage=Usage(), cost=None, saved_usd=0.0, status="error", error_type=etype,
                    void_attempts=(item.attempt,), **common)
    return record, UpstreamError(f"batch {kind}: {etype}: {message}", request_id=req.request_id, status=None,
                                 error_type=etype, attempts=[{"model": item.model, "status": kind}])


# -- batch jobs: the pure parts (runtime/batchjob.py drives them) ---------------------------------------------------

# the Message Batches API's limits per batch (shared/README.md)
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
_BODY_OVERHEAD = 64  # {"requests":[...]} around the entries


def entry_size(entry: dict[str, Any]) -> int:
    """Bytes one entry adds to the create request's JSON body (with its separating comma)."""
    import json

    return len(json.dumps(entry, separators=(",", ":")).encode()) + 1


def plan_chunks(sizes: list[int], max_requests: int = MAX_BATCH_REQUESTS, max_bytes: int = MAX_BATCH_BYTES
                ) -> list[tuple[int, int]]:
    """Split entries (in order, by their ``entry_size``) into consecutive [start, end) runs that each fit one
    batch: at most ``max_requests`` entries and ``max_bytes`` of body. An entry too big for any batch is an
    ``InvalidRequest``: the API would refuse the whole batch for it."""
    from runtime.errors import InvalidRequest

    if max_requests < 1 or max_bytes <= _BODY_OVERHEAD:
        raise ValueError("max_requests must be >= 1 and max_bytes larger than the body's wrapper")
    out: list[tuple[int, int]] = []
    start, used = 0, _BODY_OVERHEAD
    for i, size in enumerate(sizes):
        if size + _BODY_OVERHEAD > max_bytes:
            raise InvalidRequest(f"request {i} is {size} bytes, more than a batch may carry ({max_bytes})",
                                 field="request")
        if i > start and (i - start >= max_requests or used + size > max_bytes):
            out.append((start, i))
            start, used = i, _BODY_OVERHEAD
        used += size
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def orphan_batch(listed: list[dict[str, Any]], known: set[str], n_requests: int, since_ts: float,
                 slack_s: float = 60.0) -> str | None:
    """A batch the API created for a chunk whose driver died before recording its id: among the listed
    batches (``id``, ``created_at`` as unix seconds, ``total`` requests), the one unknown to the ledger, with the
    chunk's size, created after the chunk started to be sent. None when there is no such batch, or more than one
    (then which is ours cannot be told, and the chunk is sent again; reconcile settles any double)."""
    found = [b["id"] for b in listed
             if b["id"] not in known and b["total"] == n_requests and b["created_at"] >= since_ts - slack_s]
    return found[0] if len(found) == 1 else None


def outcome_line(i: int, value: Any) -> dict[str, Any]:
    """One request's final answer as a JSON-able line of a job's outcomes file."""
    if isinstance(value, Result):
        return {"i": i, "ok": True, "message": value.message.model_dump(mode="json"), "model": value.model,
                "cache": value.cache, "cost_usd": value.cost_usd, "attempts": value.attempts,
                "latency_s": value.latency_s, "request_id": value.request_id, "saved_usd": value.saved_usd,
                "route_reason": value.route_reason, "user_id": value.user_id, "tenant": value.tenant,
                "upstream": value.upstream, "history": value.history}
    fields = getattr(value, "fields", {}) or {}
    return {"i": i, "ok": False, "error": type(value).__name__, "message": getattr(value, "message", str(value)),
            "request_id": getattr(value, "request_id", None), "fields": fields}


def outcome_value(line: dict[str, Any]) -> Any:
    """The ``Result`` or typed error an outcomes line stands for."""
    from runtime import errors

    if line["ok"]:
        import anthropic

        return Result(message=anthropic.types.Message.model_validate(line["message"]), model=line["model"],
                      cache=line["cache"], cost_usd=line["cost_usd"], attempts=line["attempts"],
                      latency_s=line["latency_s"], request_id=line["request_id"], saved_usd=line["saved_usd"],
                      route_reason=line["route_reason"], user_id=line["user_id"], tenant=line["tenant"],
                      upstream=line.get("upstream"), history=line.get("history") or [])
    cls = getattr(errors, line["error"], None)
    if not (isinstance(cls, type) and issubclass(cls, ClaudeRuntimeError)):
        cls = errors.RequestLost
    err = cls.__new__(cls)
    ClaudeRuntimeError.__init__(err, line["message"], request_id=line["request_id"], **(line.get("fields") or {}))
    return err
