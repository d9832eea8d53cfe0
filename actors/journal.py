"""A caller's local journal: write-ahead intents and records made durable on the caller's own node, drained to
the ledger in the background, so a request makes no ledger round trip on its way.

    journal = Journal(path)                       # one file per caller actor name, on node-local disk
    await journal.append([entry, ...])            # returns once the entries are on disk (fdatasync)
    n = journal.write([entry, ...]); await journal.synced(n)   # the same in two steps (see write)
    entries = journal.pending()                   # written, not yet acknowledged by the ledger
    journal.acknowledge(n)                        # the ledger has the first n pending entries

Concurrent appends share one write and one fdatasync (group commit through runtime/groupsubmit.py). The drained
position is kept in a small side file, written after the ledger acknowledged: a crash between the two only makes
the next life send some entries again, and the ledger's writes are idempotent (records by identity, intents by
request and attempt).

What survives what: a killed caller process (the common Ray failure) leaves its journal on the node; its next
life (Ray restarts the actor, on the same node when it can) drains it first. A lost node loses what was not yet
drained, usually the last few tens of milliseconds; reconciliation against the API's bill finds those calls
(README, "Nothing lost").
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any


_ROTATE_BYTES = 8 << 20
_OFFSET_EVERY_S = 1.0


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._offset_path = self.path.with_suffix(self.path.suffix + ".drained")
        self._lock = threading.Lock()
        self._sizes: list[int] = []  # each pending entry's line length, to find the drained position
        self._entries: list[dict[str, Any]] = self._read()  # every entry not yet acknowledged, in order
        self._offset_at = 0.0
        self._f = open(self.path, "ab")
        # write(2) puts entries in the kernel's page cache (they survive this process) and fdatasync puts them
        # on the disk (they survive the node's kernel): writes are numbered, and one fdatasync covers every write
        # numbered before it started, so concurrent appends share a sync (group commit)
        self._written = 0
        self._synced = 0
        self._syncing = False
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self.appended = 0

    def _read(self) -> list[dict[str, Any]]:
        drained = 0
        try:
            drained = int(self._offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            drained = 0
        out = []
        try:
            with open(self.path, "rb") as f:
                f.seek(drained)
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a torn last line: its append never returned, so nobody relied on it
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        break
                    self._sizes.append(len(line))
        except FileNotFoundError:
            pass
        return out

    async def append(self, entries: list[dict[str, Any]], *, alone: bool = False) -> None:
        """Returns once ``entries`` are on disk (fdatasync); ``alone`` as for ``synced``."""
        await self.synced(self.write(entries), alone=alone)

    def write(self, entries: list[dict[str, Any]]) -> int:
        """Write ``entries`` now, in order, without waiting for the disk: from here they survive this process
        (a killed process's writes are the kernel's), and ``await synced(n)`` with the number this returns
        waits until they survive the node too. A write-ahead intent needs the first before its call leaves;
        the record that closes it waits for the second, which covers the intent as well."""
        lines = [json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries]
        with self._lock:
            self._f.write(b"".join(lines))
            self._f.flush()
            self._entries.extend(entries)
            self._sizes.extend(len(x) for x in lines)
            self.appended += len(entries)
            self._written += 1
            return self._written

    async def synced(self, n: int, *, alone: bool = False) -> None:
        """Returns once write number ``n`` (and every one before it) is on disk. ``alone``: the caller says no
        other request is running on this loop, so the sync runs right here (the loop has nothing else to do, and
        the trip through a worker thread and back would cost a lone request ~0.2 ms)."""
        if self._synced >= n:
            return
        if alone and not self._syncing and not self._waiters:
            target = self._written
            self._syncing = True  # so acknowledge() keeps the file while the sync runs
            try:
                with self._lock:
                    fd = self._f.fileno()
                os.fdatasync(fd)  # an error raises to this caller, as from the thread
                self._synced = max(self._synced, target)
            finally:
                self._syncing = False
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        self._start_sync()
        await fut

    def _start_sync(self) -> None:
        if self._syncing:
            return  # the running sync's callback starts the next one for whoever it did not cover
        self._syncing = True
        target = self._written
        with self._lock:
            fd = self._f.fileno()  # acknowledge() does not swap the file while a sync is running
        fut = asyncio.get_running_loop().run_in_executor(None, os.fdatasync, fd)
        fut.add_done_callback(lambda f: self._sync_done(target, f))

    def _sync_done(self, target: int, f: asyncio.Future) -> None:
        self._syncing = False
        exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
        if exc is None:
            self._synced = max(self._synced, target)
        keep = []
        for n, w in self._waiters:
            if w.done():
                continue
            if exc is not None:
                w.set_exception(exc)  # the disk refused: the caller's request fails rather than lie
            elif n <= self._synced:
                w.set_result(None)
            else:
                keep.append((n, w))
        self._waiters = keep
        if keep:
            self._start_sync()

    def pending(self, limit: int = 4_096) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._entries[:limit])

    def acknowledge(self, n: int, *, force: bool = False) -> None:
        """The ledger has the first ``n`` pending entries. The drained position is saved at most every
        ``_OFFSET_EVERY_S`` (or with ``force``): it only spares the next life from sending entries again, and the
        ledger ignores entries it already has, while saving it on every drain cost a request on this loop ~1 ms."""
        with self._lock:
            del self._entries[:n]
            del self._sizes[:n]
            size = self._f.tell()
            rotated = False
            if not self._entries and size > _ROTATE_BYTES and not self._syncing and self._synced == self._written:
                # everything is drained: start the file afresh instead of growing it forever
                self._f.close()
                self._f = open(self.path, "wb")
                size = 0
                rotated = True
            else:
                # the drained position: the end of the file less what is still pending
                size -= sum(self._sizes)
            now = time.monotonic()
            if rotated or force or now - self._offset_at >= _OFFSET_EVERY_S:
                self._offset_at = now
                tmp = self._offset_path.with_suffix(".tmp")
                tmp.write_text(str(size))
                os.replace(tmp, self._offset_path)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self.acknowledge(0, force=True)
        with self._lock:
            self._f.close()
