"""Capacity leases: a caller admits most requests on its own, against a slice of the cluster's buckets.

The limiter (runtime/admission.py) is the one place that knows the account's buckets. Asking it once per
request costs an actor round trip and caps the cluster at one actor's call rate. So a caller asks for a
*lease*: a slice of one bucket set (requests, input tokens, output tokens of one limit group and model class)
for a short term. The limiter takes the slice out of its buckets exactly as it takes a grant, so whatever is sent
under a lease was admitted by the limiter: the no-429 guarantee does not move. Near a limit the limiter grants
no leases (only capacity above every priority floor is ever leased) and callers go back to asking per request.

    book = LeaseBook(clock=time.monotonic)
    grant = book.try_admit(estimate)          # a Grant on a lease, or None: ask the limiter
    ...call...
    book.settle(grant.lease_id, usage, status)
    book.demand()  -> [LeaseRequest]          # what to ask the limiter for (sized by recent demand)
    book.add(lease) ; book.due() -> [LeaseReturn]   # leases to hand back (expired, their calls finished)

The caller's client (actors/limiter.py) runs this book; it is pure, and its clock is injected.

Accounting on return: requests sent, input and output tokens actually used (for calls still running when the
lease is returned, their reservation counts as used: the server charges output from max_tokens when a request
starts). The limiter refunds the rest, capped by how high its buckets got since the lease was taken, as for
any refund.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from runtime.admission import DEFAULT_GROUP, NOT_SENT, REFUND_STATUSES, SENT_NO_ANSWER, Estimate, Grant
from runtime.usage import Usage

LOCAL_PREFIX = "lease:"


@dataclass(frozen=True)
class LeaseRequest:
    caller: str
    group: str
    model_class: str
    requests: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class CapacityLease:
    lease_id: str
    group: str
    model_class: str
    requests: int
    input_tokens: int
    output_tokens: int
    term_s: float


@dataclass(frozen=True)
class LeaseReturn:
    lease_id: str
    requests_used: int
    input_used: int
    output_used: int
    headers: dict[str, str] = field(default_factory=dict)  # the latest rate-limit headers seen under it
    received_at: float = 0.0


@dataclass
class _Local:
    lease: CapacityLease
    expires: float
    requests: float           # left to admit
    input_tokens: float
    output_tokens: float
    inflight: int = 0
    sent: int = 0             # request slots used
    input_used: float = 0.0   # actual (or reserved, for calls still running at return)
    output_used: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    received_at: float = 0.0
    returned: bool = False


@dataclass
class _Inflight:
    key: tuple[str, str]
    local: _Local
    input_tokens: int
    output_tokens: int


class LeaseBook:
    """One caller's leases and what is admitted on them. Not thread-safe: one event loop uses it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, caller: str = "caller",
                 term_s: float = 2.0, renew_at: float = 0.5, window_s: float = 2.0,
                 max_requests: int = 100_000) -> None:
        self.clock = clock
        self.caller = caller
        self.term_s = term_s
        self.renew_at = renew_at          # ask for the next lease when this fraction of the term is left
        self.window_s = window_s          # demand is measured over this window
        self.max_requests = max_requests  # the most request slots one lease asks for
        self._active: dict[tuple[str, str], _Local] = {}
        self._retired: list[_Local] = []
        self._inflight: dict[str, _Inflight] = {}
        self._seq = itertools.count(1)
        # demand per (group, class): requests and tokens seen (admitted here or asked of the limiter)
        self._seen: dict[tuple[str, str], deque[tuple[float, int, int]]] = {}
        self._asking: set[tuple[str, str]] = set()
        self.stats = {"local": 0, "missed": 0, "leases": 0, "returned": 0}

    # -- admission --------------------------------------------------------------------------------------------
    def try_admit(self, e: Estimate, *, note: bool = True) -> Grant | None:
        """A grant on one of ``e``'s groups' leases, or None. ``note`` False: ``e`` is not counted in the demand
        that sizes the next leases (an admission made before it is known whether the request will be sent:
        ``note(e)`` counts it once it is)."""
        now = self.clock()
        for group in (e.groups or (DEFAULT_GROUP,)):
            key = (group, e.model_class)
            if note:
                self._note(key, now, e)
            loc = self._active.get(key)
            if loc is None or loc.expires <= now:
                continue
            if (loc.requests >= 1 and loc.input_tokens >= e.input_tokens
                    and loc.output_tokens >= e.max_output_tokens):
                loc.requests -= 1
                loc.input_tokens -= e.input_tokens
                loc.output_tokens -= e.max_output_tokens
                loc.inflight += 1
                lease_id = f"{LOCAL_PREFIX}{loc.lease.lease_id}:{next(self._seq)}"
                self._inflight[lease_id] = _Inflight(key, loc, e.input_tokens, e.max_output_tokens)
                self.stats["local"] += 1
                return Grant(lease_id, e.request_id, e.model_class, e.input_tokens, e.max_output_tokens,
                             e.user_id, 0.0, group)
        self.stats["missed"] += 1
        return None

    def note(self, e: Estimate) -> None:
        now = self.clock()
        for group in (e.groups or (DEFAULT_GROUP,)):
            self._note((group, e.model_class), now, e)

    def _note(self, key: tuple[str, str], now: float, e: Estimate) -> None:
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = deque()
        seen.append((now, e.input_tokens, e.max_output_tokens))
        horizon = now - self.window_s
        while seen[0][0] < horizon:
            seen.popleft()

    @staticmethod
    def owns(lease_id: str) -> bool:
        return lease_id.startswith(LOCAL_PREFIX)

    def settle(self, lease_id: str, usage: Usage | None, status: int, headers: dict[str, str] | None = None,
               received_at: float = 0.0) -> bool:
        """The outcome of a request admitted on a lease. Returns False for a lease id it does not know."""
        inf = self._inflight.pop(lease_id, None)
        if inf is None:
            return False
        loc = inf.local
        loc.inflight -= 1
        if usage is not None:
            loc.sent += 1
            loc.input_used += usage.itpm_tokens
            loc.output_used += usage.output_tokens
            spare_in, spare_out = inf.input_tokens - usage.itpm_tokens, inf.output_tokens - usage.output_tokens
        elif status == NOT_SENT:
            loc.requests += 1  # nothing went out: the slot is free again
            spare_in, spare_out = inf.input_tokens, inf.output_tokens
        elif status == SENT_NO_ANSWER:
            # it may still be running at the server: everything it reserved counts as used
            loc.sent += 1
            loc.input_used += inf.input_tokens
            loc.output_used += inf.output_tokens
            spare_in = spare_out = 0
        elif status in REFUND_STATUSES:
            loc.sent += 1  # the server counted the request, not its tokens
            spare_in, spare_out = inf.input_tokens, inf.output_tokens
        else:
            loc.sent += 1  # a 4xx: input may have been counted
            loc.input_used += inf.input_tokens
            spare_in, spare_out = 0, inf.output_tokens
        if not loc.returned:
            # what one request did not use is there for the next (a debt, when it used more, is repaid first)
            loc.input_tokens += spare_in
            loc.output_tokens += spare_out
        if headers:
            loc.headers, loc.received_at = dict(headers), received_at
        return True

    # -- leases ----------------------------------------------------------------------------------------------
    def demand(self) -> list[LeaseRequest]:
        """Leases worth asking for now: for every (group, class) with recent demand whose lease is missing,
        used up or near its end, sized to the demand of one term (at least one request's worth)."""
        now = self.clock()
        out = []
        for key, seen in self._seen.items():
            while seen and seen[0][0] < now - self.window_s:
                seen.popleft()
            if not seen or key in self._asking:
                continue
            loc = self._active.get(key)
            # ask for the next lease before this one runs out, by time or by use
            if (loc is not None and loc.expires - now > self.term_s * self.renew_at
                    and loc.requests >= loc.lease.requests * (1 - self.renew_at)):
                continue
            span = max(min(self.window_s, now - seen[0][0]), 0.05)
            rate = len(seen) / span
            n = max(1, min(self.max_requests, int(rate * self.term_s * 2) + 1))
            per_in = max(x[1] for x in seen)
            per_out = max(x[2] for x in seen)
            out.append(LeaseRequest(self.caller, key[0], key[1], n, n * per_in, n * per_out))
            self._asking.add(key)
        return out

    def add(self, lease: CapacityLease | None, asked: LeaseRequest | None = None) -> None:
        """A lease the limiter granted (None: refused; the request goes on asking per request)."""
        if asked is not None:
            self._asking.discard((asked.group, asked.model_class))
        if lease is None or lease.requests <= 0:
            return
        key = (lease.group, lease.model_class)
        old = self._active.get(key)
        if old is not None:
            self._retire(old)
        self._active[key] = _Local(lease, self.clock() + lease.term_s, lease.requests, lease.input_tokens,
                                   lease.output_tokens)
        self.stats["leases"] += 1

    def _retire(self, loc: _Local) -> None:
        loc.expires = min(loc.expires, self.clock())
        self._retired.append(loc)

    def due(self, *, all_now: bool = False) -> list[LeaseReturn]:
        """Leases to hand back: expired (or all, when closing). A lease whose calls still run is returned
        with their reservations counted as used (the limiter must not wait on them)."""
        now = self.clock()
        for key, loc in list(self._active.items()):
            if all_now or loc.expires <= now:
                del self._active[key]
                self._retire(loc)
        out = []
        keep = []
        for loc in self._retired:
            if loc.inflight and not all_now and now < loc.expires + self.term_s:
                keep.append(loc)  # give running calls one more term to report their real usage
                continue
            running_in = sum(i.input_tokens for i in self._inflight.values() if i.local is loc)
            running_out = sum(i.output_tokens for i in self._inflight.values() if i.local is loc)
            loc.returned = True
            out.append(LeaseReturn(loc.lease.lease_id, loc.sent + loc.inflight, int(loc.input_used + running_in),
                                   int(loc.output_used + running_out), loc.headers, loc.received_at))
            self.stats["returned"] += 1
        self._retired = keep
        return out

    def snapshot(self) -> dict:
        now = self.clock()
        return {f"{g}/{c}": {"requests_left": loc.requests, "input_left": loc.input_tokens,
                             "output_left": loc.output_tokens, "expires_in_s": round(loc.expires - now, 3),
                             "inflight": loc.inflight}
                for (g, c), loc in self._active.items()} | {"stats": dict(self.stats)}
