"""Waiting for budget room: the asyncio side of the budget queue in runtime/budget.py.

``BudgetBook`` decides (granted / queued / refused) and never waits. ``BudgetGate`` is what its owner (the
ledger actor, or an in-memory ledger in tests) awaits: a queued admission parks one future per ticket, and
``changed()`` hands every fate ``on_change`` decides to its waiter. The owner calls ``changed()`` after anything
that frees room or moves time (a settle, a release, a spend correction); the gate itself calls it after each
admission, when a waiter gives up, and from a timer set at the book's ``next_deadline`` (that is how tickets
expire without anybody settling anything)::

    gate = BudgetGate(book)
    res = await gate.admit(rid, user, tenant, "normal", worst_usd, owner=o, deadline=time.time() + 30)
    # res.granted, or refused (res.reason: cannot_fit / expired / queue_full / no_room / replaced)
    ...
    book.settle(rid, actual_usd, owner=o)
    gate.changed()

Nothing here blocks: waiters are coroutines parked on futures, all on the caller's one event loop.
"""

from __future__ import annotations

import asyncio
import logging

from runtime.budget import BudgetBook, Reservation

log = logging.getLogger("claude_runtime.budget")


class BudgetGate:
    def __init__(self, book: BudgetBook) -> None:
        self.book = book
        self._waiters: dict[int, asyncio.Future] = {}   # ticket -> the future its waiter awaits
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.stats = {"waited": 0, "granted_after_wait": 0, "refused_after_wait": 0, "abandoned": 0}

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def admit(self, request_id: str, user_id: str | None, tenant: str | None, priority: str,
                    amount_usd: float, *, owner: str | None = None, model: str | None = None,
                    route: str | None = None, max_tokens: int | None = None,
                    deadline: float | None = None) -> Reservation:
        """Granted, or refused; never "queued": a request that must wait for room waits here, up to
        ``deadline`` (book-clock time). Without a deadline it never waits (refused when there is no room now,
        the behaviour before the queue)."""
        res = self.book.admit(request_id, user_id, tenant, priority, amount_usd, owner=owner, model=model,
                              route=route, max_tokens=max_tokens, deadline=deadline, queue=deadline is not None)
        if not res.queued:
            self.changed()  # a shrunk reservation gives room back; a replaced ticket's fate goes out
            return res
        fut = asyncio.get_running_loop().create_future()
        self._waiters[res.ticket] = fut
        self.stats["waited"] += 1
        self.changed()  # arms the deadline timer
        try:
            fate = await fut
        except asyncio.CancelledError:
            self._give_up(res.ticket, fut)
            raise
        self.stats["granted_after_wait" if fate.granted else "refused_after_wait"] += 1
        return fate

    def changed(self) -> None:
        """Hand out what the book can decide now, and set the timer for the next deadline."""
        while True:
            released = False
            for fate in self.book.on_change():
                fut = self._waiters.pop(fate.ticket, None) if fate.ticket is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(fate)
                elif fate.granted:
                    # nobody waits for this grant any more: its room goes back to the queue at once
                    released |= self.book.release(fate.request_id, owner=fate.owner)
                    self.stats["abandoned"] += 1
            if not released:
                break
        self._arm()

    def _give_up(self, ticket: int, fut: asyncio.Future) -> None:
        """The waiter was cancelled (its caller went away): take its ticket out, or give back what it got."""
        self._waiters.pop(ticket, None)
        self.stats["abandoned"] += 1
        if fut.done() and not fut.cancelled():
            fate = fut.result()  # decided just before the cancellation reached the waiter
            if fate.granted:
                self.book.release(fate.request_id, owner=fate.owner)
        else:
            # still waiting (every fate the book decides reaches its future in changed(), synchronously)
            self.book.cancel(ticket)
        self.changed()

    # -- the deadline timer ---------------------------------------------------------------------------------
    def _arm(self) -> None:
        nxt = self.book.next_deadline()
        if nxt == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, None
        if nxt is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop, so no waiter either: nothing can expire unseen
            return
        # a hair past the deadline, so the book's clock has reached it when the timer fires
        delay = max(0.0, nxt - self.book.clock()) + 1e-3
        self._timer, self._timer_at = loop.call_later(delay, self._fire), nxt

    def _fire(self) -> None:
        self._timer, self._timer_at = None, None
        try:
            self.changed()
        except Exception:  # noqa: BLE001 - a timer callback has nobody to raise to; the next change retries
            log.exception("budget queue timer failed")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, None

