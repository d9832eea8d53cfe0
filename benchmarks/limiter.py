"""How many admission decisions per second does the one cluster-wide limiter sustain?

Caller processes (Ray actors) each run many coroutines that acquire through one ``LimiterClient`` (batched:
one ``acquire_many`` per window, reconciles batched in the background), against limits so large that every
request is granted. Side by side: the naive pattern, one actor call per decision. Target: >= 20k decisions/s.

    .venv/bin/python benchmarks/limiter.py            # short run (~1 min)
    .venv/bin/python benchmarks/limiter.py --full     # longer windows, more coroutines

Writes benchmarks/results/limiter.json and limiter.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.limiter import NAMESPACE, LimiterClient, get_or_create_limiter  # noqa: E402
from runtime.admission import Estimate, Grant, Outcome  # noqa: E402
from runtime.settings import ClassLimits, LimiterSettings, Settings, UserLimits  # noqa: E402
from runtime.usage import Usage  # noqa: E402

HUGE = 10**12


@ray.remote(num_cpus=0)
class Caller:
    def __init__(self, limiter_name: str, batch_window_s: float, leases: bool = False) -> None:
        self.handle = ray.get_actor(limiter_name, namespace=NAMESPACE)
        self.client = LimiterClient(self.handle, max_wait_s=60, batch_window_s=batch_window_s, leases=leases,
                                    caller=limiter_name)

    async def run(self, mode: str, coroutines: int, start_at: float, end_at: float, tag: str) -> dict:
        counted = 0
        lat: list[float] = []

        async def worker(k: int) -> None:
            nonlocal counted
            i = 0
            while True:
                now = time.time()
                if now >= end_at:
                    return
                i += 1
                e = Estimate(f"{tag}-{k}-{i}", "sonnet", f"user{(k * 7 + i) % 1000}", "normal", 500, 200)
                t0 = time.perf_counter()
                if mode in ("batched", "leased"):
                    g = await self.client.acquire(e)
                    self.client.reconcile(Outcome(g.lease_id, Usage(480, 150), 200, {}, time.time()))
                else:
                    g = await self.handle.acquire.remote(e)
                    assert isinstance(g, Grant)
                done = time.time()
                if start_at <= done < end_at:
                    counted += 1
                    if len(lat) < 20_000:
                        lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(k) for k in range(coroutines)))
        await self.client.flush()
        return {"decisions": counted, "latencies": lat, "client": dict(self.client.stats)}


def one_config(mode: str, n_callers: int, coroutines: int, warmup_s: float, measure_s: float,
               batch_window_s: float) -> dict:
    name = f"bench-limiter-{mode}-{n_callers}-{time.time_ns()}"
    big = ClassLimits(rpm=HUGE, itpm=HUGE, otpm=HUGE)
    s = Settings(limits={c: big for c in ("haiku", "sonnet", "opus", "fable")},
                 user_limits=UserLimits(rpm=10**9, tpm=10**9), limiter=LimiterSettings())
    limiter = get_or_create_limiter(s, name=name)
    ray.get(limiter.ping.remote())
    callers = [Caller.remote(name, batch_window_s, mode == "leased") for _ in range(n_callers)]
    ray.get([c.__ray_ready__.remote() for c in callers])
    start = time.time() + 0.5 + warmup_s
    end = start + measure_s
    outs = ray.get([c.run.remote(mode, coroutines, start, end, f"c{i}") for i, c in enumerate(callers)])
    snap = ray.get(limiter.snapshot.remote())
    for c in callers:
        ray.kill(c)
    ray.kill(limiter)
    decisions = sum(o["decisions"] for o in outs)
    lat = sorted(x for o in outs for x in o["latencies"])
    calls = sum(o["client"]["acquire_calls"] for o in outs)
    dec_sent = sum(o["client"]["decisions"] for o in outs)
    return {
        "mode": mode, "callers": n_callers, "coroutines_per_caller": coroutines, "measure_s": measure_s,
        "decisions": decisions, "decisions_per_s": decisions / measure_s,
        "p50_ms": 1e3 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1e3 * lat[int(len(lat) * 0.99)] if lat else None,
        "mean_batch": (dec_sent / calls) if calls else 1.0,
        "refused": snap["stats"]["refused"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="longer windows and more coroutines")
    ap.add_argument("--callers", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--batch-window-ms", type=float, default=1.0)
    args = ap.parse_args()
    measure_s, warmup_s = (10.0, 2.0) if args.full else (3.0, 1.0)
    coroutines = 512 if args.full else 256

    ray.init(address="local", num_cpus=args.num_cpus or min(os.cpu_count() or 2, 8), include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        for n in args.callers:
            for mode in ("leased", "batched", "naive"):
                # the naive pattern cannot use many coroutines usefully: each one is a queued actor call
                rows.append(one_config(mode, n, coroutines, warmup_s, measure_s, args.batch_window_ms / 1e3))
                r = rows[-1]
                print(f"  {mode:8s} callers={n:3d}: {r['decisions_per_s']:9.0f} decisions/s", flush=True)
    finally:
        ray.shutdown()

    print()
    print(f"{'callers':>7} {'mode':>8} {'decisions/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}")
    for r in rows:
        print(f"{r['callers']:>7} {r['mode']:>8} {r['decisions_per_s']:>12.0f} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r['mean_batch']:>10.1f}")
    for mode, target in (("leased", 100_000), ("batched", 20_000)):
        best = max(r["decisions_per_s"] for r in rows if r["mode"] == mode)
        print(f"best {mode}: {best:.0f} decisions/s (target >= {target:,}): {'MET' if best >= target else 'NOT MET'}")

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"full": args.full, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "ray": ray.__version__, "batch_window_ms": args.batch_window_ms, "target_per_s": 20_000,
            "note": "limits huge so every decision is a grant; batched mode also reconciles every grant; "
                    "leased: callers admit on capacity leases, the limiter sees one call per lease"}
    (out / "limiter.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = list(range(len(args.callers)))
        for off, mode in ((-0.27, "leased"), (0.0, "batched"), (0.27, "naive")):
            ys = [next(r["decisions_per_s"] for r in rows if r["mode"] == mode and r["callers"] == n)
                  for n in args.callers]
            ax.bar([x + off for x in xs], ys, width=0.27, label=mode)
        ax.axhline(100_000, color="k", ls="--", lw=1, label="target (leases)")
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(n) for n in args.callers])
        ax.set_xlabel("caller processes")
        ax.set_ylabel("decisions / s")
        ax.set_title("cluster-wide limiter throughput")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "limiter.png", dpi=120)
    except Exception as exc:  # the table and JSON are the result; a plot failure should not hide them
        print(f"(no plot: {exc})")


if __name__ == "__main__":
    main()
