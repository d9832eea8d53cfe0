"""A caller's local journal: write-ahead intents and records made durable on the caller's own node, drained to
the ledger in the background, so a request makes no ledger round trip on its way.

    journal = Journal(path)                       # one file per caller actor name, on node-local disk
    await journal.append([entry, ...])            # returns once the entries are on disk (fdatasync)
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
from pathlib import Path
from typing import Any

from runtime.groupsubmit import GroupSubmitter

_ROTATE_BYTES = 8 << 20


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._offset_path = self.path.with_suffix(self.path.suffix + ".drained")
        self._lock = threading.Lock()
        self._entries: list[dict[str, Any]] = self._read()  # every entry not yet acknowledged, in order
        self._f = open(self.path, "ab")
        self._group: GroupSubmitter[dict[str, Any], None] = GroupSubmitter(
            self._write, max_batch=4_096, max_inflight=1, name="journal")
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
        except FileNotFoundError:
            pass
        return out

    async def append(self, entries: list[dict[str, Any]]) -> None:
        await asyncio.gather(*(self._group.submit(e) for e in entries))

    async def _write(self, batch: list[dict[str, Any]]) -> list[None]:
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in batch)

        def write() -> None:
            with self._lock:
                self._f.write(data)
                self._f.flush()
                os.fdatasync(self._f.fileno())
                self._entries.extend(batch)
                self.appended += len(batch)

        await asyncio.to_thread(write)
        return [None] * len(batch)

    def pending(self, limit: int = 4_096) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._entries[:limit])

    def acknowledge(self, n: int) -> None:
        """The ledger has the first ``n`` pending entries."""
        with self._lock:
            del self._entries[:n]
            size = self._f.tell()
            if not self._entries and size > _ROTATE_BYTES:
                # everything is drained: start the file afresh instead of growing it forever
                self._f.close()
                self._f = open(self.path, "wb")
                size = 0
            else:
                # the drained position: the end of the file less what is still pending
                pending_bytes = sum(len(json.dumps(e, separators=(",", ":")).encode()) + 1 for e in self._entries)
                size -= pending_bytes
            tmp = self._offset_path.with_suffix(".tmp")
            tmp.write_text(str(size))
            os.replace(tmp, self._offset_path)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            self._f.close()
