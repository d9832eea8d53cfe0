"""One cache scope's unit vectors as one float32 matrix, kept current row by row.

The cache actor searches a warm scope in memory: one matrix-vector product over its rows. Stacking the rows
into a matrix for each search after a put cost more than the search itself (700 rows: ~0.33 ms to stack
against ~0.013 ms to multiply; 10,000 rows: ~5 ms against ~0.12 ms), and in a busy scope every lookup follows
some put. Here a put writes one row (the capacity doubles when full), a removal leaves a gap that is skipped
and closed up, in order, once gaps are half the rows. Rows keep the order they were first put in, so a tie
between equal vectors goes to the older row, as it would in a dict of vectors. A search may run on another
thread than the puts (the cache actor searches large scopes off its loop): a lock makes each change, and each
search's product with its keys, one step.

    sv = ScopeVectors(384)
    sv.put("key", unit_vector)          # a new key appends; a known key is overwritten in place
    sv.pop("key")                        # True if it was there
    for key, sim in sv.ranked(q, 0.5):   # at least 0.5, best first
        ...
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np


class ScopeVectors:
    def __init__(self, dim: int, capacity: int = 16) -> None:
        self.dim = dim
        self._m = np.zeros((max(1, capacity), dim), dtype=np.float32)
        self._keys: list[str | None] = []   # per row; None: a gap left by a removal
        self._pos: dict[str, int] = {}
        self._gaps = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def get(self, key: str) -> np.ndarray | None:
        """A copy of ``key``'s vector (the row moves when gaps close)."""
        with self._lock:
            i = self._pos.get(key)
            return None if i is None else self._m[i].copy()

    def put(self, key: str, vector: np.ndarray) -> None:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"vector must have {self.dim} dimensions, got {v.shape[0]}")
        with self._lock:
            i = self._pos.get(key)
            if i is None:
                i = len(self._keys)
                if i == self._m.shape[0]:
                    grown = np.zeros((2 * self._m.shape[0], self.dim), dtype=np.float32)
                    grown[:i] = self._m[:i]
                    self._m = grown
                self._keys.append(key)
                self._pos[key] = i
            self._m[i] = v

    def pop(self, key: str) -> bool:
        with self._lock:
            i = self._pos.pop(key, None)
            if i is None:
                return False
            self._keys[i] = None
            self._m[i] = 0.0
            self._gaps += 1
            if self._gaps * 2 > len(self._keys):
                self._close_gaps()
            return True

    def _close_gaps(self) -> None:
        keep = [i for i, k in enumerate(self._keys) if k is not None]
        n = len(keep)
        m = np.zeros((max(16, 2 * n), self.dim), dtype=np.float32)
        if n:
            m[:n] = self._m[keep]
        self._m = m
        self._keys = [self._keys[i] for i in keep]
        self._pos = {k: j for j, k in enumerate(self._keys)}
        self._gaps = 0

    def ranked(self, q: np.ndarray, min_similarity: float) -> Iterator[tuple[str, float]]:
        """(key, cosine with unit ``q``) of the rows at or above ``min_similarity``, best first; equal
        similarities in the order the rows were first put."""
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        with self._lock:
            n = len(self._keys)
            if n == 0:
                return
            sims = self._m[:n] @ q
            keys = self._keys[:]   # the rows' keys as of this product: a later change moves no row under it
        # only rows at or above the floor are ranked: a lookup's loose floor leaves a handful of a 10k-row
        # scope, and sorting those instead of every row saves ~0.1 ms per search
        above = np.flatnonzero(sims >= min_similarity)
        for i in above[np.argsort(-sims[above], kind="stable")]:
            key = keys[i]
            if key is not None:  # a gap (its zero row can pass a floor at or below 0)
                yield key, float(sims[i])

    def nbytes(self) -> int:
        return int(self._m.nbytes)
