"""The embedding pool's decisions, pure (no Ray, no model): which replica gets a batch, when to add a replica,
when an idle one leaves. actors/embedder.py holds the replicas and asks these.

    pick({0: ReplicaView(up=True, inflight=64, backlog=0), 1: ReplicaView(up=True)})   # -> 1
    scale = ScaleUp(settings.embedding)
    if scale.want_more(backlogs=[300, 250], replicas=2): start embedder-2
    should_exit(index=2, idle_s=400.0, s=settings.embedding)                           # -> True

Scaling follows demand the replicas themselves see: each reply carries the replica's backlog (texts queued
behind its running batch, from every caller), so one caller's view covers the whole cluster's load. A replica
starts when the live ones report more than ``scale_up_backlog`` batches waiting each, at most one per
``scale_up_cooldown_s`` (a model load takes seconds, so the backlog lasts until the new one serves). Replicas
above the floor leave by themselves after ``idle_exit_s`` without a request. Clients never restore the floor:
only ``runtime.start`` creates it, so a pool someone stopped on purpose stays stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from runtime.settings import EmbeddingSettings


@dataclass
class ReplicaView:
    up: bool = True
    inflight: int = 0  # texts this client has sent it and not had back
    backlog: int = 0  # texts its last reply said were queued behind its running batch

    @property
    def load(self) -> int:
        return self.inflight + self.backlog


def pick(replicas: Mapping[int, ReplicaView], exclude: frozenset[int] | set[int] = frozenset()) -> int | None:
    """The up replica with the least load (lowest index among equals); None when none is up."""
    best: tuple[int, int] | None = None
    for idx, r in replicas.items():
        if not r.up or idx in exclude:
            continue
        key = (r.load, idx)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def free_index(taken: Sequence[int] | set[int], s: EmbeddingSettings) -> int | None:
    """The lowest replica index below the ceiling that no known replica holds."""
    for i in range(s.max_replicas):
        if i not in taken:
            return i
    return None


class ScaleUp:
    def __init__(self, s: EmbeddingSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._s = s
        self._clock = clock
        self._last = float("-inf")

    def want_more(self, backlogs: Sequence[int], replicas: int) -> bool:
        """Whether to start one more replica now, given the up replicas' backlogs and how many replicas exist
        (starting ones included). Saying yes starts the cooldown."""
        s = self._s
        if not backlogs or replicas == 0 or replicas >= s.max_replicas:
            return False
        if self._clock() - self._last < s.scale_up_cooldown_s:
            return False
        if sum(backlogs) / len(backlogs) <= s.scale_up_backlog * s.max_batch:
            return False
        self._last = self._clock()
        return True


def should_exit(index: int, idle_s: float, s: EmbeddingSettings) -> bool:
    """A replica above the floor that has been idle long enough gives its resources back."""
    return index >= s.min_replicas and idle_s >= s.idle_exit_s
