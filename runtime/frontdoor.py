"""The HTTP front door's pure parts: reading a key, mapping typed errors to the API's error replies, the
per-key request rate and daily budget, and the headers that tell a caller where it stands.

actors/serve.py (the Ray Serve deployment) does the I/O: it authenticates with ``runtime.keys.KeyStore``, asks
``KeyGate`` here, calls the runtime, and answers with ``error_reply`` on failure. Nothing here imports Ray.

Errors, as the API shapes them (``{"type": "error", "error": {"type": T, "message": M}, "request_id": R}``) so
the official SDKs raise the matching class:

    InvalidRequest              400 invalid_request_error   (BadRequestError)
    unknown / revoked key       401 authentication_error    (AuthenticationError)
    BudgetExceeded              402 billing_error           (PaymentRequiredError)
    RateLimitedPastDeadline     429 rate_limit_error        (RateLimitError), with retry-after
    OverloadedAfterFallback     529 overloaded_error        (OverloadedError)
    UpstreamTimeout             504 timeout_error           (GatewayTimeoutError)
    upstream AuthenticationError 500 api_error              (InternalServerError): the operator's key failed;
                                                            the caller's key is fine, so never a 401
    UpstreamError               its own 4xx status and type
    anything else               500 api_error, with no internals in the message

A spent budget is a 402, not a 429: a 429 tells clients (the SDKs by default) to retry after a pause, and a
budget does not come back in seconds; 402 ``billing_error`` is the API's own answer for money, and the SDKs do
not retry it. ``x-should-retry`` says so explicitly either way.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from runtime.errors import (AuthenticationError, BudgetExceeded, ClaudeRuntimeError, InvalidRequest,
                            OverloadedAfterFallback, RateLimitedPastDeadline, UpstreamError, UpstreamTimeout,
                            redact)

# the API's error type for each status it uses (shared/README.md)
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}
MAX_BODY_BYTES = 32 * 1024 * 1024  # the API's own request size limit for messages


def new_request_id(key_id: str) -> str:
    """``fd-<key id>-<random>``: a valid runtime request id (and batch custom_id) whose prefix finds every row
    a key caused in the ledger."""
    return f"fd-{key_id}-{uuid.uuid4().hex[:24]}"


def request_prefix(key_id: str) -> str:
    return f"fd-{key_id}-"


def api_key_from(headers: Mapping[str, str]) -> str | None:
    """The caller's key: ``x-api-key`` (older SDKs, curl) or ``Authorization: Bearer`` (SDK 2.x)."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization") or ""
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


# -- errors ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ErrorReply:
    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, request_id: str | None) -> bytes:
        return error_body(self.error_type, self.message, request_id)


def error_body(error_type: str, message: str, request_id: str | None) -> bytes:
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message},
                       "request_id": request_id}, separators=(",", ":")).encode()


def error_event(error_type: str, message: str) -> dict[str, Any]:
    """A failure after the stream began, as the API sends it: an ``error`` event."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _retry_after(seconds: float | None) -> dict[str, str]:
    if seconds is None or not math.isfinite(seconds):
        return {}
    return {"retry-after": str(max(1, math.ceil(seconds)))}


def error_reply(exc: BaseException) -> ErrorReply:
    """The API's reply for a typed failure (module doc); the message never holds a key or internals."""
    no_retry = {"x-should-retry": "false"}
    if isinstance(exc, InvalidRequest):
        return ErrorReply(400, "invalid_request_error", exc.message, no_retry)
    if isinstance(exc, BudgetExceeded):
        return ErrorReply(402, "billing_error", exc.message, no_retry)
    if isinstance(exc, RateLimitedPastDeadline):
        after = getattr(exc, "retry_after_s", None)
        return ErrorReply(429, "rate_limit_error", exc.message,
                          {**_retry_after(after if after is not None else 1.0), "x-should-retry": "true"})
    if isinstance(exc, OverloadedAfterFallback):
        return ErrorReply(529, "overloaded_error", exc.message, {"x-should-retry": "true"})
    if isinstance(exc, UpstreamTimeout):
        return ErrorReply(504, "timeout_error", exc.message, no_retry)
    if isinstance(exc, AuthenticationError):
        # the operator's upstream credentials were refused: the caller can do nothing about it, and must not be
        # told its own key is wrong
        return ErrorReply(500, "api_error", "the runtime could not call Claude: its upstream is misconfigured "
                                            "(the operator has to fix it)", no_retry)
    if isinstance(exc, UpstreamError):
        status = getattr(exc, "status", None)
        if isinstance(status, int) and 400 <= status < 500 and status != 401:
            etype = getattr(exc, "error_type", None)
            etype = etype if etype in ERROR_TYPES.values() else ERROR_TYPES.get(status, "invalid_request_error")
            return ErrorReply(status, etype, exc.message, no_retry)
        return ErrorReply(500, "api_error", exc.message)
    if isinstance(exc, ClaudeRuntimeError):
        return ErrorReply(500, "api_error", f"{type(exc).__name__}: {exc.message}")
    return ErrorReply(500, "api_error", "internal error in the runtime's front door")


