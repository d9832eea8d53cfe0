"""Budget book-keeping with reservations, so concurrent requests can never spend past a budget together, and a
queue, so a full budget makes requests wait for in-flight work to settle instead of refusing them early.

**The guarantee.** A request first reserves its worst-case cost (``pricing.max_cost``); the reservation counts
against every budget that applies to it (global, its user's, its tenant's; daily and monthly) until the
response is settled with its real cost or the reservation is released. The invariant kept is

    committed spend + outstanding reservations <= limit            (x critical_hard_cap for "critical")

so 64 requests reserving at once cannot overshoot, and settled spend never passes a budget as long as a
reservation really is an upper bound of its call's cost.

**Admission** (``admit``) answers one of three ways:

- *granted*: the worst case fits beside what is settled, what is reserved in flight, and what requests already
  waiting ahead of it (same or higher priority) will need;
- *queued*: settled spend + this worst case fits, but the room is held by in-flight reservations (or claimed by
  requests waiting ahead). The request gets a ticket and waits; ``on_change`` says which tickets are admitted
  as reservations settle or are released;
- *refused*: settled spend + this worst case > limit (x cap): it can never fit, however long it waits.

The queue is ordered by priority (critical, normal, bulk), then arrival. **Head-of-line rule: every waiting
ticket claims its worst case in each budget it draws on, and a later ticket (or a new request) of the same or
lower priority is admitted only into room beyond the claims of the tickets ahead of it.** So a small request
arriving later never takes the room a big earlier one is waiting for; in a budget they share it is strict FIFO
(the earlier one is admitted first), while a ticket whose own budgets are disjoint from the blocked ones goes
ahead. Higher priority passes lower: a critical request ignores the claims of waiting normal and bulk tickets.
Bulk can wait behind a steady stream of normal traffic (strict priority); its deadline bounds that.

``reserve`` is ``admit`` that never queues (it refuses where ``admit`` would queue): the pre-queue API.

**Driving it** (the book is pure: it never waits, it only says what changed). The owner of the book parks a
waiter per queued ticket, and after anything that frees room or moves time (``settle``, ``release``,
``adjust_spend``, ``cancel``, a new ``admit``, the ``next_deadline`` timer) calls ``on_change`` and hands each
listed fate to its ticket's waiter. A waiter that gives up calls ``cancel(ticket)``; if that returns None the
ticket was admitted meanwhile and its reservation must be released. A request holds a reservation or waits on a
ticket, never both.

**Thresholds from expected spend.** The downgrade state ("downgrade" once ``downgrade_at`` of a limit is
reached, "stop" at 100 %) is judged on settled spend + the *expected* cost of in-flight work: each reservation
times the learned actual/worst-case ratio of its (model, route), clamped to [``cost_ratio_floor``, 1]. Before
anything is learned the ratio is 1 (expected = worst case, the old behaviour). The ratio is an exponential
average of settled calls and is used for that expectation and for estimates only, never for admission.

Days and months are UTC calendar periods of the injected clock. Outstanding reservations count against the
*current* period whatever period they were made in: a request reserved at 23:59:59 and settled after midnight
holds room in the new day until it settles. That is the conservative side.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable

from runtime.errors import BudgetExceeded
from runtime.settings import PRIORITIES, BudgetSettings

Clock = Callable[[], float]
_EPS = 1e-12
_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # critical 0, normal 1, bulk 2

# Reservation.reason values
NO_ROOM = "no_room"          # in-flight reservations (or tickets ahead) hold the room it needs
CANNOT_FIT = "cannot_fit"    # settled spend + its worst case > limit: it can never fit
EXPIRED = "expired"          # it waited past its deadline
CANCELLED = "cancelled"      # the waiter gave up (caller gone)
REPLACED = "replaced"        # a newer admit for the same request id took its place
QUEUE_FULL = "queue_full"    # max_queued tickets are already waiting


def day_key(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def month_key(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m")


@dataclass(frozen=True)
class Reservation:
    """The answer to an admit / reserve, or a ticket's fate from ``on_change`` / ``cancel``.

    Exactly one of: ``granted`` (a reservation is held), ``queued`` (waiting under ``ticket``), or neither
    (refused; ``reason`` says why). ``state`` is the threshold state of the request's budgets on expected spend
    ("normal" / "downgrade" / "stop"; a refusal is always "stop"). ``budget`` names the refusing or blocking
    budget, or when granted the one nearest its limit (None if no budget applies). That budget's figures:
    ``spent_usd`` = settled + reserved (this reservation included when granted), ``settled_usd``,
    ``reserved_usd`` (worst cases in flight), ``expected_usd`` (their expected cost), ``limit_usd``.
    ``amount_usd`` is this request's worst case."""

    granted: bool
    state: str
    budget: str | None = None
    spent_usd: float = 0.0
    limit_usd: float | None = None
    amount_usd: float = 0.0
    queued: bool = False
    ticket: int | None = None
    request_id: str | None = None
    reason: str = ""
    settled_usd: float = 0.0
    reserved_usd: float = 0.0
    expected_usd: float = 0.0
    cap: float = 1.0
    owner: str | None = None

    @property
    def decision(self) -> str:
        return "granted" if self.granted else "queued" if self.queued else "refused"

    def refusal(self, request_id: str | None = None) -> BudgetExceeded:
        """The typed error a refused (or expired) reservation becomes, with the figures."""
        limit = self.limit_usd or 0.0
        ceiling = f"${limit * self.cap:.4f} (x{self.cap:g} critical cap)" if self.cap != 1.0 else f"${limit:.4f}"
        why = {
            CANNOT_FIT: "can never fit",
            EXPIRED: "found no room before its deadline",
            CANCELLED: "was cancelled while waiting for room",
            REPLACED: "was replaced by a newer request with the same id",
            QUEUE_FULL: "found no room and the budget queue is full",
        }.get(self.reason, "would be exceeded")
        return BudgetExceeded(
            f"budget {self.budget} {why}: settled ${self.settled_usd:.4f} + reserved in flight "
            f"${self.reserved_usd:.4f} + this request's worst case ${self.amount_usd:.4f}, limit {ceiling}",
            request_id=request_id if request_id is not None else self.request_id, budget=self.budget,
            spent_usd=self.spent_usd, limit_usd=self.limit_usd, settled_usd=self.settled_usd,
            reserved_usd=self.reserved_usd, amount_usd=self.amount_usd, reason=self.reason or NO_ROOM)

    def to_dict(self) -> dict:
        return {**asdict(self), "decision": self.decision}


