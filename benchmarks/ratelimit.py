"""Goodput under tight limits on a 3-node Ray cluster: the SDK alone, the seed's per-process limiter, ours.

Question: with callers spread over three nodes against one account's limits, how close to the binding limit does
each approach get, and how many 429s does the server send?

    python benchmarks/ratelimit.py                 # 120 s per variant (the issue's figure)
    python benchmarks/ratelimit.py --duration 30   # quicker

The server is `claude-runtime fake-api` in its own process with 300 RPM / 60k ITPM / 9k OTPM. Every variant runs
the same closed-loop load: 3 workers (one per node) x --concurrency coroutines, unique prompts, one model class.
(a) sdk:  AsyncAnthropic with its default retries (max_retries=2), no limiter.
(b) seed: the seed's design: a requests-per-minute bucket in each process (no token limits), sleeping while holding
          its concurrency slot, SDK default retries.
(c) ours: runtime.submit through the cluster-wide limiter (cache off).
Steady goodput = for each bucket, what the server admitted from a quarter into the run (the initial burst spent)
until the load stops, divided by the limit's refill over that window; the binding bucket is the largest fraction.
Whole-run goodput divides everything admitted by what the limit allows over the whole run (a full bucket at the
start plus refill), so it also charges the critical-traffic reserve that normal traffic may not burst into.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import FakeApiProcess, pct, write_json

LIMITS = {"rpm": 300, "itpm": 60_000, "otpm": 9_000}
MODEL = "claude-sonnet-5-5"
MAX_TOKENS = 48


def _prompt(worker: int, i: int) -> str:
    return f"worker {worker} request {i}: give a one-line fact about the number {i * 7 + worker}."


@ray.remote(num_cpus=0)
class LoadWorker:
    def __init__(self, mode: str, url: str, idx: int) -> None:
        import anthropic

        self.mode, self.idx = mode, idx
        if mode in ("sdk", "seed"):
            self.client = anthropic.AsyncAnthropic(base_url=url, api_key="bench-key")  # default max_retries=2
        if mode == "seed":
            from runtime.buckets import TokenBucket

            self.rpm = TokenBucket(LIMITS["rpm"], 60.0)
        if mode == "ours":
            import runtime

            self.rt = runtime.connect()

    async def _one(self, i: int) -> str:
        import anthropic

        req = {"model": MODEL, "max_tokens": MAX_TOKENS,
               "messages": [{"role": "user", "content": _prompt(self.idx, i)}]}
        if self.mode == "ours":
            try:
                await self.rt.submit(req, cache=False, user_id=f"w{self.idx}")
                return "ok"
            except Exception as exc:  # noqa: BLE001 - counted by type
                return type(exc).__name__
        if self.mode == "seed":
            while not self.rpm.try_take(1):   # the seed sleeps holding its slot
                await asyncio.sleep(self.rpm.wait_time(1))
        try:
            await self.client.messages.create(**req)
            return "ok"
        except anthropic.RateLimitError:
            return "RateLimitError"
        except anthropic.APIStatusError as exc:
            return f"status_{exc.status_code}"

    async def run(self, duration: float, concurrency: int) -> dict:
        t_end = time.monotonic() + duration
        lat: list[float] = []
        outcomes: dict[str, int] = {}
        counter = iter(range(10**9))

        async def loop() -> None:
            while time.monotonic() < t_end:
                t0 = time.perf_counter()
                out = await self._one(next(counter))
                lat.append(time.perf_counter() - t0)
                outcomes[out] = outcomes.get(out, 0) + 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return {"latencies": lat, "outcomes": outcomes}


def _used(stats: dict) -> dict[str, float]:
    cls = stats.get("by_class", {}).get("sonnet", {})
    return {"rpm": cls.get("by_status", {}).get("200", 0), "itpm": cls.get("input_tokens", 0),
            "otpm": cls.get("output_tokens", 0)}


def run_variant(mode: str, fake: FakeApiProcess, duration: float, concurrency: int, nodes: list[str]) -> dict:
    fake.reset()
    workers = [LoadWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
        mode, fake.url, i) for i, n in enumerate(nodes)]
    t0 = time.monotonic()
    refs = [w.run.remote(duration, concurrency) for w in workers]
    # steady state: what the server admitted between a quarter into the run (the initial burst spent) and
    # just before the load stops, against the limit's refill rate over that window
    t1, t2 = t0 + 0.25 * duration, t0 + duration - 1.0
    time.sleep(max(0.0, t1 - time.monotonic()))
    s1, m1 = fake.stats(), time.monotonic()
    time.sleep(max(0.0, t2 - time.monotonic()))
    s2, m2 = fake.stats(), time.monotonic()
    outs = ray.get(refs)
    elapsed = time.monotonic() - t0
    stats = fake.stats()
    for w in workers:
        ray.kill(w)
    lat = [x for o in outs for x in o["latencies"]]
    outcomes: dict[str, int] = {}
    for o in outs:
        for k, v in o["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    used = _used(stats)
    allow = {k: LIMITS[k] * (1 + elapsed / 60) for k in LIMITS}
    fractions = {k: used[k] / allow[k] for k in LIMITS}
    binding = max(fractions, key=fractions.get)
    u1, u2 = _used(s1), _used(s2)
    steady = {k: (u2[k] - u1[k]) / (LIMITS[k] / 60 * (m2 - m1)) for k in LIMITS}
    return {"mode": mode, "elapsed_s": elapsed, "ok": outcomes.get("ok", 0), "outcomes": outcomes,
            "server_429": stats.get("by_status", {}).get("429", 0), "server_requests": stats.get("requests", 0),
            "used": used, "fractions": fractions, "binding": binding, "goodput": fractions[binding],
            "steady_fractions": steady, "steady_goodput": max(steady.values()),
            "steady_429": s2.get("by_status", {}).get("429", 0) - s1.get("by_status", {}).get("429", 0),
            "p50_s": pct(lat, 50), "p99_s": pct(lat, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--concurrency", type=int, default=16, help="coroutines per worker (3 workers)")
    ap.add_argument("--modes", default="sdk,seed,ours")
    args = ap.parse_args()

    import runtime
    from runtime.settings import ClassLimits, Settings, UserLimits

    console = Console()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    fake = FakeApiProcess("--rpm", str(LIMITS["rpm"]), "--itpm", str(LIMITS["itpm"]), "--otpm", str(LIMITS["otpm"]))
    rows = []
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        limits = {c: ClassLimits(**LIMITS) for c in ("haiku", "sonnet", "opus", "fable")}
        rt = runtime.start(Settings(base_url=fake.url, api_key="bench-key", limits=limits,
                                    user_limits=UserLimits(rpm=0, tpm=0), cache={"enabled": False},
                                    callers={"num_callers": 3}, data_dir=f"/tmp/ratelimit_bench_{fake.port}",
                                    ledger={"allow_temporary_path": True}))
        for mode in args.modes.split(","):
            console.print(f"running {mode} for {args.duration:.0f} s ...")
            rows.append(run_variant(mode, fake, args.duration, args.concurrency, nodes))
        rt.shutdown()
    finally:
        fake.stop()
        ray.shutdown()
        cluster.shutdown()

    t = Table(title=f"rate limits {LIMITS} on 3 nodes, {args.duration:.0f} s per variant")
    for col in ("variant", "ok", "server 429s", "binding", "steady goodput", "whole-run goodput", "p50 s",
                "p99 s", "failed"):
        t.add_column(col, justify="right")
    for r in rows:
        errs = sum(v for k, v in r["outcomes"].items() if k != "ok")
        t.add_row(r["mode"], str(r["ok"]), str(r["server_429"]), r["binding"], f"{r['steady_goodput']:.3f}",
                  f"{r['goodput']:.3f}", f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}", str(errs))
    console.print(t)
    path = write_json("ratelimit", {"limits": LIMITS, "duration_s": args.duration,
                                    "concurrency_per_worker": args.concurrency, "rows": rows})
    console.print(f"wrote {path} and {plot(rows, path.with_suffix('.png'))}")


def plot(rows: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["mode"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [("steady goodput (fraction of binding limit)", [r["steady_goodput"] for r in rows]),
              ("server 429s", [r["server_429"] for r in rows]),
              ("requests that failed", [sum(v for k, v in r["outcomes"].items() if k != "ok") for r in rows])]
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=["#b0b0b0", "#d08770", "#5e81ac"][:len(names)])
        ax.set_title(title, fontsize=10)
        ax.bar_label(bars, fmt="%.3f" if "goodput" in title else "%d", fontsize=8)
    axes[0].set_ylim(0, 1.1)
    fig.suptitle(f"3 nodes against {LIMITS['rpm']} RPM / {LIMITS['itpm']} ITPM / {LIMITS['otpm']} OTPM")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
