"""The caller pool's manager: a small detached actor beside the singletons that keeps the callers sized to
demand, tells handles which callers to route to, and exports the gauges read from the singletons.

Every ``scale_interval_s`` it reads each caller's load (requests in flight, on the callers' control concurrency
group, so a saturated caller still answers), lets ``runtime.pool.PoolPolicy`` decide, and acts:

* grow: takes draining callers back first, then asks a running caller to ``spawn`` new ones (``caller-<i>``,
  the lowest free names; the pool itself never holds credentials), softly placed on the worker nodes with the
  fewest callers; a new caller joins the rotation once ``ready``. With ``callers.request_resources`` it asks
  the Ray autoscaler for one caller-sized bundle per wanted caller, so a cluster that has no room gets nodes.
* shrink: drains the highest-numbered callers (out of rotation at once), and stops each only when it holds no
  request and ``drain_grace_s`` has passed (every handle refreshes its list well within that).
* a caller that died for good (killed) is dropped and replaced up to the floor; one that is restarting (its
  node was lost) stays a member, its load unknown, and Ray brings it back.

Handles (``runtime.Runtime``) ask ``members()`` about once a second, in the background. After a restart of this
actor it finds the callers again by name; the callers themselves remember whether they are draining.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import ray

from actors.metrics import GaugeExporter
from runtime import status as status_view
from runtime.placement import caller_nodes
from runtime.pool import CallerLoad, PoolPolicy, free_names, index_of

log = logging.getLogger(__name__)

POOL_NAME = "caller_pool"
OUTSIDE_REPORT_S = 2.0  # how often a driver's in-process caller tells the pool its load, for status
CALLER_PREFIX = "caller-"


def _policy(settings: Any) -> PoolPolicy:
    cs = settings.callers
    return PoolPolicy(floor=cs.num_callers, ceiling=cs.ceiling, target_in_flight=cs.target_in_flight,
                      scale_down_after_s=cs.scale_down_after_s, drain_grace_s=cs.drain_grace_s)


async def _settle(refs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Each ref's value or exception; refs not done within ``timeout_s`` are left out."""
    async def one(ref: Any) -> Any:
        return await ref

    tasks = {name: asyncio.ensure_future(one(ref)) for name, ref in refs.items()}
    if not tasks:
        return {}
    done, pending = await asyncio.wait(tasks.values(), timeout=timeout_s)
    for t in pending:
        t.cancel()
    out = {}
    for name, t in tasks.items():
        if t in done:
            out[name] = t.exception() if t.exception() is not None else t.result()
    return out