@dataclass(frozen=True)
class Holder:
    """Who holds (or waits for) a request id's reservation: ``queued`` False = a held reservation."""

    request_id: str
    owner: str | None
    amount_usd: float
    priority: str
    queued: bool
    ticket: int | None = None


@dataclass
class _Held:
    amount: float
    names: tuple[str, ...]
    user_id: str | None
    tenant: str | None
    key: tuple[str | None, str | None] = (None, None)   # (model, route): what its settle teaches
    owner: str | None = None
    max_tokens: int | None = None
    priority: str = "normal"


@dataclass
class _Ticket:
    ticket: int
    request_id: str
    user_id: str | None
    tenant: str | None
    priority: str
    amount: float
    budgets: tuple[tuple[str, str, float], ...]
    cap: float
    key: tuple[str | None, str | None]
    owner: str | None
    max_tokens: int | None
    deadline: float | None
    since: float

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b[0] for b in self.budgets)


@dataclass
class _Ema:
    """An exponential average that starts from a prior worth one sample: early samples are a running mean
    with the prior, later ones weigh ``alpha``. One odd first call cannot swing it."""

    value: float
    n: int = 0
    overruns: int = 0

    def add(self, x: float, alpha: float) -> None:
        self.n += 1
        self.value += max(alpha, 1.0 / (self.n + 1)) * (x - self.value)


@dataclass
class _Learned:
    cost: _Ema
    output: _Ema = field(default_factory=lambda: _Ema(1.0))


