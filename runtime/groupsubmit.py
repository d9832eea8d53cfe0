"""Group submit: many concurrent ``await submit(item)`` calls on one event loop share one batched send.

Every layer that talks to a singleton (limiter grants and reconciles, ledger commits, cache puts, embedding)
needs the same thing: coalesce what arrives together into one call, hand each waiter its own answer, and
never lose track of an item when a waiter gives up. That is this one class::

    async def send(items: list[Estimate]) -> list[Grant | RetryAfter | Exception]:
        return await limiter.acquire_many.remote(items)

    group = GroupSubmitter(send, max_batch=2_000, max_inflight=4,
                           on_orphan=lambda item, grant: refund(grant))
    grant = await group.submit(estimate)            # shares a send with whatever arrived in the same tick
    group.submit_nowait(outcome)                    # fire and forget (errors go to on_error)
    await group.flush()                             # everything submitted so far has been answered

Rules it owns, so no caller re-implements them:

* Items submitted in the same loop tick always share a send; ``linger_s`` waits that much longer for a batch
  to fill (an embedding pool's ~2 ms); ``busy_linger_s`` is waited only while earlier sends are on the wire,
  so a lone item pays no added latency.
* At most ``max_inflight`` sends run at once; the next batch fills meanwhile.
* A waiter cancelled (or timed out) before its item was sent: the item is dropped, never sent.
  A waiter cancelled after the send: its answer goes to ``on_orphan(item, answer)`` (a grant to refund, say).
* ``send`` returns one answer per item, in order; an answer that is an exception instance is raised to that
  waiter only (one bad item does not fail its neighbours). If ``send`` itself raises, every waiter of that
  batch gets the exception. A wrong-length answer fails the whole batch loudly.
* The state is bound to the running loop on first use; used from another loop it starts afresh.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

log = logging.getLogger("claude_runtime.groupsubmit")

T = TypeVar("T")
R = TypeVar("R")

_NOWAIT = object()  # marker for fire-and-forget entries (no future)


class _Entry(Generic[T]):
    __slots__ = ("item", "fut")

    def __init__(self, item: T, fut: asyncio.Future | None) -> None:
        self.item = item
        self.fut = fut


class GroupSubmitter(Generic[T, R]):
    def __init__(self, send: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]], *,
                 max_batch: int = 512, max_inflight: int = 1, linger_s: float = 0.0, busy_linger_s: float = 0.0,
                 on_orphan: Callable[[T, R], None] | None = None,
                 on_error: Callable[[BaseException, list[T]], None] | None = None,
                 name: str = "group") -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be >= 1")
        self._send = send
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.linger_s = linger_s
        self.busy_linger_s = busy_linger_s
        self._on_orphan = on_orphan
        self._on_error = on_error
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Entry[T]] = []
        self._pump: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()
        self._slots: asyncio.Semaphore | None = None
        self.stats = {"sends": 0, "items": 0, "dropped": 0, "orphans": 0, "send_errors": 0}

    # -- public -------------------------------------------------------------------------------------------
    async def submit(self, item: T, timeout: float | None = None) -> R:
        """The answer for ``item``. ``timeout`` (seconds) gives up waiting; see the module rules for what
        happens to an item whose waiter gave up."""
        fut = self._enqueue(item, wait=True)
        if timeout is None:
            return await fut
        return await asyncio.wait_for(fut, timeout)

    def submit_nowait(self, item: T) -> None:
        """Queue ``item`` with nobody waiting; a failure goes to ``on_error`` (or the log)."""
        self._enqueue(item, wait=False)

    async def flush(self) -> None:
        """Wait until every item submitted so far has been sent and answered."""
        self._bind()
        while self._pending or self._sends or (self._pump is not None and not self._pump.done()):
            waits = [*self._sends]
            if self._pump is not None and not self._pump.done():
                waits.append(self._pump)
            if not waits:
                await asyncio.sleep(0)
                continue
            await asyncio.wait(waits)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def inflight(self) -> int:
        return len(self._sends)

    # -- internals ----------------------------------------------------------------------------------------
    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._pending = []
            self._pump = None
            self._sends = set()
            self._slots = asyncio.Semaphore(self.max_inflight)
        return loop

    def _enqueue(self, item: T, wait: bool) -> asyncio.Future:
        loop = self._bind()
        fut = loop.create_future() if wait else None
        self._pending.append(_Entry(item, fut))
        if self._pump is None or self._pump.done():
            self._pump = loop.create_task(self._run_pump())
        return fut  # type: ignore[return-value]

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(0)  # whatever is submitted in this tick joins the batch
            linger = self.linger_s + (self.busy_linger_s if self._sends else 0.0)
            if linger > 0 and len(self._pending) < self.max_batch:
                await asyncio.sleep(linger)
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._run_send(batch))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    def _take(self) -> list[_Entry[T]]:
        batch: list[_Entry[T]] = []
        rest: list[_Entry[T]] = []
        for e in self._pending:
            if e.fut is not None and e.fut.done():  # waiter gone before the send: never sent
                self.stats["dropped"] += 1
            elif len(batch) < self.max_batch:
                batch.append(e)
            else:
                rest.append(e)
        self._pending = rest
        return batch

    async def _run_send(self, batch: list[_Entry[T]]) -> None:
        try:
            self.stats["sends"] += 1
            self.stats["items"] += len(batch)
            try:
                answers = await self._send([e.item for e in batch])
                if answers is None or len(answers) != len(batch):
                    raise RuntimeError(f"{self.name}: send answered {0 if answers is None else len(answers)} "
                                       f"items for a batch of {len(batch)}")
            except BaseException as exc:  # noqa: BLE001 - every waiter of the batch hears it
                self.stats["send_errors"] += 1
                self._fail(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            for e, ans in zip(batch, answers):
                self._deliver(e, ans)
        finally:
            self._slots.release()

    def _deliver(self, e: _Entry[T], ans: Any) -> None:
        if e.fut is None:
            if isinstance(ans, BaseException):
                self._report(ans, [e.item])
            return
        if e.fut.done():  # the waiter gave up after the send: the answer must not be lost
            self.stats["orphans"] += 1
            if self._on_orphan is not None and not isinstance(ans, BaseException):
                try:
                    self._on_orphan(e.item, ans)
                except Exception:  # noqa: BLE001
                    log.exception("%s: orphan handler failed", self.name)
            return
        if isinstance(ans, BaseException):
            e.fut.set_exception(ans)
        else:
            e.fut.set_result(ans)

    def _fail(self, batch: list[_Entry[T]], exc: BaseException) -> None:
        nowait = []
        for e in batch:
            if e.fut is None:
                nowait.append(e.item)
            elif not e.fut.done():
                e.fut.set_exception(exc if not isinstance(exc, asyncio.CancelledError)
                                    else RuntimeError(f"{self.name}: send cancelled"))
        if nowait:
            self._report(exc, nowait)

    def _report(self, exc: BaseException, items: list[T]) -> None:
        if self._on_error is not None:
            try:
                self._on_error(exc, items)
                return
            except Exception:  # noqa: BLE001
                log.exception("%s: error handler failed", self.name)
        log.warning("%s: %d fire-and-forget item(s) failed: %s", self.name, len(items), type(exc).__name__)
