"""Budget book-keeping with reservations, so concurrent requests can never spend past a budget together.

A request first reserves its worst-case cost (``pricing.max_cost``); the reservation counts against every
budget that applies to it (global, its user's, its tenant's; daily and monthly) until the response is settled
with its real cost or the reservation is released. The invariant kept is

    committed spend + outstanding reservations <= limit            (x critical_hard_cap for "critical")

so 64 requests reserving at once cannot overshoot: the one that would pass 100 % is refused. States, worst
over all budgets that apply: "normal"; "downgrade" once committed + reserved reaches ``downgrade_at`` of a
limit (the router then sends non-critical traffic to the cheap model); "stop" when a reservation would pass
100 % (refused). Days and months are UTC calendar periods of the injected clock.

Outstanding reservations count against the *current* period whatever period they were made in: a request
reserved at 23:59:59 and settled after midnight holds room in the new day until it settles. That is the
conservative side.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

from runtime.errors import BudgetExceeded
from runtime.settings import BudgetSettings

Clock = Callable[[], float]
_EPS = 1e-12


def day_key(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def month_key(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m")


@dataclass(frozen=True)
class Reservation:
    """The answer to a reserve. ``budget`` names the refusing budget (when refused) or the one nearest its
    limit (when granted; None if no budget applies); ``spent_usd`` is that budget's committed + reserved spend
    (this reservation included when granted) and ``limit_usd`` its limit."""

    granted: bool
    state: str
    budget: str | None = None
    spent_usd: float = 0.0
    limit_usd: float | None = None
    amount_usd: float = 0.0

    def refusal(self, request_id: str) -> BudgetExceeded:
        """The typed error a refused reservation becomes."""
        return BudgetExceeded(
            f"budget {self.budget} would be exceeded: spent ${self.spent_usd:.4f} of ${self.limit_usd or 0:.4f}",
            request_id=request_id, budget=self.budget, spent_usd=self.spent_usd, limit_usd=self.limit_usd)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Held:
    amount: float
    names: tuple[str, ...]
    user_id: str | None
    tenant: str | None


class BudgetBook:
    def __init__(self, budgets: BudgetSettings, clock: Clock = time.time) -> None:
        self.cfg = budgets
        self.clock = clock
        self._committed: dict[tuple[str, str], float] = {}  # (budget name, period key) -> usd
        self._reserved: dict[str, float] = {}                # budget name -> outstanding usd
        self._held: dict[str, _Held] = {}                    # request id -> its reservation
        self._today = ""

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

    @staticmethod
    def _period(period: str, ts: float) -> str:
        return day_key(ts) if period == "day" else month_key(ts)

    def _prune(self, now: float) -> None:
        # committed spend of past periods can never matter again: drop it on the first call of a new day
        today = day_key(now)
        if today == self._today:
            return
        self._today = today
        month = month_key(now)
        self._committed = {k: v for k, v in self._committed.items()
                           if k[1] >= (today if len(k[1]) == 10 else month)}

    def _used(self, name: str, period: str, now: float) -> float:
        return self._committed.get((name, self._period(period, now)), 0.0) + self._reserved.get(name, 0.0)

    # -- reservations -----------------------------------------------------------------------------------------
    def reserve(self, request_id: str, user_id: str | None, tenant: str | None, priority: str,
                amount_usd: float) -> Reservation:
        if amount_usd < 0:
            raise ValueError("a reservation cannot be negative")
        now = self.clock()
        self._prune(now)
        # a repeated reserve for the same request (a retried call, or a fallback to a dearer model) replaces
        # the earlier one; if the new one is refused, the earlier one stands
        previous = self._unhold(request_id)
        cap = self.cfg.critical_hard_cap if priority == "critical" else 1.0
        budgets = self._budgets(user_id, tenant)
        for name, period, limit in budgets:
            used = self._used(name, period, now)
            if used + amount_usd > limit * cap + _EPS:
                if previous is not None:
                    self._hold(request_id, previous)
                return Reservation(False, "stop", name, used, limit, amount_usd)
        self._hold(request_id, _Held(amount_usd, tuple(b[0] for b in budgets), user_id, tenant))
        state, name, used, limit = self._worst(budgets, now)
        if state == "stop":  # only critical traffic is granted past 100 %; it is told to economise
            state = "downgrade"
        return Reservation(True, state, name, used, limit, amount_usd)

    def _hold(self, request_id: str, held: _Held) -> None:
        self._held[request_id] = held
        for name in held.names:
            self._reserved[name] = self._reserved.get(name, 0.0) + held.amount

    def _unhold(self, request_id: str) -> _Held | None:
        held = self._held.pop(request_id, None)
        if held is not None:
            for name in held.names:
                left = self._reserved.get(name, 0.0) - held.amount
                if left > _EPS:
                    self._reserved[name] = left
                else:
                    self._reserved.pop(name, None)
        return held

    def restore(self, request_id: str, user_id: str | None, tenant: str | None, amount_usd: float) -> None:
        """Hold a reservation again without checking limits: one that was granted before a restart and whose
        call may still be in flight (the ledger replays these from its open intents)."""
        self._unhold(request_id)
        self._hold(request_id, _Held(max(0.0, amount_usd), tuple(b[0] for b in self._budgets(user_id, tenant)),
                                     user_id, tenant))

    def held(self, request_id: str) -> _Held | None:
        return self._held.get(request_id)

    def release(self, request_id: str) -> bool:
        """Give back a reservation that will not be billed (the call failed before the API, or was refused).
        Returns whether there was one."""
        return self._unhold(request_id) is not None

    def settle(self, request_id: str, actual_usd: float, *, user_id: str | None = None,
               tenant: str | None = None, ts: float | None = None) -> bool:
        """Replace a reservation by what was really spent. Without a reservation (an actor restart lost it,
        or the row needed none) the spend is still booked, to ``user_id`` / ``tenant``. Returns whether a
        reservation was found."""
        held = self._unhold(request_id)
        if held is not None:
            user_id, tenant = held.user_id, held.tenant
        self.add_spend(user_id, tenant, actual_usd, self.clock() if ts is None else ts)
        return held is not None

    def adjust_spend(self, user_id: str | None, tenant: str | None, delta_usd: float, ts: float) -> None:
        """Correct booked spend by ``delta_usd``, which may be negative: a row priced at its reservation
        (unreconciled) is later replaced by the real bill."""
        if delta_usd == 0:
            return
        self._prune(self.clock())
        for name, period, _limit in self._budgets(user_id, tenant):
            key = (name, self._period(period, ts))
            left = self._committed.get(key, 0.0) + delta_usd
            self._committed[key] = left if left > _EPS else 0.0

    def add_spend(self, user_id: str | None, tenant: str | None, amount: float, ts: float) -> None:
        """Book spend at time ``ts`` (used directly when replaying the ledger)."""
        if amount <= 0:
            return
        self._prune(self.clock())
        for name, period, _limit in self._budgets(user_id, tenant):
            key = (name, self._period(period, ts))
            self._committed[key] = self._committed.get(key, 0.0) + amount

    # -- views -----------------------------------------------------------------------------------------------
    def _worst(self, budgets: list[tuple[str, str, float]], now: float
               ) -> tuple[str, str | None, float, float | None]:
        worst_name, worst_used, worst_limit, worst_ratio = None, 0.0, None, -1.0
        for name, period, limit in budgets:
            used = self._used(name, period, now)
            if used / limit > worst_ratio:
                worst_name, worst_used, worst_limit, worst_ratio = name, used, limit, used / limit
        if worst_name is None:
            return "normal", None, 0.0, None
        if worst_ratio >= 1.0 - _EPS:
            state = "stop"
        elif worst_ratio >= self.cfg.downgrade_at - _EPS:
            state = "downgrade"
        else:
            state = "normal"
        return state, worst_name, worst_used, worst_limit

    def state(self, user_id: str | None, tenant: str | None) -> str:
        now = self.clock()
        self._prune(now)
        return self._worst(self._budgets(user_id, tenant), now)[0]

    def spent(self, name: str, ts: float | None = None) -> float:
        """Committed spend of one budget in the period holding ``ts`` (default now)."""
        period = "month" if name.endswith("monthly") else "day"
        return self._committed.get((name, self._period(period, self.clock() if ts is None else ts)), 0.0)

    def reserved(self, name: str) -> float:
        return self._reserved.get(name, 0.0)

    @property
    def outstanding(self) -> int:
        return len(self._held)