def reply_for_status(status: int, message: str) -> ErrorReply:
    return ErrorReply(status, ERROR_TYPES.get(status, "api_error"), redact(message))


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or ``InvalidRequest`` (what the API says for a body it cannot read)."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body is {len(raw)} bytes, above the limit of {MAX_BODY_BYTES}",
                             field="body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", field="body")
    return body


# -- per-key rate and budget -------------------------------------------------------------------------------------

def _day_start(ts: float) -> float:
    return float(int(ts) // 86400 * 86400)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _KeyState:
    tokens: float = 0.0            # the rpm bucket
    refilled_at: float = 0.0
    day: float = -1.0              # start of the UTC day the budget figures are for
    ledger_usd: float = 0.0        # the key's spend today as the ledger had it at the last refresh
    local: list = field(default_factory=list)   # (when, usd) settled here since that refresh
    reserved_usd: float = 0.0      # worst cases of requests in flight
    refreshed_at: float = -math.inf
    in_flight: int = 0


@dataclass(frozen=True)
class Ticket:
    """What ``admit`` handed out: settle it exactly once."""

    key_id: str
    day: float
    reserved_usd: float


class KeyGate:
    """Each key's own request rate (a token bucket of ``rpm`` refilled continuously, as Anthropic's are) and
    daily budget (worst case reserved before the call, actual cost after), for one front-door replica.

    With several replicas each enforces ``rpm / replicas``, so together they allow the key's rpm. The budget is
    read from the ledger (``refreshed``: the key's spend today by its request-id prefix, so it survives
    restarts and counts what other replicas spent) at most every ``refresh_s``; between reads, settled costs
    and reservations are added here. Within one replica a key never overspends; across replicas, by at most
    what the others settled within one ``refresh_s``.
    """

    def __init__(self, *, replicas: int = 1, refresh_s: float = 2.0, clock: Callable[[], float] = time.time
                 ) -> None:
        self.replicas = max(1, int(replicas))
        self.refresh_s = refresh_s
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState(refilled_at=self.clock())
            st.tokens = math.inf  # filled to capacity on first use
        return st

    def _refill(self, st: _KeyState, rpm: int, now: float) -> float:
        cap = rpm / self.replicas
        st.tokens = min(cap, st.tokens + (now - st.refilled_at) * cap / 60.0)
        st.refilled_at = now
        return cap

    def needs_refresh(self, entry: Any) -> bool:
        """Whether the key's budget figures must be re-read from the ledger before admitting."""
        if entry.budget_usd is None:
            return False
        st = self._state(entry.key_id)
        now = self.clock()
        return st.day != _day_start(now) or now - st.refreshed_at >= self.refresh_s

    def refreshed(self, key_id: str, ledger_usd: float, asked_at: float) -> None:
        """The ledger's figure for the key's spend today, read by a query sent at ``asked_at``. A cost settled
        here before that was committed to the ledger before it (requests commit before they answer), so the
        figure holds it; later ones may or may not be in it and stay counted here (over-counting, briefly)."""
        st = self._state(key_id)
        st.day = _day_start(asked_at)
        st.ledger_usd = float(ledger_usd)
        st.local = [(t, usd) for t, usd in st.local if t >= asked_at]
        st.refreshed_at = asked_at

    def admit(self, entry: Any, reserve_usd: float, request_id: str | None = None) -> Ticket:
        """Take one request of the key's rate and reserve its worst case against its budget, or raise the
        typed refusal (``RateLimitedPastDeadline`` with ``retry_after_s``, ``BudgetExceeded``)."""
        now = self.clock()
        st = self._state(entry.key_id)
        if entry.rpm is not None:
            cap = self._refill(st, entry.rpm, now)
            if st.tokens < 1.0:
                wait = (1.0 - st.tokens) * 60.0 / cap
                raise RateLimitedPastDeadline(
                    f"this key's rate limit of {entry.rpm} requests per minute is reached; retry in {wait:.2g}s",
                    request_id=request_id, reason=f"key:{entry.key_id}:rpm", retry_after_s=wait)
        amount = 0.0
        if entry.budget_usd is not None:
            if st.day != _day_start(now):  # a new day: yesterday's spend no longer counts
                st.day, st.ledger_usd, st.local = _day_start(now), 0.0, []
            amount = max(0.0, float(reserve_usd))
            spent = st.ledger_usd + sum(usd for _, usd in st.local)
            if spent + st.reserved_usd + amount > entry.budget_usd + 1e-12:
                raise BudgetExceeded(
                    f"this key's daily budget of ${entry.budget_usd:.4f} would be exceeded: spent ${spent:.4f} "
                    f"+ in flight ${st.reserved_usd:.4f} + this request's worst case ${amount:.4f}",
                    request_id=request_id, budget=f"key:{entry.key_id}:daily", limit_usd=entry.budget_usd,
                    spent_usd=spent, reserved_usd=st.reserved_usd, amount_usd=amount)
            st.reserved_usd += amount
        if entry.rpm is not None:
            st.tokens -= 1.0
        st.in_flight += 1
        return Ticket(entry.key_id, st.day, amount)

    def settle(self, ticket: Ticket, cost_usd: float) -> None:
        """The request's bill is in the ledger (0 for a cache hit or an unbilled failure): its reservation
        becomes that cost. A streamed request settles once its ledger row exists (the pipeline writes it after
        the last event, and later still when the client left), so until then its worst case stays reserved."""
        st = self._state(ticket.key_id)
        st.in_flight = max(0, st.in_flight - 1)
        st.reserved_usd = max(0.0, st.reserved_usd - ticket.reserved_usd)
        if st.reserved_usd < 1e-12:
            st.reserved_usd = 0.0
        if ticket.day == st.day and cost_usd:
            st.local.append((self.clock(), max(0.0, float(cost_usd))))

    def headers(self, entry: Any) -> dict[str, str]:
        """Where the key stands, in the API's ratelimit header style (requests) and the runtime's own (budget)."""
        out: dict[str, str] = {}
        now = self.clock()
        st = self._state(entry.key_id)
        if entry.rpm is not None:
            cap = self._refill(st, entry.rpm, now)
            per_s = cap / 60.0
            out["anthropic-ratelimit-requests-limit"] = str(entry.rpm)
            out["anthropic-ratelimit-requests-remaining"] = str(max(0, int(st.tokens * self.replicas)))
            out["anthropic-ratelimit-requests-reset"] = _rfc3339(now + max(0.0, cap - st.tokens) / per_s)
        if entry.budget_usd is not None:
            spent = (st.ledger_usd + sum(usd for _, usd in st.local) + st.reserved_usd
                     if st.day == _day_start(now) else 0.0)
            out["x-claude-runtime-budget-limit-usd"] = f"{entry.budget_usd:.6f}"
            out["x-claude-runtime-budget-remaining-usd"] = f"{max(0.0, entry.budget_usd - spent):.6f}"
            out["x-claude-runtime-budget-reset"] = _rfc3339(_day_start(now) + 86400)
        return out


def worst_case_usd(req: Any, settings: Any) -> float:
    """The most a validated request can cost whatever the runtime does with it (routing, the dearest upstream,
    the dearest price tier): what a key's budget reserves before the call. Fallback and budget downgrades
    only ever move to cheaper models."""
    from runtime.estimate import input_upper_bound
    from runtime.pricing import bound_cost
    from runtime.router import route

    model = route(req.requested_model, req.params, settings).model
    factor = max((u.price_factor for u in settings.upstreams), default=1.0)
    return bound_cost(model, input_upper_bound(req.params).tokens, req.max_tokens, settings, worst_tier=True,
                      price_factor=factor)
