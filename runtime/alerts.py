"""Cost and error alerts over the stream of ledger records, one alert per episode rather than per record.

    monitor = AlertMonitor(settings.alerts, clock)
    for alert in monitor.observe(record): ...        # usually [] ; the ledger actor logs / counts / posts them

Episodes:
  * ``request_cost``: a request that cost more than ``request_usd``. Every such request is an offence, but a
    run of them would flood the channel, so at most one alert per minute is raised; it carries how many
    offending requests it stands for (``count``), the ones held back since the last alert included.
  * ``daily_spend``: the UTC day's spend passed ``day_usd``; once per UTC day.
  * ``error_rate``: over the last ``error_window_s``, with at least ``error_min_requests`` requests, the share
    of failed requests passed ``error_rate``; once, until the rate falls back to the threshold or under it.
    Every record is one request here (billed, cache hit or failure): the ledger keeps one row per outcome.

Pure: time comes from the injected clock (window pruning, rate limiting); a record's own ``ts`` places it in
its UTC day and in the error window. ``observe(record, replay=True)`` rebuilds state after a restart without
raising again what was raised before the restart.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

from runtime.budget import day_key
from runtime.records import Record
from runtime.settings import AlertSettings

Clock = Callable[[], float]
REQUEST_COST_INTERVAL_S = 60.0
KINDS = ("request_cost", "daily_spend", "error_rate")


@dataclass(frozen=True)
class Alert:
    kind: str
    message: str
    value: float
    threshold: float
    ts: float
    count: int = 1
    request_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class AlertMonitor:
    def __init__(self, cfg: AlertSettings, clock: Clock = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self._last_cost_alert = float("-inf")
        self._held_back = 0                           # costly requests seen since the last request_cost alert
        self._day_spend: dict[str, float] = {}
        self._day_fired: set[str] = set()
        self._window: deque[tuple[float, bool]] = deque()  # (ts, failed)
        self._window_errors = 0
        self._error_episode = False

    # -- state restore ------------------------------------------------------------------------------------
    def seed_day(self, day: str, spend_usd: float, fired: bool = False) -> None:
        """Restore a day's spend (and whether its alert was already raised) without replaying every row."""
        self._day_spend[day] = spend_usd
        if fired:
            self._day_fired.add(day)

    def mark_fired(self, kind: str, ts: float) -> None:
        """Remember an alert raised before a restart so it is not raised twice."""
        if kind == "daily_spend":
            self._day_fired.add(day_key(ts))
        elif kind == "request_cost":
            self._last_cost_alert = max(self._last_cost_alert, ts)
        elif kind == "error_rate":
            self._error_episode = True

    # -- the stream ------------------------------------------------------------------------------------------
    def observe(self, record: Record, *, replay: bool = False, count_spend: bool = True) -> list[Alert]:
        """Feed one committed record. ``count_spend=False`` when its day's spend was restored by seed_day."""
        now = self.clock()
        alerts: list[Alert] = []
        cost = record.cost_usd

        # a placeholder priced at its worst case is not a request that cost that much
        if cost > self.cfg.request_usd and not replay and record.billed:
            self._held_back += 1
            if now - self._last_cost_alert >= REQUEST_COST_INTERVAL_S:
                n = self._held_back
                more = f" ({n} such requests since the last alert)" if n > 1 else ""
                alerts.append(Alert("request_cost",
                                    f"request {record.request_id} on {record.model} cost ${cost:.4f}, over "
                                    f"${self.cfg.request_usd:.4f}{more}",
                                    cost, self.cfg.request_usd, now, n, record.request_id))
                self._last_cost_alert = now
                self._held_back = 0

        if cost > 0 and count_spend:
            day = day_key(record.ts)
            total = self._day_spend.get(day, 0.0) + cost
            self._day_spend[day] = total
            if total > self.cfg.day_usd and day not in self._day_fired:
                self._day_fired.add(day)
                if not replay:
                    alerts.append(Alert("daily_spend",
                                        f"spend on {day} (UTC) reached ${total:.2f}, over ${self.cfg.day_usd:.2f}",
                                        total, self.cfg.day_usd, now))
            if len(self._day_spend) > 3:  # only today (and a clock-skewed neighbour) can still fire
                for old in sorted(self._day_spend)[:-3]:
                    del self._day_spend[old]

        failed = record.status == "error"
        self._window.append((record.ts, failed))
        self._window_errors += failed
        rate, n = self._error_rate(now)
        if n >= self.cfg.error_min_requests and rate > self.cfg.error_rate:
            if not self._error_episode:
                self._error_episode = True
                if not replay:
                    alerts.append(Alert("error_rate",
                                        f"{rate:.1%} of {n} requests failed in the last "
                                        f"{self.cfg.error_window_s:.0f} s, over {self.cfg.error_rate:.1%}",
                                        rate, self.cfg.error_rate, now, n))
        elif rate <= self.cfg.error_rate:
            # a rate back at or under the threshold ends the episode even in a thin window; a thin window
            # (fewer than error_min_requests) can never start one
            self._error_episode = False
        return alerts

    def _error_rate(self, now: float) -> tuple[float, int]:
        horizon = now - self.cfg.error_window_s
        while self._window and self._window[0][0] < horizon:
            _, failed = self._window.popleft()
            self._window_errors -= failed
        n = len(self._window)
        return (self._window_errors / n if n else 0.0), n

    def error_rate(self) -> tuple[float, int]:
        """(failed share, requests) over the current window."""
        return self._error_rate(self.clock())

    def day_spend(self, day: str) -> float:
        return self._day_spend.get(day, 0.0)
