"""The ledger's unit: one Record per billed response, per cache hit and per failed request.

Why three kinds of row: billed rows are the money; cache-hit rows carry the money a hit saved; failure rows
let error rates be computed from the same table.

Identity (what makes a retried write count once):
  * a billed row is (request_id, message_id): the API's message id names the response that was paid for, so
    a request re-run after its caller died, billed again under a new message id, keeps both rows (both were
    paid for), while a second write of the same response is a duplicate;
  * a hit or failure row has no message id, so it is (request_id, attempt, status, cache);
  * an unreconciled row (and what reconcile makes of it) is (request_id, attempt): one call, one placeholder.
    A billed row for the same (request_id, attempt) supersedes it: the ledger deletes the placeholder when
    the real answer arrives late.

Records never hold prompt text, responses or keys: only ids, counts, money and an error *type*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.pricing import CostBreakdown
from runtime.usage import Usage

CACHE_KINDS = ("miss", "exact", "semantic", "bypass")
# ok: a response the runtime received (or a cache hit); error: a request that ended in a typed error;
# unreconciled: an attempt that may have been billed but whose answer never arrived (its caller died, or the
# call timed out after the send), priced at that attempt's reservation; reconciled: such a row matched to the
# API's bill; void: such a row the bill proved unpaid; estimated: priced from the API's aggregate usage report
STATUSES = ("ok", "error", "unreconciled", "reconciled", "void", "estimated")
PLACEHOLDER_STATUSES = ("unreconciled", "reconciled", "void", "estimated")

# flat column order for storage; the ledger's table and the report read these names
ROW_COLUMNS: tuple[str, ...] = (
    "ident", "request_id", "attempt", "message_id", "ts", "user_id", "tenant", "priority", "model",
    "input_tokens", "output_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_read_tokens",
    "cost_input_usd", "cost_output_usd", "cost_cache_write_usd", "cost_cache_read_usd", "cost_usd",
    "cache", "saved_usd", "latency_s", "attempts", "status", "error_type", "batch", "environment", "upstream",
)


@dataclass
class Record:
    request_id: str
    attempt: int
    message_id: str | None
    ts: float
    user_id: str | None
    tenant: str | None
    priority: str
    model: str | None
    usage: Usage = field(default_factory=Usage)
    cost: CostBreakdown | None = None
    cache: str = "miss"
    saved_usd: float = 0.0
    latency_s: float = 0.0
    attempts: int = 1
    status: str = "ok"
    error_type: str | None = None
    batch: bool = False
    environment: str = "dev"
    upstream: str | None = None  # which upstream billed it ("fake-api": the embedded local API, not Claude)
    # attempts of this request that certainly were not billed (refused, never sent, answered with an error
    # status): the record closes their write-ahead intents. Not a column.
    void_attempts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.cache not in CACHE_KINDS:
            raise ValueError(f"Record.cache must be one of {CACHE_KINDS}, not {self.cache!r}")
        if self.status not in STATUSES:
            raise ValueError(f"Record.status must be one of {STATUSES}, not {self.status!r}")
        if isinstance(self.usage, dict):
            self.usage = Usage(**self.usage)
        if isinstance(self.cost, dict):
            self.cost = CostBreakdown.from_dict(self.cost)

    @property
    def cost_usd(self) -> float:
        return self.cost.total_usd if self.cost is not None else 0.0

    @property
    def billed(self) -> bool:
        return self.message_id is not None

    @property
    def ident(self) -> str:
        """The idempotency key (see the module docstring)."""
        if self.message_id is not None:
            return f"m|{self.request_id}|{self.message_id}"
        if self.status in PLACEHOLDER_STATUSES:
            return f"u|{self.request_id}|{self.attempt}"
        return f"a|{self.request_id}|{self.attempt}|{self.status}|{self.cache}"

    def to_row(self) -> dict[str, Any]:
        u, c = self.usage, self.cost
        return {
            "ident": self.ident, "request_id": self.request_id, "attempt": int(self.attempt),
            "message_id": self.message_id, "ts": float(self.ts), "user_id": self.user_id, "tenant": self.tenant,
            "priority": self.priority, "model": self.model,
            "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "cache_write_5m_tokens": u.cache_write_5m_tokens, "cache_write_1h_tokens": u.cache_write_1h_tokens,
            "cache_read_tokens": u.cache_read_tokens,
            "cost_input_usd": c.input_usd if c else None, "cost_output_usd": c.output_usd if c else None,
            "cost_cache_write_usd": c.cache_write_usd if c else None,
            "cost_cache_read_usd": c.cache_read_usd if c else None,
            "cost_usd": c.total_usd if c else None,
            "cache": self.cache, "saved_usd": float(self.saved_usd), "latency_s": float(self.latency_s),
            "attempts": int(self.attempts), "status": self.status, "error_type": self.error_type,
            "batch": bool(self.batch), "environment": self.environment, "upstream": self.upstream,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Record":
        usage = Usage(
            input_tokens=int(row.get("input_tokens") or 0), output_tokens=int(row.get("output_tokens") or 0),
            cache_write_5m_tokens=int(row.get("cache_write_5m_tokens") or 0),
            cache_write_1h_tokens=int(row.get("cache_write_1h_tokens") or 0),
            cache_read_tokens=int(row.get("cache_read_tokens") or 0),
        )
        cost = None
        if row.get("cost_usd") is not None:
            cost = CostBreakdown(
                float(row.get("cost_input_usd") or 0.0), float(row.get("cost_output_usd") or 0.0),
                float(row.get("cost_cache_write_usd") or 0.0), float(row.get("cost_cache_read_usd") or 0.0),
                float(row["cost_usd"]), bool(row.get("batch")),
            )
        return cls(
            request_id=row["request_id"], attempt=int(row.get("attempt") or 0), message_id=row.get("message_id"),
            ts=float(row["ts"]), user_id=row.get("user_id"), tenant=row.get("tenant"),
            priority=row.get("priority") or "normal", model=row.get("model"), usage=usage, cost=cost,
            cache=row.get("cache") or "miss", saved_usd=float(row.get("saved_usd") or 0.0),
            latency_s=float(row.get("latency_s") or 0.0), attempts=int(row.get("attempts") or 1),
            status=row.get("status") or "ok", error_type=row.get("error_type"), batch=bool(row.get("batch")),
            environment=row.get("environment") or "dev", upstream=row.get("upstream"),
        )