class BudgetBook:
    def __init__(self, budgets: BudgetSettings, clock: Clock = time.time) -> None:
        self.cfg = budgets
        self.clock = clock
        self._committed: dict[tuple[str, str], float] = {}  # (budget name, period key) -> usd
        self._reserved: dict[str, float] = {}                # budget name -> outstanding usd
        # budget name -> (model, route) -> outstanding usd: what the expectation is computed from
        self._reserved_by_key: dict[str, dict[tuple[str | None, str | None], float]] = {}
        self._held: dict[str, _Held] = {}                    # request id -> its reservation
        self._today = ""
        self._keys_ts, self._keys = float("nan"), ("", "")
        # the queue: one FIFO per priority rank (dicts keep insertion order); claims per rank and budget
        self._queue: list[dict[int, _Ticket]] = [{} for _ in PRIORITIES]
        self._claims: list[dict[str, float]] = [{} for _ in PRIORITIES]
        self._claim_n: list[dict[str, int]] = [{} for _ in PRIORITIES]
        # per rank and budget, an upper bound of the largest waiting amount: when settled + it fits, no ticket
        # there can have become impossible, and on_change skips looking (exact again after each full look)
        self._claim_max: list[dict[str, float]] = [{} for _ in PRIORITIES]
        self._deadlines: list[tuple[float, int]] = []       # heap of (deadline, ticket); stale entries skipped
        self._tickets: dict[int, _Ticket] = {}
        self._ticket_of: dict[str, int] = {}                 # request id -> its waiting ticket
        self._seq = itertools.count(1)
        self._decided: list[Reservation] = []               # fates decided outside on_change (replaced)
        # learned actual / worst-case ratios
        self._global = _Learned(_Ema(1.0))
        self._learned: dict[tuple[str | None, str | None], _Learned] = {}

    # -- which budgets apply ---------------------------------------------------------------------------------
    def _budgets(self, user_id: str | None, tenant: str | None) -> list[tuple[str, str, float]]:
        """(name, period, limit) for every enabled budget that applies to this user and tenant."""
        c = self.cfg
        out: list[tuple[str, str, float]] = []
        if c.daily_usd is not None:
            out.append(("daily", "day", c.daily_usd))
        if c.monthly_usd is not None:
            out.append(("monthly", "month", c.monthly_usd))
        if user_id is not None:
            if c.per_user_daily_usd is not None:
                out.append((f"user:{user_id}:daily", "day", c.per_user_daily_usd))
            if c.per_user_monthly_usd is not None:
                out.append((f"user:{user_id}:monthly", "month", c.per_user_monthly_usd))
        if tenant is not None:
            if c.per_tenant_daily_usd is not None:
                out.append((f"tenant:{tenant}:daily", "day", c.per_tenant_daily_usd))
            if c.per_tenant_monthly_usd is not None:
                out.append((f"tenant:{tenant}:monthly", "month", c.per_tenant_monthly_usd))
        return out

    def _budget_of(self, name: str) -> tuple[str, float | None]:
        """(period, limit) of a budget by its name (user ids may contain ':', so only the ends are read)."""
        period = "month" if name.endswith(":monthly") or name == "monthly" else "day"
        c = self.cfg
        if name in ("daily", "monthly"):
            return period, c.daily_usd if period == "day" else c.monthly_usd
        if name.startswith("user:"):
            return period, c.per_user_daily_usd if period == "day" else c.per_user_monthly_usd
        return period, c.per_tenant_daily_usd if period == "day" else c.per_tenant_monthly_usd

    def _period(self, period: str, ts: float) -> str:
        if ts != self._keys_ts:  # one calendar conversion per clock reading, not one per budget looked at
            self._keys_ts, self._keys = ts, (day_key(ts), month_key(ts))
        return self._keys[0] if period == "day" else self._keys[1]

    def _prune(self, now: float) -> None:
        # committed spend of past periods can never matter again: drop it on the first call of a new day
        today = day_key(now)
        if today == self._today:
            return
        self._today = today
        month = month_key(now)
        self._committed = {k: v for k, v in self._committed.items()
                           if k[1] >= (today if len(k[1]) == 10 else month)}

    def _settled(self, name: str, period: str, now: float) -> float:
        return self._committed.get((name, self._period(period, now)), 0.0)

    def _used(self, name: str, period: str, now: float) -> float:
        return self._settled(name, period, now) + self._reserved.get(name, 0.0)

    def _cap(self, priority: str) -> float:
        return self.cfg.critical_hard_cap if priority == "critical" else 1.0

    @staticmethod
    def _check_priority(priority: str) -> int:
        rank = _RANK.get(priority)
        if rank is None:
            raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
        return rank

    # -- admission --------------------------------------------------------------------------------------------
    def admit(self, request_id: str, user_id: str | None, tenant: str | None, priority: str,
              amount_usd: float, *, owner: str | None = None, model: str | None = None,
              route: str | None = None, max_tokens: int | None = None, deadline: float | None = None,
              queue: bool = True) -> Reservation:
        """Reserve ``amount_usd`` (the request's worst case) now, or queue it, or refuse it (module doc).

        A repeated admit for the same request id (a retry, a downgrade to a cheaper model, a re-run by a new
        ``owner``) replaces its held reservation when granted, and its waiting ticket when granted or queued
        (the old ticket's fate, reason "replaced", comes out of the next ``on_change``); when refused, what it
        held or waited for stands. A replacement no bigger than the held reservation is always granted; a
        bigger one is granted or refused, never queued (so a request holds a reservation or a ticket, never
        both). ``model``/``route`` name what the settle will teach (learned ratios);
        ``deadline`` (book-clock time) is when a queued ticket expires; ``queue=False`` refuses instead of
        queueing."""
        if amount_usd < 0:
            raise ValueError("a reservation cannot be negative")
        rank = self._check_priority(priority)
        now = self.clock()
        self._prune(now)
        cap = self._cap(priority)
        budgets = self._budgets(user_id, tenant)
        held = self._held.get(request_id)
        for name, period, limit in budgets:
            settled = self._settled(name, period, now)
            if settled + amount_usd > limit * cap + _EPS:
                return self._answer(False, CANNOT_FIT, name, period, limit, amount_usd, cap, now,
                                    request_id=request_id, owner=owner)
        names = tuple(b[0] for b in budgets)
        key = (model, route)
        if held is not None and amount_usd <= held.amount + _EPS and set(names) <= set(held.names):
            # shrinking a held reservation (a downgrade, a re-run) only gives room back: never held up
            self._unhold(request_id)
            self._hold(request_id, _Held(amount_usd, names, user_id, tenant, key, owner, max_tokens, priority))
            return self._granted(request_id, budgets, amount_usd, cap, now, owner)
        # room now, behind the claims of waiting tickets of the same or higher priority
        own = self._ticket_of.get(request_id)
        blocked = None
        for name, period, limit in budgets:
            used = self._used(name, period, now) - self._own(held, name)
            ahead = sum(self._claims[r].get(name, 0.0) for r in range(rank + 1))
            if own is not None and self._tickets[own].priority in PRIORITIES[:rank + 1] \
                    and name in self._tickets[own].names:
                ahead -= self._tickets[own].amount  # its own waiting ticket is about to be replaced
            if used + ahead + amount_usd > limit * cap + _EPS:
                blocked = (name, period, limit)
                break
        if blocked is None:
            self._drop_ticket(request_id, REPLACED, now)
            self._unhold(request_id)
            self._hold(request_id, _Held(amount_usd, names, user_id, tenant, key, owner, max_tokens, priority))
            return self._granted(request_id, budgets, amount_usd, cap, now, owner)
        name, period, limit = blocked
        # a request that holds a reservation never waits for a bigger one: holding room while waiting could
        # block the tickets ahead of it, which wait for that very room
        if not queue or self.cfg.max_queued == 0 or held is not None:
            return self._answer(False, NO_ROOM, name, period, limit, amount_usd, cap, now,
                                request_id=request_id, owner=owner)
        if deadline is not None and deadline <= now:
            return self._answer(False, EXPIRED, name, period, limit, amount_usd, cap, now,
                                request_id=request_id, owner=owner)
        if own is None and len(self._tickets) >= self.cfg.max_queued:
            return self._answer(False, QUEUE_FULL, name, period, limit, amount_usd, cap, now,
                                request_id=request_id, owner=owner)
        self._drop_ticket(request_id, REPLACED, now)
        state = self._assess(budgets, now)[0]
        t = _Ticket(next(self._seq), request_id, user_id, tenant, priority, amount_usd, tuple(budgets), cap, key,
                    owner, max_tokens, deadline, now)
        self._enqueue(t)
        return self._answer(False, NO_ROOM, name, period, limit, amount_usd, cap, now, request_id=request_id,
                            owner=owner, queued=True, ticket=t.ticket, state=state)

    def reserve(self, request_id: str, user_id: str | None, tenant: str | None, priority: str,
                amount_usd: float, **kw) -> Reservation:
        """``admit`` that never queues: granted, or refused (state "stop") when there is no room now."""
        return self.admit(request_id, user_id, tenant, priority, amount_usd, queue=False, **kw)

    def on_change(self) -> list[Reservation]:
        """Decide what the queue can now: call after anything that frees room or moves the clock (settle,
        release, adjust_spend, cancel, a deadline timer). Returns the decided tickets' fates (granted ones
        already hold their reservation; refused ones: "expired", "cannot_fit", and "replaced" from earlier
        admits); tickets still waiting are not listed. Cheap when nothing can move: the look for expired and
        impossible tickets runs only when a deadline is due or a budget's settled spend may have passed one,
        and admission stops at the first ticket blocked on a budget every ticket draws on (global daily or
        monthly), since nothing behind it can fit there."""
        out, self._decided = self._decided, []
        if not self._tickets:
            return out
        now = self.clock()
        self._prune(now)
        if self._deadline_due(now) or self._maybe_impossible(now):
            out.extend(self._refuse_impossible(now))
        shared = {n for n, _p, _l in self._budgets(None, None)}  # drawn on by every ticket
        ahead: dict[str, float] = {}   # claims of tickets still waiting ahead of the one looked at
        for rank in range(len(PRIORITIES)):
            for t in list(self._queue[rank].values()):
                blocked = next((n for n, p, lim in t.budgets
                                if self._used(n, p, now) + ahead.get(n, 0.0) + t.amount > lim * t.cap + _EPS),
                               None)
                if blocked is None:
                    self._dequeue(t)
                    self._hold(t.request_id, _Held(t.amount, t.names, t.user_id, t.tenant, t.key, t.owner,
                                                   t.max_tokens, t.priority))
                    out.append(self._granted(t.request_id, list(t.budgets), t.amount, t.cap, now, t.owner,
                                             ticket=t.ticket))
                    continue
                if blocked in shared:
                    # every later ticket draws on it too, behind this one's claim, at the same or a lower cap
                    return out
                for n in t.names:
                    ahead[n] = ahead.get(n, 0.0) + t.amount
        return out

    def _deadline_due(self, now: float) -> bool:
        nxt = self.next_deadline()
        return nxt is not None and now >= nxt

    def _maybe_impossible(self, now: float) -> bool:
        for rank, bounds in enumerate(self._claim_max):
            cap = self._cap(PRIORITIES[rank])
            for name, biggest in bounds.items():
                period, limit = self._budget_of(name)
                if limit is None or self._settled(name, period, now) + biggest > limit * cap + _EPS:
                    return True
        return False

    def _refuse_impossible(self, now: float) -> list[Reservation]:
        """Refuse every waiting ticket past its deadline or that can never fit, and make the bounds exact."""
        out = []
        for rank in range(len(PRIORITIES)):
            for t in list(self._queue[rank].values()):
                if t.deadline is not None and now >= t.deadline:
                    out.append(self._refuse_ticket(t, EXPIRED, now))
                    continue
                never = next(((n, p, lim) for n, p, lim in t.budgets
                              if self._settled(n, p, now) + t.amount > lim * t.cap + _EPS), None)
                if never is not None:
                    out.append(self._refuse_ticket(t, CANNOT_FIT, now, never))
        for rank, queue in enumerate(self._queue):
            bounds: dict[str, float] = {}
            for t in queue.values():
                for n in t.names:
                    bounds[n] = max(bounds.get(n, 0.0), t.amount)
            self._claim_max[rank] = bounds
        return out

    def cancel(self, ticket: int, reason: str = CANCELLED) -> Reservation | None:
        """Take a waiting ticket out of the queue (its caller is gone or its deadline passed). Returns its
        refusal, or None when the ticket is no longer waiting (already admitted, refused or cancelled: if it
        was admitted, the reservation is held and the caller must ``release`` it)."""
        t = self._tickets.get(ticket)
        if t is None:
            return None
        now = self.clock()
        self._prune(now)
        return self._refuse_ticket(t, reason, now)

    def next_deadline(self) -> float | None:
        """The earliest deadline among waiting tickets: when ``on_change`` has an expiry to report."""
        heap = self._deadlines
        while heap and (heap[0][1] not in self._tickets or self._tickets[heap[0][1]].deadline != heap[0][0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def ticket_of(self, request_id: str) -> int | None:
        return self._ticket_of.get(request_id)

    def holder(self, request_id: str) -> Holder | None:
        """Who holds this request id's reservation, or waits for one (a request never has both), so a second
        concurrent request with the same id can be told apart from a re-run by a restarted owner."""
        held = self._held.get(request_id)
        if held is not None:
            return Holder(request_id, held.owner, held.amount, held.priority, False)
        tid = self._ticket_of.get(request_id)
        if tid is not None:
            t = self._tickets[tid]
            return Holder(request_id, t.owner, t.amount, t.priority, True, tid)
        return None

    # -- queue internals --------------------------------------------------------------------------------------
    def _enqueue(self, t: _Ticket) -> None:
        rank = _RANK[t.priority]
        self._queue[rank][t.ticket] = t
        self._tickets[t.ticket] = t
        self._ticket_of[t.request_id] = t.ticket
        claims, counts, bounds = self._claims[rank], self._claim_n[rank], self._claim_max[rank]
        for n in t.names:
            claims[n] = claims.get(n, 0.0) + t.amount
            counts[n] = counts.get(n, 0) + 1
            bounds[n] = max(bounds.get(n, 0.0), t.amount)
        if t.deadline is not None:
            heapq.heappush(self._deadlines, (t.deadline, t.ticket))

    def _dequeue(self, t: _Ticket) -> None:
        rank = _RANK[t.priority]
        del self._queue[rank][t.ticket]
        del self._tickets[t.ticket]
        if self._ticket_of.get(t.request_id) == t.ticket:
            del self._ticket_of[t.request_id]
        claims, counts = self._claims[rank], self._claim_n[rank]
        for n in t.names:
            counts[n] -= 1
            if counts[n] <= 0:
                del counts[n]
                claims.pop(n, None)  # exact zero when the last claim goes: no float residue
                self._claim_max[rank].pop(n, None)
            else:
                claims[n] -= t.amount

    def _drop_ticket(self, request_id: str, reason: str, now: float) -> None:
        tid = self._ticket_of.get(request_id)
        if tid is not None:
            self._decided.append(self._refuse_ticket(self._tickets[tid], reason, now))

    def _refuse_ticket(self, t: _Ticket, reason: str, now: float,
                       budget: tuple[str, str, float] | None = None) -> Reservation:
        self._dequeue(t)
        if budget is None:  # name the budget that lacks room for it (or the first, if it would fit now)
            budget = next(((n, p, lim) for n, p, lim in t.budgets
                           if self._used(n, p, now) + t.amount > lim * t.cap + _EPS),
                          t.budgets[0] if t.budgets else (None, "day", None))
        name, period, limit = budget
        return self._answer(False, reason, name, period, limit, t.amount, t.cap, now, request_id=t.request_id,
                            owner=t.owner, ticket=t.ticket)

    @staticmethod
    def _own(held: _Held | None, name: str) -> float:
        return held.amount if held is not None and name in held.names else 0.0

    # -- answers ----------------------------------------------------------------------------------------------
    def _answer(self, granted: bool, reason: str, name: str | None, period: str, limit: float | None,
                amount: float, cap: float, now: float, *, request_id: str, owner: str | None,
                queued: bool = False, ticket: int | None = None,
                state: str = "stop") -> Reservation:
        """A refused (state "stop") or queued answer with the figures of budget ``name``."""
        if name is None:
            return Reservation(granted, "stop", None, 0.0, None, amount, queued, ticket, request_id, reason,
                               cap=cap, owner=owner)
        settled = self._settled(name, period, now)
        reserved = self._reserved.get(name, 0.0)
        return Reservation(granted, state, name, settled + reserved, limit, amount, queued, ticket, request_id,
                           reason, settled, reserved, self.expected(name), cap, owner)

    def _granted(self, request_id: str, budgets: list[tuple[str, str, float]], amount: float, cap: float,
                 now: float, owner: str | None, ticket: int | None = None) -> Reservation:
        state, name = self._assess(budgets, now)
        if state == "stop":  # granted at or past 100 % of the expectation: told to economise
            state = "downgrade"
        if name is None:
            return Reservation(True, state, None, 0.0, None, amount, False, ticket, request_id, "", cap=cap,
                               owner=owner)
        period, limit = next((p, lim) for n, p, lim in budgets if n == name)
        settled, reserved = self._settled(name, period, now), self._reserved.get(name, 0.0)
        return Reservation(True, state, name, settled + reserved, limit, amount, False, ticket, request_id, "",
                           settled, reserved, self.expected(name), cap, owner)

    # -- held reservations ------------------------------------------------------------------------------------
    def _hold(self, request_id: str, held: _Held) -> None:
        self._held[request_id] = held
        for name in held.names:
            self._reserved[name] = self._reserved.get(name, 0.0) + held.amount
            by_key = self._reserved_by_key.setdefault(name, {})
            by_key[held.key] = by_key.get(held.key, 0.0) + held.amount

    def _unhold(self, request_id: str) -> _Held | None:
        held = self._held.pop(request_id, None)
        if held is not None:
            for name in held.names:
                left = self._reserved.get(name, 0.0) - held.amount
                if left > _EPS:
                    self._reserved[name] = left
                else:
                    self._reserved.pop(name, None)
                by_key = self._reserved_by_key.get(name, {})
                left = by_key.get(held.key, 0.0) - held.amount
                if left > _EPS:
                    by_key[held.key] = left
                else:
                    by_key.pop(held.key, None)
                    if not by_key:
                        self._reserved_by_key.pop(name, None)
        return held

    def restore(self, request_id: str, user_id: str | None, tenant: str | None, amount_usd: float, *,
                owner: str | None = None, priority: str = "normal") -> None:
        """Hold a reservation again without checking limits: one that was granted before a restart and whose
        call may still be in flight (the ledger replays these from its open intents)."""
        self._unhold(request_id)
        self._hold(request_id, _Held(max(0.0, amount_usd), tuple(b[0] for b in self._budgets(user_id, tenant)),
                                     user_id, tenant, owner=owner, priority=priority))

    def held(self, request_id: str) -> _Held | None:
        return self._held.get(request_id)

    # -- budget leases: a caller reserves for its requests on its own, from a slice held here ---------------------
    def lease(self, lease_id: str, amount_usd: float, *, owner: str | None = None, share: float = 0.25) -> float:
        """Hold a slice of the account-wide budgets for a caller and return its size (0: none; ask per request).

        Only where the slice cannot change a decision: no per-user or per-tenant budget is configured (those
        need each request's user and tenant), nobody waits in the queue, and every budget is far from its
        downgrade threshold; the slice is at most ``share`` of the room left below it. The hold counts against
        the budgets like any reservation until the caller's requests consume it (``consume_lease``) or the caller
        hands it back (``release``)."""
        c = self.cfg
        if any(v is not None for v in (c.per_user_daily_usd, c.per_user_monthly_usd, c.per_tenant_daily_usd,
                                       c.per_tenant_monthly_usd)) or self._tickets or amount_usd <= 0:
            return 0.0
        now = self.clock()
        self._prune(now)
        budgets = self._budgets(None, None)
        if not budgets:
            return 0.0
        size = amount_usd
        for name, period, limit in budgets:
            room = limit * c.downgrade_at - self._used(name, period, now)
            size = min(size, room * share)
        if size <= 0:
            return 0.0
        self._hold(lease_id, _Held(size, tuple(b[0] for b in budgets), None, None, owner=owner))
        return size

    def consume_lease(self, lease_id: str, amount_usd: float) -> None:
        """A request reserved on a lease was booked (its record arrived): its part of the hold ends."""
        held = self._held.get(lease_id)
        if held is None or amount_usd <= 0:
            return
        self._unhold(lease_id)
        left = held.amount - amount_usd
        if left > _EPS:
            held.amount = left
            self._hold(lease_id, held)

    def release(self, request_id: str, *, owner: str | None = None) -> bool:
        """Give back a reservation that will not be billed (the call failed before the API, or was refused).
        With ``owner``, only that owner's reservation is released (a stale attempt must not free the room of
        the re-run that replaced it). Returns whether one was released. Waiting tickets: ``cancel``."""
        held = self._held.get(request_id)
        if held is None or (owner is not None and held.owner != owner):
            return False
        self._unhold(request_id)
        return True

    def settle(self, request_id: str, actual_usd: float, *, user_id: str | None = None,
               tenant: str | None = None, ts: float | None = None, owner: str | None = None,
               output_tokens: int | None = None) -> bool:
        """Replace a reservation by what was really spent, and learn the actual / reserved ratio from it
        (``output_tokens`` also teaches the output / max_tokens ratio). Without a reservation (an actor
        restart lost it, the row needed none, or ``owner`` names another holder) the spend is still booked, to
        ``user_id`` / ``tenant``. Returns whether a reservation was settled."""
        held = self._held.get(request_id)
        if held is not None and owner is not None and held.owner != owner:
            held = None
        if held is not None:
            self._unhold(request_id)
            user_id, tenant = held.user_id, held.tenant
            self._learn(held, actual_usd, output_tokens)
        self.add_spend(user_id, tenant, actual_usd, self.clock() if ts is None else ts)
        return held is not None

    def add_spend(self, user_id: str | None, tenant: str | None, amount: float, ts: float) -> None:
        """Book spend at time ``ts`` (used directly when replaying the ledger). Not positive: ignored."""
        if amount > 0:
            self.adjust_spend(user_id, tenant, amount, ts)

    def adjust_spend(self, user_id: str | None, tenant: str | None, delta_usd: float, ts: float) -> None:
        """Correct booked spend by ``delta_usd`` at time ``ts``, up or down (a row first booked at its worst
        case, later reconciled with the real bill). A period's spend never goes below zero."""
        if delta_usd == 0:
            return
        self._prune(self.clock())
        for name, period, _limit in self._budgets(user_id, tenant):
            key = (name, self._period(period, ts))
            value = self._committed.get(key, 0.0) + delta_usd
            if value > _EPS:
                self._committed[key] = value
            else:
                self._committed.pop(key, None)

    # -- learning ---------------------------------------------------------------------------------------------
    def _learn(self, held: _Held, actual: float, output_tokens: int | None) -> None:
        # a call that cost nothing (failed, never billed) says nothing about what calls cost
        if held.amount <= 0 or actual <= 0:
            return
        alpha = self.cfg.cost_ratio_alpha
        ratio = actual / held.amount
        learned = self._learned.get(held.key)
        if learned is None:  # a new (model, route) starts from what all calls taught so far
            learned = self._learned[held.key] = _Learned(_Ema(self._global.cost.value))
        for target in (learned, self._global):
            target.cost.add(min(1.0, ratio), alpha)
            if ratio > 1.0 + 1e-9:  # the worst case was not an upper bound: worth surfacing
                target.cost.overruns += 1
            if output_tokens is not None and held.max_tokens:
                target.output.add(min(1.0, max(0.0, output_tokens / held.max_tokens)), alpha)

    def expected_ratio(self, model: str | None = None, route: str | None = None) -> float:
        """The expected actual / worst-case cost ratio of a call to ``model`` via ``route``, in
        [cost_ratio_floor, 1]; 1 until anything is learned."""
        learned = self._learned.get((model, route), self._global)
        return min(1.0, max(self.cfg.cost_ratio_floor, learned.cost.value))

    def output_ratio(self, model: str | None = None, route: str | None = None) -> float:
        """The observed output / max_tokens ratio (1 until learned): an estimate, never a bound."""
        output = self._learned.get((model, route), self._global).output
        return output.value if output.n else 1.0

    # -- views -----------------------------------------------------------------------------------------------
    def expected(self, name: str) -> float:
        """Expected cost of budget ``name``'s in-flight reservations."""
        return sum(usd * self.expected_ratio(*key) for key, usd in self._reserved_by_key.get(name, {}).items())

    def _assess(self, budgets: Iterable[tuple[str, str, float]], now: float) -> tuple[str, str | None]:
        """The threshold state of the budget nearest its limit on settled + expected spend, and its name."""
        worst_name, worst_ratio = None, -1.0
        for name, period, limit in budgets:
            ratio = (self._settled(name, period, now) + self.expected(name)) / limit
            if ratio > worst_ratio:
                worst_name, worst_ratio = name, ratio
        if worst_name is None:
            return "normal", None
        if worst_ratio >= 1.0 - _EPS:
            return "stop", worst_name
        if worst_ratio >= self.cfg.downgrade_at - _EPS:
            return "downgrade", worst_name
        return "normal", worst_name

    def state(self, user_id: str | None, tenant: str | None) -> str:
        now = self.clock()
        self._prune(now)
        return self._assess(self._budgets(user_id, tenant), now)[0]

    def spent(self, name: str, ts: float | None = None) -> float:
        """Committed spend of one budget in the period holding ``ts`` (default now)."""
        period = "month" if name.endswith("monthly") else "day"
        return self._committed.get((name, self._period(period, self.clock() if ts is None else ts)), 0.0)

    def reserved(self, name: str) -> float:
        return self._reserved.get(name, 0.0)

    @property
    def outstanding(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        return len(self._tickets)

    def snapshot(self) -> dict:
        """Per budget with anything settled this period, in flight or waiting (the global ones always):
        limit, settled, reserved in flight (worst case), expected in flight, waiting requests (count, worst-case
        USD) and state; then the learned ratios. Plain data, ready for JSON."""
        now = self.clock()
        self._prune(now)
        names = {n for n, _p, _l in self._budgets(None, None)}
        names.update(n for n, pk in self._committed if pk == self._period(self._budget_of(n)[0], now))
        names.update(self._reserved)
        for claims in self._claims:
            names.update(claims)
        budgets = {}
        for name in sorted(names):
            period, limit = self._budget_of(name)
            if limit is None:
                continue
            settled, expected = self._settled(name, period, now), self.expected(name)
            budgets[name] = {
                "period": self._period(period, now), "limit_usd": limit, "settled_usd": settled,
                "reserved_usd": self._reserved.get(name, 0.0), "expected_in_flight_usd": expected,
                "queued": sum(c.get(name, 0) for c in self._claim_n),
                "queued_usd": sum(c.get(name, 0.0) for c in self._claims),
                "state": self._assess([(name, period, limit)], now)[0],
            }

        def ratios(learned: _Learned) -> dict:
            return {"cost_ratio": min(1.0, max(self.cfg.cost_ratio_floor, learned.cost.value)),
                    "samples": learned.cost.n, "overruns": learned.cost.overruns,
                    "output_ratio": learned.output.value if learned.output.n else None,
                    "output_samples": learned.output.n}

        return {
            "budgets": budgets,
            "in_flight": len(self._held),
            "queued": {p: len(q) for p, q in zip(PRIORITIES, self._queue)},
            "ratios": {f"{m or '*'}/{r or '*'}": ratios(v) for (m, r), v in sorted(
                self._learned.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))},
            "ratio_all": ratios(self._global),
        }
