"""The prefix port: how a request learns whether its prompt prefix is warm and who writes it, wherever the
``PrefixTracker`` (runtime/prompt_cache.py) lives.

The pipeline asks once per attempt and never sees a WAIT: ``claim`` waits it out (woken when a write ends,
re-asking every ``poll_s`` otherwise) and answers LEAD, WARM or PASS. Afterwards the request reports what the
API did (``finish``) or that no answer came (``abandon``)::

    d = await port.claim(PrefixAsk(plan.prefix_hash, model, plan.prefix_tokens, deadline_in_s=12.0))
    ...call the API...
    port.finish(plan.prefix_hash, model, wrote, read, ttl=plan.ttl, token=d.token)    # or port.abandon(...)

Only relative times cross process boundaries (``deadline_in_s``, ``waited_s``, a decision's ``until`` as
seconds from now): clocks differ between processes and nodes. Two hosts here: ``LocalPrefixes`` (one tracker in
this process, for tests and a single caller) and ``actors/limiter.PrefixClient`` (the limiter actor's tracker,
shared cluster-wide, asks batched). Both share ``Waiting`` below.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Protocol

from runtime.prompt_cache import TTL, Decision, PrefixTracker
from runtime.settings import Settings


@dataclass(frozen=True)
class PrefixAsk:
    """One request's question about one prefix (what travels to the tracker's host: never the params)."""

    prefix: str
    model: str
    prefix_tokens: int = 0
    deadline_in_s: float | None = None   # how much longer this request may wait at most
    waited_s: float = 0.0                # how long it has waited for this prefix already


@dataclass(frozen=True)
class PrefixReport:
    """What happened to a request that sent the prefix marked: a response (``answered``: what it wrote and
    read) or none at all (``answered=False``: an error, a cancellation)."""

    prefix: str
    model: str
    token: int | None = None
    answered: bool = True
    wrote: bool = False
    read: bool = False
    ttl: TTL | None = None


def decide_many(tracker: PrefixTracker, asks: list[PrefixAsk], now: float) -> list[Decision]:
    """The tracker's decisions at ``now`` (its own clock), with ``until`` turned into seconds from now."""
    out = []
    for a in asks:
        d = tracker.begin(a.prefix, a.model, now, prefix_tokens=a.prefix_tokens,
                          deadline=None if a.deadline_in_s is None else now + max(0.0, a.deadline_in_s),
                          waiting_since=now - max(0.0, a.waited_s))
        out.append(d if d.until is None else replace(d, until=max(0.0, d.until - now)))
    return out


def report_many(tracker: PrefixTracker, reports: list[PrefixReport], now: float) -> list[bool]:
    """Apply reports; True where a write in flight ended (its waiters should ask again now)."""
    out = []
    for r in reports:
        if r.answered:
            out.append(tracker.finish(r.prefix, r.model, r.wrote, r.read, now, ttl=r.ttl, token=r.token))
        else:
            out.append(tracker.abandon(r.prefix, r.model, r.token, now))
    return out


class PrefixPort(Protocol):
    async def claim(self, ask: PrefixAsk) -> Decision: ...

    def finish(self, prefix: str, model: str, wrote: bool, read: bool, *, ttl: TTL | None,
               token: int | None) -> None: ...

    def abandon(self, prefix: str, model: str, token: int | None) -> None: ...


class Waiting:
    """``claim`` over any ``_ask`` (one decision, ``until`` relative): waits out WAIT answers on a per-prefix
    event that ``_wake`` sets, re-asking at least every ``poll_s`` (a write ending in another process is only
    seen by asking). Subclasses provide ``_ask`` and ``_report``."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self.stats = {"claims": 0, "waited": 0, "lead": 0, "warm": 0, "pass": 0}

    async def _ask(self, ask: PrefixAsk) -> Decision:
        raise NotImplementedError

    def _report(self, r: PrefixReport) -> None:
        raise NotImplementedError

    async def claim(self, ask: PrefixAsk) -> Decision:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.stats["claims"] += 1
        waited = False
        while True:
            spent = loop.time() - t0
            left = None if ask.deadline_in_s is None else max(0.0, ask.deadline_in_s - spent)
            d = await self._ask(replace(ask, deadline_in_s=left, waited_s=ask.waited_s + spent))
            if d.kind != "wait":
                self.stats[d.kind] += 1
                self.stats["waited"] += waited
                if waited:
                    # the wait is over for everyone here: the others ask again now, not at their next poll
                    self._wake(ask.prefix, ask.model)
                return d
            waited = True
            pause = min(d.until if d.until is not None else self.poll_s, d.poll_s or self.poll_s, self.poll_s)
            key = (ask.prefix, ask.model)
            ev = self._events.get(key)
            if ev is None:
                ev = self._events[key] = asyncio.Event()
            try:
                await asyncio.wait_for(ev.wait(), max(pause, 0.001))
            except asyncio.TimeoutError:
                pass

    def _wake(self, prefix: str, model: str) -> None:
        ev = self._events.pop((prefix, model), None)
        if ev is not None:
            ev.set()

    def finish(self, prefix: str, model: str, wrote: bool, read: bool, *, ttl: TTL | None,
               token: int | None) -> None:
        self._report(PrefixReport(prefix, model, token, True, wrote, read, ttl))

    def abandon(self, prefix: str, model: str, token: int | None) -> None:
        self._report(PrefixReport(prefix, model, token, False))


class LocalPrefixes(Waiting):
    """A tracker in this process: single-flight among the requests of this process only. What a pipeline
    uses when it is given no prefix port (tests, a one-process deployment)."""

    def __init__(self, settings: Settings, clock=None) -> None:
        import time

        super().__init__(settings.prompt_cache.wait_poll_s)
        self.tracker = PrefixTracker(settings)
        self._clock = clock or time.monotonic

    async def _ask(self, ask: PrefixAsk) -> Decision:
        return decide_many(self.tracker, [ask], self._clock())[0]

    def _report(self, r: PrefixReport) -> None:
        if report_many(self.tracker, [r], self._clock())[0]:
            self._wake(r.prefix, r.model)
