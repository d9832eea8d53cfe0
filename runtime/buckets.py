"""Continuously refilled token buckets, the way Anthropic meters RPM / ITPM / OTPM.

A bucket of capacity C refills at C per ``period`` seconds, continuously (not in minute windows). Time comes
from an injected clock so tests move it by hand::

    clock = ManualClock()
    b = TokenBucket(capacity=60, period=60, clock=clock)   # 60 per minute = 1 per second
    b.try_take(60)          # True: a full bucket allows a burst of C
    b.try_take(1)           # False
    b.wait_time(1)          # 1.0 seconds until one unit is back
    clock.advance(1.0); b.try_take(1)   # True
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

Clock = Callable[[], float]


class ManualClock:
    """A clock for tests: it moves only when told."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TokenBucket:
    __slots__ = ("capacity", "period", "rate", "_level", "_stamp", "_clock")

    def __init__(self, capacity: float, period: float = 60.0, clock: Clock = time.monotonic,
                 level: float | None = None) -> None:
        if capacity <= 0 or period <= 0:
            raise ValueError("capacity and period must be positive")
        self.capacity = float(capacity)
        self.period = float(period)
        self.rate = self.capacity / self.period
        self._clock = clock
        self._stamp = clock()
        self._level = self.capacity if level is None else float(level)

    def _refill(self) -> float:
        now = self._clock()
        if now > self._stamp:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
            self._stamp = now
        return self._level

    @property
    def level(self) -> float:
        return self._refill()

    def available(self, floor: float = 0.0) -> float:
        """Units that may be taken without going under ``floor``."""
        return self._refill() - floor

    def can_take(self, amount: float, floor: float = 0.0) -> bool:
        return self._refill() - amount >= floor - 1e-9

    def try_take(self, amount: float, floor: float = 0.0) -> bool:
        if self.can_take(amount, floor):
            self._level -= amount
            return True
        return False

    def take(self, amount: float) -> None:
        """Take unconditionally (the level may go negative: a debt repaid by refill)."""
        self._refill()
        self._level -= amount

    def give(self, amount: float) -> None:
        """Return unused units (never above capacity)."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def wait_time(self, amount: float, floor: float = 0.0) -> float:
        """Seconds until ``amount`` can be taken above ``floor``; inf if it never can."""
        need = amount + floor - self._refill()
        if need <= 0:
            return 0.0
        if amount + floor > self.capacity + 1e-9:
            return float("inf")
        return need / self.rate

    def set_capacity(self, capacity: float) -> None:
        """Adopt a new limit (learned from headers); the level keeps its fill ratio's absolute deficit."""
        self._refill()
        deficit = self.capacity - self._level
        self.capacity = float(capacity)
        self.rate = self.capacity / self.period
        self._level = self.capacity - deficit

    def clamp(self, at_most: float) -> None:
        """Lower the level to what the server says remains (another client may share the key)."""
        self._refill()
        if at_most < self._level:
            self._level = at_most

    def reset_time(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self._refill()) / self.rate)


@dataclass(frozen=True)
class BucketSnapshot:
    capacity: float
    level: float
