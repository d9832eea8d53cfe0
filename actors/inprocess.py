"""A caller inside the process that started the runtime: ``rt.call`` / ``rt.acall`` with no Ray hop.

A request sent to a caller actor crosses two Ray hops (driver -> caller -> driver, ~3.5 ms with the
``Result`` on these machines) on top of the pipeline. With leases and the caller's journal nothing else leaves
the process on the way to the API, so the hop is most of what the runtime adds to a call. A driver that holds
the upstreams' credentials (the one that called ``runtime.start`` with them) can run the same pipeline
itself: ``Settings.callers.in_process=True`` builds a ``CallerActor`` here, on an event loop of its own
thread, with the same ports (limiter and budget leases, its own journal drained to the ledger, the cache and
the embedding pool through their actors). The guarantees are the pipeline's, unchanged.

Its journal is named after this process (``inproc-<host>-<pid>-<tag>``) and held under an exclusive ``flock``
for the process's life. A driver that dies leaves the journal behind, unlocked: the next in-process caller
started on that node for the same runtime drains it to the ledger and books the dead process's unanswered
calls as unreconciled rows (what a restarted caller actor does for its own earlier lives). A driver that
exits normally drains its journal first (``close``, also at interpreter exit).
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import logging
import os
import socket
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray

from actors.caller import CallerActor, journal_path
from actors.journal import Journal
from runtime.request import NormalizedRequest
from runtime.result import Result
from runtime.settings import Settings, UpstreamSettings

log = logging.getLogger("claude_runtime.inprocess")

PREFIX = "inproc-"


def _lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on ``path`` (created if missing): the fd, or None when another live
    process holds it. The kernel releases it when its holder dies, however it dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove(journal: Path) -> None:
    for p in (journal, journal.with_suffix(journal.suffix + ".drained"), journal.with_suffix(".lock")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def adopt_orphans(settings: Settings, ledger: Any, own: str | None = None) -> list[str]:
    """Drain the journals that dead in-process callers of this runtime left on this node, and book their
    unanswered calls. Returns the names adopted."""
    folder = Path(journal_path(settings, PREFIX + "x")).parent
    adopted = []
    for journal in sorted(folder.glob(PREFIX + "*.jsonl")):
        name = journal.name[: -len(".jsonl")]
        if name == own:
            continue
        # the owner takes this lock before its journal exists, so a journal whose lock is free is an orphan
        fd = _lock(journal.with_suffix(".lock"))
        if fd is None:
            continue
        try:
            if not journal.exists():  # another adopter finished it meanwhile
                continue
            j = Journal(journal)
            try:
                while batch := j.pending():
                    ray.get(ledger.apply_journal.remote(batch))
                    j.acknowledge(len(batch))
            finally:
                j.close()
            ray.get(ledger.caller_restarted.remote(name, f"adopted-{uuid.uuid4().hex[:8]}"))
            _remove(journal)
            adopted.append(name)
            log.info("drained the journal of in-process caller %s (its process is gone)", name)
        finally:
            os.close(fd)
    return adopted


def _new_loop() -> asyncio.AbstractEventLoop:
    # uvloop where installed (a dependency; Ray's async actors run on it too): cheaper wake-ups from the
    # calling thread and cheaper socket I/O than the default loop
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


class InProcessCaller:
    """Runs the pipeline in this process on a daemon thread's event loop; ``call`` blocks, ``acall`` awaits."""

    def __init__(self, settings: Settings, upstreams: list[UpstreamSettings], limiter: Any, ledger: Any,
                 cache: Any = None, pool: Any = None) -> None:
        self.name = f"{PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        public = settings.without_secrets()
        self._journal = Path(journal_path(public, self.name))
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self._journal.with_suffix(".lock")) if public.ledger.local_journal else None
        adopt_orphans(public, ledger, own=self.name)
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="claude-runtime-caller", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> CallerActor:
            # built on the loop that runs it: its clients bind their asyncio primitives to this loop
            return CallerActor(public, upstreams, limiter, ledger, cache, name=self.name)

        try:
            self.caller = self._submit(make()).result()
        except BaseException:
            self._stop_loop()
            raise
        self._reporter: asyncio.Future | None = None
        if pool is not None:
            # the pool does not run this caller, but `claude-runtime status` asks the pool: tell it how we stand
            self._reporter = self._submit(self._report(pool))
        atexit.register(self.close)

    async def _report(self, pool: Any) -> None:
        from actors.pool import OUTSIDE_REPORT_S

        while True:
            try:
                pool.report.remote(self.name, self.caller.load())  # not awaited: a status row, nothing more
            except Exception:  # noqa: BLE001 - the pool restarting: the next report gets there
                pass
            await asyncio.sleep(OUTSIDE_REPORT_S)

    def _submit(self, coro: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, req: NormalizedRequest) -> Result:
        if threading.current_thread() is self._thread:
            # blocking the loop that would run it can only hang
            raise RuntimeError("rt.call() from the runtime's own event loop: use `await rt.acall(...)`")
        return self._submit(self.caller.handle(req)).result()

    async def acall(self, req: NormalizedRequest) -> Result:
        if asyncio.get_running_loop() is self._loop:
            # called from our own loop's thread (a callback of ours): no hop needed. Decided before anything is
            # submitted: submitting as well would run the request twice, two calls billed under one request id
            return await self.caller.handle(req)
        return await asyncio.wrap_future(self._submit(self.caller.handle(req)))

    def reconfigure(self, settings: Settings, upstreams: list[UpstreamSettings]) -> None:
        async def go() -> None:
            await self.caller.reconfigure(settings.without_secrets(), upstreams)

        self._submit(go()).result()

    def flush(self, timeout: float = 120.0) -> int:
        return self._submit(self.caller.flush()).result(timeout)

    def in_flight(self) -> int:
        return self.caller._in_flight

    def close(self, timeout: float = 60.0) -> None:
        """Drain the journal to the ledger and stop the loop (requests still running are abandoned: their
        intents are journaled, so the next in-process caller on this node books them)."""
        if self._closed:
            return
        self._closed = True
        if self._reporter is not None:
            self._reporter.cancel()
        drained = False
        if ray.is_initialized():
            try:
                self.flush(timeout)
                drained = True
            except Exception:  # noqa: BLE001 - the ledger is gone or slow: the journal stays for adoption
                log.warning("in-process caller %s could not drain its journal at close", self.name)
        self._stop_loop()
        journal = getattr(self.caller, "_journal", None) if hasattr(self, "caller") else None
        if journal is not None:
            journal.close()
            if drained and not len(journal):
                _remove(self._journal)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass

    def _stop_loop(self) -> None:
        if not self._loop.is_running():
            return

        async def cancel_all() -> None:
            # the clients' background loops (lease renewal, journal drain): ended, not left pending
            admission = self.caller.pipeline.ports.admission if hasattr(self, "caller") else None
            if getattr(admission, "book", None) is not None:
                try:  # the capacity leases go back now rather than when they expire
                    await asyncio.wait_for(admission.refresh(close=True), timeout=5)
                except Exception:  # noqa: BLE001 - the limiter reclaims them at expiry
                    pass
            if hasattr(self, "caller"):
                for t in self.caller.pipeline.ports.transports.values():
                    try:  # an aiohttp session is closed on its own loop, or it warns at exit
                        await t.client.close()
                    except Exception:  # noqa: BLE001
                        pass
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._submit(cancel_all()).result(timeout=10)
        except Exception:  # noqa: BLE001 - stopping regardless
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


# one in-process caller per runtime (namespace) per process: start() called again reuses it
_LOCAL: dict[str, InProcessCaller] = {}
_LOCAL_LOCK = threading.Lock()


def local_caller(namespace: str, settings: Settings, upstreams: list[UpstreamSettings], limiter: Any, ledger: Any,
                 cache: Any = None, *, reconfigure: bool = False, pool: Any = None) -> InProcessCaller:
    with _LOCAL_LOCK:
        have = _LOCAL.get(namespace)
        if have is not None and not have._closed:
            if reconfigure:
                have.reconfigure(settings, upstreams)
            return have
        _LOCAL[namespace] = made = InProcessCaller(settings, upstreams, limiter, ledger, cache, pool)
        return made


def forget(namespace: str) -> None:
    with _LOCAL_LOCK:
        _LOCAL.pop(namespace, None)