class CallerPool:
    def __init__(self, settings: Any, namespace: str, prefix: str = CALLER_PREFIX) -> None:
        self._settings = settings
        self._namespace = namespace
        self._prefix = prefix
        self._policy = _policy(settings)
        self._node = ray.get_runtime_context().get_node_id()
        self._members: dict[str, Any] = {}        # name -> handle: every caller, active or draining
        self._loads: dict[str, CallerLoad] = {}
        self._info: dict[str, dict[str, Any]] = {}  # the last load() answer per caller (node, served, ...)
        # drivers' in-process callers: name -> (monotonic time, load()) of their last report, for status only
        self._outside: dict[str, tuple[float, dict[str, Any]]] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._gauges = GaugeExporter(settings)
        self._requested: int | None = None
        self._target = settings.callers.num_callers
        self._loop: asyncio.Task | None = None
        self._last_gauges = 0.0
        # (unix time, active, draining, in flight, target) per round, for status and the load benchmark
        self._history: collections.deque = collections.deque(maxlen=7_200)
        self._events: collections.deque = collections.deque(maxlen=1_000)
        self._rediscover()

    def _rediscover(self) -> None:
        """After a restart of this actor, the callers that are running: they are found by name."""
        for i in range(self._settings.callers.ceiling + 32):
            name = f"{self._prefix}{i}"
            try:
                self._members[name] = ray.get_actor(name, namespace=self._namespace)
            except ValueError:
                continue

    def _ensure_loop(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad round
                log.exception("caller pool round failed")
            await asyncio.sleep(self._settings.callers.scale_interval_s)

    # -- what handles and start() call -------------------------------------------------------------------------
    async def adopt(self, names: list[str]) -> list[str]:
        """Callers ``runtime.start()`` created (the floor): members, in rotation. Starts the control loop."""
        for name in names:
            handle = ray.get_actor(name, namespace=self._namespace)
            self._members[name] = handle
            if self._loads.get(name, CallerLoad(name)).draining:
                await handle.drain.remote(False)
            self._loads[name] = CallerLoad(name)
        self._ensure_loop()
        return sorted(self._members, key=index_of)

    async def members(self) -> list[tuple[str, Any]]:
        """The callers to route new requests to: ready, not draining, and answering (a caller whose node was
        lost is left out while Ray restarts it, unless no other is left), in name order."""
        self._ensure_loop()
        active = [n for n in sorted(self._members, key=index_of) if not self._loads.get(n, CallerLoad(n)).draining]
        live = [n for n in active if self._loads.get(n, CallerLoad(n)).reachable]
        return [(n, self._members[n]) for n in (live or active)]

    async def report(self, name: str, load: dict[str, Any]) -> None:
        """A driver's in-process caller says how it stands (every ``OUTSIDE_REPORT_S``); ``status`` lists it
        until it stops reporting. Never routed to, never scaled: it belongs to its driver."""
        self._outside[name] = (time.monotonic(), dict(load))
        stale = [n for n, (at, _) in self._outside.items() if time.monotonic() - at > 10 * OUTSIDE_REPORT_S]
        for n in stale:
            del self._outside[n]

    async def all_members(self) -> list[tuple[str, Any]]:
        """Every caller, draining ones included (shutdown stops them all)."""
        return [(n, h) for n, h in sorted(self._members.items(), key=lambda kv: index_of(kv[0]))]

    async def configure(self, settings: Any) -> None:
        """New floor, ceiling and pacing (``runtime.start(..., reconfigure=True)``); applied from the next round."""
        cs = settings.callers
        self._settings = settings
        self._policy.reconfigure(cs.num_callers, cs.ceiling, cs.target_in_flight, cs.scale_down_after_s,
                                 cs.drain_grace_s)
        self._gauges = GaugeExporter(settings)

    async def history(self) -> dict[str, Any]:
        return {"rounds": list(self._history), "events": list(self._events)}

    async def node(self) -> str:
        return self._node

    async def stop(self) -> list[Any]:
        """Stop scaling and hand back every caller (for shutdown); the autoscaler request is withdrawn."""
        if self._loop is not None:
            self._loop.cancel()
        for t in self._starting.values():
            t.cancel()
        self._request_resources(0, force=True)
        return [h for _n, h in await self.all_members()]

    # -- one round -----------------------------------------------------------------------------------------------
    async def poll(self) -> list[CallerLoad]:
        names = list(self._members)
        answers = await _settle({n: self._members[n].load.remote() for n in names},
                                timeout_s=max(0.5, self._settings.callers.scale_interval_s))
        loads = []
        for name in names:
            got = answers.get(name)
            prev = self._loads.get(name, CallerLoad(name))
            if isinstance(got, ray.exceptions.ActorDiedError):
                # gone for good (killed, or out of restarts): nothing to drain, nothing to route to
                self._members.pop(name, None)
                self._loads.pop(name, None)
                self._info.pop(name, None)
                self._events.append((time.time(), "lost", [name]))
                continue
            if isinstance(got, dict):
                load = CallerLoad(name, int(got["in_flight"]), bool(got["draining"]), True)
                self._info[name] = got
            else:  # no answer in time (restarting, node lost) or another error: keep it, load unknown
                load = CallerLoad(name, prev.in_flight, prev.draining, False)
            self._loads[name] = load
            loads.append(load)
        return loads

    async def tick(self) -> dict[str, Any]:
        loads = await self.poll()
        starting = [CallerLoad(n, 0, False, False) for n in self._starting]
        d = self._policy.decide(loads + starting)
        self._target = d.target
        for name in d.undrain:
            await self._set_draining(name, False)
        for name in d.drain:
            await self._set_draining(name, True)
        for name in d.stop:
            handle = self._members.get(name)
            if handle is not None:
                try:
                    # what it journaled goes to the ledger before it goes (actors/local_ledger.py)
                    await asyncio.wait_for(handle.flush.remote(), timeout=30)
                except Exception:  # noqa: BLE001 - keep it (still draining) and try again next round
                    log.warning("caller %s did not flush its journal; not stopping it yet", name, exc_info=True)
                    continue
                ray.kill(handle, no_restart=True)
            self._members.pop(name, None)
            self._loads.pop(name, None)
            self._info.pop(name, None)
        if d.spawn:
            await self._spawn(d.spawn)
        if d.changes:
            self._events.append((time.time(), "scale", {"target": d.target, "spawn": d.spawn,
                                                        "drain": list(d.drain), "undrain": list(d.undrain),
                                                        "stop": list(d.stop)}))
            log.info("caller pool: target %d, in flight %d, spawn %d, drain %s, undrain %s, stop %s", d.target,
                     d.in_flight, d.spawn, list(d.drain), list(d.undrain), list(d.stop))
        self._request_resources(d.target)
        active = sum(1 for c in self._loads.values() if not c.draining)
        self._history.append((time.time(), active, len(self._loads) - active, d.in_flight, d.target))
        now = time.monotonic()
        if now - self._last_gauges >= self._settings.observability.gauge_interval_s:
            self._last_gauges = now
            try:
                self._gauges.export(await self.snapshot(poll=False))
            except Exception:  # noqa: BLE001 - gauges are best effort
                log.warning("gauge export failed", exc_info=True)
        return {"target": d.target, "in_flight": d.in_flight, "spawn": d.spawn, "drain": list(d.drain),
                "undrain": list(d.undrain), "stop": list(d.stop)}

    async def _set_draining(self, name: str, on: bool) -> None:
        handle = self._members.get(name)
        if handle is None:
            return
        prev = self._loads.get(name, CallerLoad(name))
        self._loads[name] = CallerLoad(name, prev.in_flight, on, prev.reachable)
        try:
            await asyncio.wait_for(handle.drain.remote(on), timeout=10)
        except Exception:  # noqa: BLE001 - routers already follow the pool's view; the caller learns next round
            log.warning("could not tell %s to %s", name, "drain" if on else "rejoin", exc_info=True)
        self._events.append((time.time(), "drain" if on else "undrain", [name]))

    async def _spawn(self, k: int) -> None:
        taken = set(self._members) | set(self._starting)
        names = free_names(taken, k, self._prefix)
        nodes = self._place(len(names))
        spawners = [self._members[c.name] for c in sorted(self._loads.values(), key=lambda c: index_of(c.name))
                    if c.reachable and not c.draining and c.name in self._members]
        if not spawners:
            log.warning("caller pool: no running caller to spawn from")
            return
        try:
            await asyncio.wait_for(spawners[0].spawn.remote(names, nodes, self._namespace), timeout=30)
        except Exception:  # noqa: BLE001 - the next round tries again
            log.warning("caller pool: spawn failed", exc_info=True)
            return
        for name in names:
            self._starting[name] = asyncio.get_running_loop().create_task(self._join(name))
        self._events.append((time.time(), "spawn", names))

    async def _join(self, name: str) -> None:
        """A new caller enters the rotation once it is ready (its __init__ may take seconds)."""
        try:
            handle = ray.get_actor(name, namespace=self._namespace)
            await handle.ready.remote()
            self._members[name] = handle
            self._loads[name] = CallerLoad(name)
        except Exception:  # noqa: BLE001
            log.warning("caller %s did not start", name, exc_info=True)
        finally:
            self._starting.pop(name, None)

    def _place(self, k: int) -> list[str | None]:
        """Nodes for ``k`` new callers: the placement's candidate nodes with the fewest callers first."""
        p = self._settings.placement
        nodes = caller_nodes(ray.nodes(), {self._node}, p.callers)
        if not nodes:
            return [None] * k
        count = {n: 0 for n in nodes}
        for info in self._info.values():
            if info.get("node") in count:
                count[info["node"]] += 1
        out: list[str | None] = []
        for _ in range(k):
            n = min(nodes, key=lambda x: (count[x], x))
            count[n] += 1
            out.append(n)
        return out

    def _request_resources(self, target: int, force: bool = False) -> None:
        cs = self._settings.callers
        if not force and (not cs.request_resources or cs.ceiling == cs.num_callers or cs.num_cpus <= 0):
            return
        if target == self._requested:
            return
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"CPU": cs.num_cpus}] * target)
            self._requested = target
        except Exception:  # noqa: BLE001 - a hint to the autoscaler; without one there is no one to tell
            log.debug("request_resources failed", exc_info=True)

    # -- status ----------------------------------------------------------------------------------------------
    async def snapshot(self, poll: bool = True) -> dict[str, Any]:
        """Everything ``claude-runtime status`` shows (runtime/status.py): callers, buckets, budgets, cache,
        leases."""
        if poll:
            await self.poll()
        members = [{**self._info.get(n, {}), "name": n, "in_flight": c.in_flight, "draining": c.draining,
                    "reachable": c.reachable} for n, c in sorted(self._loads.items(), key=lambda kv: index_of(kv[0]))]
        members += [{"name": n, "in_flight": 0, "draining": False, "reachable": False, "starting": True}
                    for n in self._starting]
        members += status_view.outside_members(self._outside, time.monotonic(), 3 * OUTSIDE_REPORT_S)

        def actor(name: str) -> Any:
            try:
                return ray.get_actor(name, namespace=self._namespace)
            except ValueError:
                return None

        limiter, ledger, cache = actor("limiter"), actor("ledger"), actor("cache")
        refs = {}
        if limiter is not None:
            refs["limiter"] = limiter.snapshot.remote()
        if cache is not None:
            refs["cache"] = cache.stats.remote()
        budgets_cfg = self._settings.budgets
        if ledger is not None:
            if hasattr(ledger, "budgets"):
                refs["budgets"] = ledger.budgets.remote()
            elif budgets_cfg.daily_usd or budgets_cfg.monthly_usd:
                day, month = status_view.period_starts(time.time())
                refs["today"] = ledger.spend.remote(day, "model")
                refs["month"] = ledger.spend.remote(month, "model")
        got = await _settle(refs, timeout_s=10)
        got = {k: v for k, v in got.items() if not isinstance(v, BaseException)}
        if "budgets" in got:
            budgets = dict(got["budgets"].get("budgets") or {})
        else:
            budgets = status_view.global_budgets(budgets_cfg, sum((got.get("today") or {}).values()),
                                                 sum((got.get("month") or {}).values()))
        cs = self._settings.callers
        return status_view.view(limiter=got.get("limiter"), budgets=budgets, cache=got.get("cache"),
                                members=members, pool={"target": self._target, "floor": cs.num_callers,
                                                       "ceiling": cs.ceiling},
                                leases={m["name"]: m["leases"] for m in members if m.get("leases")})


CallerPoolActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(CallerPool)


def get_or_create_pool(settings: Any, *, namespace: str, scheduling_strategy: Any = None) -> Any:
    return CallerPoolActor.options(name=POOL_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
                                   scheduling_strategy=scheduling_strategy).remote(settings, namespace)


def find_pool(namespace: str) -> Any:
    try:
        return ray.get_actor(POOL_NAME, namespace=namespace)
    except ValueError:
        return None
