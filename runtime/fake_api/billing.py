"""The fake API's bill: one JSON line per billed response, what the ledger reconciles against.

One writer (the server's event loop) appends to a buffered file and flushes after each line, so a reader never
sees half a line for long and a crash loses at most the line being written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


class BillingLog:
    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.lines = 0
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab", buffering=1 << 16)

    def write(self, record: dict[str, Any]) -> None:
        self.lines += 1
        f = self._f
        if f is not None:
            f.write(orjson.dumps(record) + b"\n")
            f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_billing(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a billing log (a torn last line is skipped)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                out.append(orjson.loads(line))
    return out
