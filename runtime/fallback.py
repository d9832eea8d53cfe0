"""What to do after a failed call: retry the same model, fall to the next, or surface the error.

Declarative and pure (no SDK, no Ray): the caller maps an exception to an HTTP status (0 for a connection error or
timeout) and asks ``FallbackPolicy.decide``. The rules:

    429                         -> next model in the chain (the limiter already paced us: a 429 means another
                                   client shares the key or the limit changed); retry the same model after
                                   retry-after when there is no next model
    529, 500, 502, 503, 504,
    408, 409, 0 (connection)    -> the same model with exponential backoff and full jitter, at most
                                   ``attempts_per_model`` tries; then the next model
    400, 401, 402, 403, 404,
    413, 422 and other 4xx      -> surface at once, never retried

A per-model circuit breaker opens after ``breaker_failures`` consecutive overloads, so a storm on one model sends
traffic straight down the chain instead of hammering it; after ``breaker_cooldown_s`` one probe is let through.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from runtime.settings import RetrySettings, Settings

RETRY_SAME_STATUSES = frozenset({0, 408, 409, 500, 502, 503, 504, 529})
OVERLOAD_STATUSES = frozenset({0, 500, 502, 503, 504, 529})


class Action(Enum):
    RETRY_SAME = "retry_same"
    NEXT_MODEL = "next_model"
    SURFACE = "surface"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0


def fallback_chain(model: str, settings: Settings) -> list[str]:
    """The model itself, then one model for each class below it in ``retry.fallback_order``."""
    order = list(settings.retry.fallback_order)
    cls = settings.model_info(model).model_class
    chain = [model]
    if cls in order:
        for lower in order[order.index(cls) + 1:]:
            nxt = settings.class_model(lower)
            if nxt not in chain:
                chain.append(nxt)
    return chain


def sane_retry_after(value: float | None, cap_s: float) -> float | None:
    """A server's retry-after as a usable delay: NaN, infinite or negative values (a broken or hostile
    server) are ignored rather than slept on, and a long one is capped so the deadline logic stays in charge."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if v != v or v in (float("inf"), float("-inf")) or v < 0:
        return None
    return min(v, max(cap_s, 60.0))


@dataclass
class FallbackPolicy:
    retry: RetrySettings
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt_on_model: int) -> float:
        """Full jitter over min(base * 2^(n-1), max) for the n-th retry of one model."""
        cap = min(self.retry.backoff_max_s, self.retry.backoff_base_s * (2 ** max(0, attempt_on_model - 1)))
        return self.rng.uniform(cap / 2, cap)

    def decide(self, status: int, attempt_on_model: int, has_next: bool,
               retry_after_s: float | None = None) -> Decision:
        """``attempt_on_model``: how many tries this model has had, the failed one included."""
        retry_after_s = sane_retry_after(retry_after_s, self.retry.backoff_max_s)
        if status == 429:
            if has_next:
                return Decision(Action.NEXT_MODEL)
            if attempt_on_model < self.retry.attempts_per_model:
                return Decision(Action.RETRY_SAME, retry_after_s if retry_after_s is not None
                                else self.backoff(attempt_on_model))
            return Decision(Action.SURFACE)
        if status in RETRY_SAME_STATUSES:
            if attempt_on_model < self.retry.attempts_per_model:
                return Decision(Action.RETRY_SAME, self.backoff(attempt_on_model))
            return Decision(Action.NEXT_MODEL) if has_next else Decision(Action.SURFACE)
        return Decision(Action.SURFACE)


