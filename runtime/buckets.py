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
    """``track=True`` keeps what ``give_back`` needs: the levels the bucket peaked at between takes."""

    __slots__ = ("capacity", "period", "rate", "_level", "_stamp", "_clock", "_seq", "_peaks", "_track")

    def __init__(self, capacity: float, period: float = 60.0, clock: Clock = time.monotonic,
                 level: float | None = None, *, track: bool = False) -> None:
        if capacity <= 0 or period <= 0:
            raise ValueError("capacity and period must be positive")
        self.capacity = float(capacity)
        self.period = float(period)
        self.rate = self.capacity / self.period
        self._clock = clock
        self._stamp = clock()
        self._level = self.capacity if level is None else float(level)
        self._track = track
        self._seq = 0
        # (take number, level just before it, time): the suffix maxima of pre-take levels, so levels decrease
        # from the oldest entry to the newest
        self._peaks: list[tuple[int, float, float]] = []

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
            self._note()
            self._level -= amount
            return True
        return False

    def take(self, amount: float) -> int:
        """Take unconditionally (the level may go negative: a debt repaid by refill). Returns the take's
        number, which ``give_back`` needs."""
        self._refill()
        self._note()
        self._level -= amount
        return self._seq

    @property
    def seq(self) -> int:
        """The number of the latest take."""
        return self._seq

    def _note(self) -> None:
        self._seq += 1
        if not self._track:
            return
        peaks, level = self._peaks, self._level
        while peaks and peaks[-1][1] <= level:
            peaks.pop()
        peaks.append((self._seq, level, self._stamp))
        if len(peaks) > 4_096:  # a long monotone drain: forget the oldest peaks (refunds there get smaller)
            del peaks[:1_024]

    def peak_since(self, seq: int) -> float:
        """The highest level the bucket reached after take number ``seq`` (now included)."""
        level = self._refill()
        peaks = self._peaks
        lo, hi = 0, len(peaks)
        while lo < hi:
            mid = (lo + hi) // 2
            if peaks[mid][0] <= seq:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0 and peaks and seq < peaks[0][0] - 1 and len(peaks) >= 3_072:
            return self.capacity  # history forgotten: assume the worst
        return max(level, peaks[lo][1]) if lo < len(peaks) else level

    def give(self, amount: float) -> None:
        """Return unused units (never above capacity)."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def give_back(self, amount: float, since_seq: int) -> float:
        """Return ``amount`` taken by take number ``since_seq``, as much of it as the server side can also
        have: had those units never been taken, the bucket would have sat higher by ``amount`` and lost the
        refill that pushed it past its capacity. So the refund is capped by capacity minus the highest level
        reached since that take. Returns what was given back. Needs ``track=True``."""
        if amount <= 0:
            return 0.0
        back = min(amount, max(0.0, self.capacity - self.peak_since(since_seq)))
        self._level = min(self.capacity, self._level + back)
        return back

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
