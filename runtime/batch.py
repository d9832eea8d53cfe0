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