class CircuitBreaker:
    """Consecutive overloads per model; open -> skip the model until the cooldown passes, then one probe."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._count: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def allow(self, model: str) -> bool:
        until = self._open_until.get(model)
        if until is None:
            return True
        if self._clock() >= until:
            # half-open: let one probe through; a failure re-opens at once
            del self._open_until[model]
            self._count[model] = self.failures - 1
            return True
        return False

    def record(self, model: str, status: int) -> None:
        if status in OVERLOAD_STATUSES:
            n = self._count.get(model, 0) + 1
            self._count[model] = n
            if n >= self.failures:
                self._open_until[model] = self._clock() + self.cooldown_s
        else:
            self._count.pop(model, None)
            self._open_until.pop(model, None)

    def is_open(self, model: str) -> bool:
        until = self._open_until.get(model)
        return until is not None and self._clock() < until


class Move(Enum):
    CALL = "call"          # call ``model`` (on one of ``upstreams``) after ``delay_s``
    SURFACE = "surface"    # stop: the last failure is the request's answer


# failures another upstream may not share: the same model is tried there before a cheaper model
FAILOVER_STATUSES = frozenset({0, 408, 409, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class Step:
    move: Move
    model: str | None = None
    delay_s: float = 0.0
    why: str = ""
    upstreams: tuple[str, ...] = ()  # where the call may go (empty: the only upstream)


class FallbackRun:
    """One request's walk down its fallback chain, across upstreams, as an explicit state machine.

    States: TRYING(model, its upstreams, tries on the model) -> success: DONE; failure -> one of
    FAILOVER (429 / 529 / 5xx / timeout: the same model on an upstream not yet tried, at once),
    RETRY_SAME (same model, every upstream again, after a backoff that must end before the deadline),
    NEXT (the next model in the chain with an upstream whose circuit lets it through; the last model is always
    tried), SURFACE (nothing left, or a 4xx)::

        run = FallbackRun(chain, policy, breaker, deadline_at=clock() + 30, upstreams=lambda m: ["a", "b"])
        step = run.start()
        while step.move is Move.CALL:
            ...call step.model on one of step.upstreams after step.delay_s...
            if ok: run.succeeded(upstream); break
            step = run.failed(status, retry_after_s, upstream)

    Circuit breakers are per (model, upstream) and shared by every request of a caller; the policy decides per
    failure. Pure: time comes from ``clock``.
    """

    def __init__(self, chain: list[str], policy: FallbackPolicy, breaker: CircuitBreaker, *,
                 deadline_at: float, clock: Callable[[], float] = time.monotonic,
                 upstreams: Callable[[str], list[str]] | None = None) -> None:
        if not chain:
            raise ValueError("a fallback chain needs at least one model")
        self.chain = list(chain)
        self.policy = policy
        self.breaker = breaker
        self.deadline_at = deadline_at
        self.clock = clock
        self.upstreams_of = upstreams or (lambda model: [""])
        self.idx = 0
        self.tries_on_model = 0
        self.excluded: set[str] = set()
        self.history: list[dict] = []
        self.done = False

    @property
    def model(self) -> str:
        return self.chain[self.idx]

    @staticmethod
    def key(model: str, upstream: str) -> str:
        return f"{model}@{upstream}" if upstream else model

    def _has_next(self) -> bool:
        return self.idx + 1 < len(self.chain)

    def _open(self, model: str) -> list[str]:
        return [u for u in self.upstreams_of(model)
                if u not in self.excluded and self.breaker.allow(self.key(model, u))]

    def _enter(self, idx: int, delay_s: float = 0.0, why: str = "") -> Step:
        """Move to chain[idx] or the first model after it with an upstream whose circuit is closed (the last
        model always runs, on every upstream)."""
        self.idx = idx
        self.tries_on_model = 0
        self.excluded = set()
        while self._has_next() and not self._open(self.model):
            self.history.append({"model": self.model, "status": "circuit_open"})
            self.idx += 1
            why = why or "circuit open"
        return self._call(delay_s, why)

    def _call(self, delay_s: float, why: str) -> Step:
        self.tries_on_model += 1
        ups = self._open(self.model) or [u for u in self.upstreams_of(self.model) if u not in self.excluded]
        return Step(Move.CALL, self.model, delay_s, why, tuple(ups or self.upstreams_of(self.model)))

    def start(self) -> Step:
        return self._enter(0)

    def restart(self, chain: list[str], why: str) -> Step:
        """A new chain (a budget downgrade) from its first model, keeping the history."""
        self.chain = list(chain)
        return self._enter(0, why=why)

    def failed(self, status: int, retry_after_s: float | None = None, upstream: str = "") -> Step:
        model = self.model
        self.breaker.record(self.key(model, upstream), status)
        entry = {"model": model, "status": status}
        if upstream:
            entry["upstream"] = upstream
        self.history.append(entry)
        if status in FAILOVER_STATUSES and upstream:
            self.excluded.add(upstream)
            left = self._open(model)
            if left:  # the same model elsewhere, at once: another upstream need not share this one's trouble
                return Step(Move.CALL, model, 0.0, f"failover after {status} on {upstream}", tuple(left))
        d = self.policy.decide(status, self.tries_on_model, self._has_next(), retry_after_s)
        if d.action is Action.SURFACE:
            return Step(Move.SURFACE, model, why=f"{status} is not retried" if status not in
                        RETRY_SAME_STATUSES and status != 429 else "fallback chain exhausted")
        if d.action is Action.NEXT_MODEL or (self._has_next() and not self._any_closed(model)):
            # a retry of a model whose circuits this failure opened would hit the storm again: move on
            return self._enter(self.idx + 1, why=f"fallback after {status} on {model}")
        if self.clock() + d.delay_s > self.deadline_at:
            return Step(Move.SURFACE, model, why="deadline before the next retry")
        self.excluded = set()
        return self._call(d.delay_s, f"retry after {status}")

    def _any_closed(self, model: str) -> bool:
        return any(not self.breaker.is_open(self.key(model, u)) for u in self.upstreams_of(model))

    def succeeded(self, upstream: str = "") -> None:
        self.breaker.record(self.key(self.model, upstream), 200)
        entry = {"model": self.model, "status": 200}
        if upstream:
            entry["upstream"] = upstream
        self.history.append(entry)
        self.done = True
