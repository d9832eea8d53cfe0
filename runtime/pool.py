"""How many callers the pool should have, and which to add, drain or stop: pure logic, clock injected.

The pool follows demand, measured as requests in flight on its callers: it wants
``ceil(in_flight / target_in_flight)`` callers, between a floor and a ceiling. It grows at once (waiting costs
queueing time) and shrinks only after demand has stayed below its size for ``scale_down_after_s`` (a lull is
not a trend). A caller to be removed is first *drained*: no new requests are routed to it, it finishes the ones
it holds, and it is stopped only when it has none left and ``drain_grace_s`` has passed since the drain began,
so every handle has refreshed its caller list by then. Draining callers are the first taken back when demand
returns: they are already running::

    policy = PoolPolicy(floor=2, ceiling=8, target_in_flight=64, scale_down_after_s=60, drain_grace_s=10)
    d = policy.decide([CallerLoad("caller-0", 200), CallerLoad("caller-1", 190)])
    d.target, d.spawn            # 7, 5: five callers to start
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

_INDEX = re.compile(r"-(\d+)$")


def index_of(name: str) -> int:
    """The number at the end of a caller's name (``caller-12`` -> 12); names without one sort last."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else 1 << 30


def free_names(taken: Iterable[str], k: int, prefix: str) -> list[str]:
    """The ``k`` lowest ``<prefix><i>`` names not in ``taken``: names stay dense, so a pool that grows back
    reuses the names it dropped."""
    used = set(taken)
    out: list[str] = []
    i = 0
    while len(out) < k:
        name = f"{prefix}{i}"
        if name not in used:
            out.append(name)
        i += 1
    return out


@dataclass(frozen=True)
class CallerLoad:
    name: str
    in_flight: int = 0
    draining: bool = False
    # False: the caller did not answer this round (restarting, or its node is gone); Ray restarts it, so it
    # still counts as a member, with its load unknown
    reachable: bool = True


@dataclass(frozen=True)
class PoolDecision:
    target: int                       # active callers wanted
    spawn: int = 0                    # new callers to start
    drain: tuple[str, ...] = ()       # stop routing to these
    undrain: tuple[str, ...] = ()     # draining callers taken back into rotation
    stop: tuple[str, ...] = ()        # drained, empty and past the grace period: stop them
    in_flight: int = 0

    @property
    def changes(self) -> bool:
        return bool(self.spawn or self.drain or self.undrain or self.stop)


@dataclass
class PoolPolicy:
    floor: int
    ceiling: int
    target_in_flight: float
    scale_down_after_s: float = 60.0
    drain_grace_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _low_since: float | None = field(default=None, init=False)
    _drain_started: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.floor < 1 or self.ceiling < self.floor:
            raise ValueError(f"a pool needs 1 <= floor <= ceiling, not {self.floor}..{self.ceiling}")
        if self.target_in_flight <= 0:
            raise ValueError("target_in_flight must be > 0")

    def reconfigure(self, floor: int, ceiling: int, target_in_flight: float, scale_down_after_s: float,
                    drain_grace_s: float) -> None:
        if floor < 1 or ceiling < floor or target_in_flight <= 0:
            raise ValueError(f"a pool needs 1 <= floor <= ceiling and target_in_flight > 0")
        self.floor, self.ceiling, self.target_in_flight = floor, ceiling, target_in_flight
        self.scale_down_after_s, self.drain_grace_s = scale_down_after_s, drain_grace_s

    def wanted(self, in_flight: int) -> int:
        return min(self.ceiling, max(self.floor, math.ceil(in_flight / self.target_in_flight)))

    def draining_since(self, name: str) -> float | None:
        return self._drain_started.get(name)

    def decide(self, loads: Iterable[CallerLoad]) -> PoolDecision:
        """One round: what to change given every member's load (active and draining)."""
        now = self.clock()
        loads = list(loads)
        active = sorted((c for c in loads if not c.draining), key=lambda c: index_of(c.name))
        draining = sorted((c for c in loads if c.draining), key=lambda c: index_of(c.name))
        for c in draining:
            self._drain_started.setdefault(c.name, now)
        known = {c.name for c in loads}
        for name in list(self._drain_started):
            if name not in known:
                del self._drain_started[name]
        # everything in flight is demand, the draining callers' included: it was routed and is being served
        in_flight = sum(c.in_flight for c in loads if c.reachable)
        target = self.wanted(in_flight)
        undrain: list[str] = []
        drain: list[str] = []
        spawn = 0
        if target > len(active):
            self._low_since = None
            need = target - len(active)
            undrain = [c.name for c in draining[:need]]  # lowest names first: the pool stays dense
            spawn = need - len(undrain)
        elif target < len(active):
            if self._low_since is None:
                self._low_since = now
            if now - self._low_since >= self.scale_down_after_s or len(active) > self.ceiling:
                # the highest names go first, so the names that stay are dense
                drain = [c.name for c in active[target:]]
                self._low_since = None
        else:
            self._low_since = None
        for name in undrain:
            self._drain_started.pop(name, None)
        for name in drain:
            self._drain_started[name] = now
        stop = tuple(c.name for c in draining
                     if c.name not in undrain and c.reachable and c.in_flight == 0
                     and now - self._drain_started[c.name] >= self.drain_grace_s)
        for name in stop:
            self._drain_started.pop(name, None)
        return PoolDecision(target=target, spawn=spawn, drain=tuple(drain), undrain=tuple(undrain), stop=stop,
                            in_flight=in_flight)
