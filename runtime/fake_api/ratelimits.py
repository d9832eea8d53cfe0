"""The server side of Anthropic's rate limits: RPM, ITPM and OTPM token buckets per model class.

ITPM counts uncached input plus cache writes (cache reads are free of it). OTPM is charged at ``max_tokens`` on
admission and corrected to the actual output when the response ends. A request is admitted only if all three
buckets can pay; otherwise nothing is taken and the answer is the longest wait among the refusing buckets.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from runtime.buckets import TokenBucket
from runtime.settings import ClassLimits

UNLIMITED = 1_000_000_000


class _ClassBuckets:
    __slots__ = ("rpm", "itpm", "otpm")

    def __init__(self, lim: ClassLimits, period: float, clock: Callable[[], float]) -> None:
        self.rpm = TokenBucket(lim.rpm, period, clock)
        self.itpm = TokenBucket(lim.itpm, period, clock)
        self.otpm = TokenBucket(lim.otpm, period, clock)


_rfc_cache: dict[int, str] = {}


def rfc3339(epoch_s: float) -> str:
    sec = int(math.ceil(epoch_s))
    s = _rfc_cache.get(sec)
    if s is None:
        if len(_rfc_cache) > 4096:
            _rfc_cache.clear()
        s = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec))
        _rfc_cache[sec] = s
    return s


class RateLimits:
    def __init__(self, limits: dict[str, ClassLimits] | None, period: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.period = period
        self.configure(limits)

    def configure(self, limits: dict[str, ClassLimits] | None) -> None:
        """Adopt new limits; buckets start full."""
        self.limits = limits
        self._buckets: dict[str, _ClassBuckets] = (
            {} if limits is None else {c: _ClassBuckets(l, self.period, self._clock) for c, l in limits.items()}
        )

    def reset(self) -> None:
        self.configure(self.limits)

    def _get(self, cls: str) -> _ClassBuckets | None:
        return self._buckets.get(cls)

    def admit(self, cls: str, input_tokens: int, max_tokens: int) -> float:
        """0.0 if the request may proceed (nothing taken yet), else seconds to wait before retrying."""
        b = self._buckets.get(cls)
        if b is None:
            return 0.0
        wait = 0.0
        for bucket, amount in ((b.rpm, 1), (b.itpm, input_tokens), (b.otpm, max_tokens)):
            if not bucket.can_take(amount):
                w = bucket.wait_time(amount)
                # a request larger than the whole bucket can never pass: say one period, as the API does
                wait = max(wait, self.period if math.isinf(w) else w)
        return wait

    def take_request(self, cls: str) -> None:
        b = self._buckets.get(cls)
        if b is not None:
            b.rpm.take(1)

    def take(self, cls: str, input_tokens: int, max_tokens: int) -> None:
        b = self._buckets.get(cls)
        if b is not None:
            b.rpm.take(1)
            b.itpm.take(input_tokens)
            b.otpm.take(max_tokens)

    def settle(self, cls: str, charged_output: int, actual_output: int) -> None:
        b = self._buckets.get(cls)
        if b is not None and charged_output != actual_output:
            if charged_output > actual_output:
                b.otpm.give(charged_output - actual_output)
            else:
                b.otpm.take(actual_output - charged_output)

    def headers(self, cls: str, out: dict[str, str]) -> None:
        """Add the ``anthropic-ratelimit-*`` headers for ``cls`` to ``out``."""
        now = time.time()
        b = self._buckets.get(cls)
        if b is None:
            big, reset = str(UNLIMITED), rfc3339(now)
            for name in ("requests", "input-tokens", "output-tokens", "tokens"):
                out[f"anthropic-ratelimit-{name}-limit"] = big
                out[f"anthropic-ratelimit-{name}-remaining"] = big
                out[f"anthropic-ratelimit-{name}-reset"] = reset
            return
        tightest = None
        for name, bucket in (("requests", b.rpm), ("input-tokens", b.itpm), ("output-tokens", b.otpm)):
            level = bucket.level
            remaining = int(level) if level > 0 else 0
            out[f"anthropic-ratelimit-{name}-limit"] = str(int(bucket.capacity))
            out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
            out[f"anthropic-ratelimit-{name}-reset"] = rfc3339(now + bucket.reset_time())
            if name != "requests" and (tightest is None or remaining < tightest[1]):
                tightest = (name, remaining)
        assert tightest is not None
        # "tokens" reports the most restrictive of the two token limits
        name = tightest[0]
        for part in ("limit", "remaining", "reset"):
            out[f"anthropic-ratelimit-tokens-{part}"] = out[f"anthropic-ratelimit-{name}-{part}"]

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {c: {"rpm": b.rpm.level, "itpm": b.itpm.level, "otpm": b.otpm.level}
                for c, b in self._buckets.items()}
