"""Load scenarios on a 3-node Ray cluster: the SDK alone, the seed's per-process limiter, and the runtime, side by
side against one account's limits.

Question: under the loads a production account sees (sustained overload, a burst, a user hogging the account,
bulk work flooding interactive work, repeated questions), what does each approach deliver: answers, failures,
server 429s, latency, dollars?

    python benchmarks/load.py                              # every scenario (about 12 minutes here)
    python benchmarks/load.py --scale 0.5                  # shorter phases (what `make bench` runs)
    python benchmarks/load.py --scenarios steady,burst --variants ours,sdk
    python benchmarks/load.py --address auto               # on a running cluster (deploy/README.md: ray job submit)

The account: `claude-runtime fake-api` in its own process at 240 RPM / 200k ITPM / 40k OTPM per class (requests
per minute bind), 150 ms per answer. Open-loop arrivals (requests leave on a schedule whatever happens to earlier
ones), spread over one load generator per node. Variants:
(a) sdk:  AsyncAnthropic with its default retries (2), no limiter.
(b) seed: the seed's design: in each process, a bucket at the account's RPM and the per-user caps (so three
          processes allow three times the account), SDK retries; no priorities, no cache.
(c) ours: rt.submit through the runtime: cluster-wide limiter, per-user caps, priorities, cache, caller pool
          (2 callers, up to 4).
Scenarios (durations times --scale):
  steady      20 s at 1.5x the account's RPM.
  burst       5 s at 0.5x, 10 s at 10x (not scaled), 10 s at 0.5x.
  users       tenant "shared" capped at 60 RPM per user: one user sends 6 req/s, three send 0.4 req/s each, 20 s
              (10 s admission deadline: a capped request fails typed instead of queueing for minutes).
  priorities  critical at 0.2x for 15 s alone, then 15 s more under a bulk flood at 5x (bulk deadline 15 s):
              critical p99 must not grow.
  repeats     130 questions at 6 req/s, 31 % of them paraphrases of earlier ones: dollars spent and saved.
steady, users and priorities start on an account already at its limit: a minute's worth of requests goes first
through the variant's own path (not counted), since a token bucket holds a minute of capacity and 1.5x the limit
on a rested account would take two minutes to show anything. burst and repeats start on a rested account.
Each scenario prints a table, writes benchmarks/results/load_<scenario>.json and draws load_<scenario>.png over
time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adversarial_pairs import PARAPHRASES
from benchmarks.common import RESULTS, FakeApiProcess, pct, write_json

LIMITS = {"rpm": 240, "itpm": 200_000, "otpm": 40_000}
RATE = LIMITS["rpm"] / 60.0  # the binding limit, requests per second
MODEL = "claude-sonnet-5-5"
MAX_TOKENS = 32
USER_CAP_RPM = 60
LATENCY_MS = 150
VARIANTS = ("sdk", "seed", "ours")
COLORS = {"sdk": "#b0b0b0", "seed": "#d08770", "ours": "#5e81ac"}


@dataclass
class Send:
    t: float                      # seconds after the scenario's start
    prompt: str
    user: str
    tenant: str | None = None
    priority: str = "normal"
    cache: bool = False
    deadline_s: float | None = None
    max_tokens: int = MAX_TOKENS
    tag: str = ""                 # what the scenario groups results by


# -- scenarios: schedules of sends -------------------------------------------------------------------------------

def _poisson(rate: float, start: float, end: float, rng: random.Random) -> list[float]:
    out, t = [], start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return out
        out.append(t)


def _q(i: int, tag: str) -> str:
    return f"{tag} request {i}: give a one-line fact about the number {i * 7 + 3}."


def steady(scale: float, rng: random.Random) -> list[Send]:
    ts = _poisson(1.5 * RATE, 0.0, 20.0 * scale, rng)
    return [Send(t, _q(i, "steady"), f"u{i % 50}", tag="all") for i, t in enumerate(ts)]


def burst(scale: float, rng: random.Random) -> list[Send]:
    # the burst itself is 10 s whatever the scale: shorter, a rested account's bucket would absorb it
    before, after = 5.0 * scale, 10.0 * scale
    phases = [(0.5 * RATE, 0.0, before, "before"), (10 * RATE, before, before + 10.0, "burst"),
              (0.5 * RATE, before + 10.0, before + 10.0 + after, "after")]
    sends = []
    for rate, a, b, tag in phases:
        sends += [Send(t, "", "", tag=tag) for t in _poisson(rate, a, b, rng)]
    sends.sort(key=lambda s: s.t)
    for i, s in enumerate(sends):
        s.prompt, s.user = _q(i, "burst"), f"u{i % 50}"
    return sends


def users(scale: float, rng: random.Random) -> list[Send]:
    d = 20.0 * scale
    sends = [Send(t, "", "hog", tenant="shared", deadline_s=10.0, tag="hog") for t in _poisson(6.0, 0, d, rng)]
    for u in ("alice", "bob", "carol"):
        sends += [Send(t, "", u, tenant="shared", deadline_s=10.0, tag=u) for t in _poisson(0.4, 0, d, rng)]
    sends.sort(key=lambda s: s.t)
    for i, s in enumerate(sends):
        s.prompt = _q(i, f"users {s.user}")
    return sends


def priorities(scale: float, rng: random.Random) -> list[Send]:
    """Critical alone for d seconds, a gap, then critical again under a bulk flood for d seconds."""
    d = 15.0 * scale
    sends = [Send(t, "", f"c{i % 5}", priority="critical", tag="critical alone")
             for i, t in enumerate(_poisson(0.2 * RATE, 0, d, rng))]
    sends += [Send(t, "", f"c{i % 5}", priority="critical", tag="critical, bulk flooding")
              for i, t in enumerate(_poisson(0.2 * RATE, d, 2 * d, rng))]
    sends += [Send(t, "", f"b{i % 20}", priority="bulk", deadline_s=15.0, tag="bulk")
              for i, t in enumerate(_poisson(5.0 * RATE, d, 2 * d, rng))]
    sends.sort(key=lambda s: s.t)
    for i, s in enumerate(sends):
        s.prompt = _q(i, f"priorities {s.priority}")
    return sends


def repeats(scale: float, rng: random.Random) -> list[Send]:
    """Originals (paraphrase-pair firsts and unique questions), then the pairs' seconds mixed in later: 31 %."""
    n_pairs = max(4, int(len(PARAPHRASES) * scale))
    pairs = PARAPHRASES[:n_pairs]
    uniques = [_q(i, "repeats") for i in range(int(n_pairs * 1.25))]
    originals = [p[0] for p in pairs] + uniques
    rng.shuffle(originals)
    order = [(q, "original") for q in originals]
    # each paraphrase comes after its original, at least 16 places (~2.7 s) later: its answer is stored by then
    for first, second, _c in pairs:
        at = order.index((first, "original"))
        pos = rng.randint(min(len(order), at + 16), len(order))
        order.insert(pos, (second, "paraphrase"))
    return [Send(i / 6.0, q, f"r{i % 10}", tenant="repeats", cache=True, max_tokens=400, tag=tag)
            for i, (q, tag) in enumerate(order)]


SCENARIOS = {"steady": steady, "burst": burst, "users": users, "priorities": priorities, "repeats": repeats}
# scenarios that start on an account already at its limit (a minute's worth of requests sent first, through the
# variant's own path, not counted): a token bucket holds a minute of capacity, so 1.5x the limit on a rested
# account would take two minutes to show anything
WARM = {"steady", "users", "priorities"}


# -- the load generators ------------------------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class LoadWorker:
    def __init__(self, mode: str, url: str) -> None:
        import anthropic

        self.mode = mode
        self.rt = None
        if mode in ("sdk", "seed"):
            self.client = anthropic.AsyncAnthropic(base_url=url, api_key="bench-key")  # default max_retries=2
        if mode == "seed":
            from runtime.buckets import TokenBucket

            self.account = TokenBucket(LIMITS["rpm"], 60.0)
            self.user_buckets: dict[str, Any] = {}
            self._bucket = TokenBucket

    def attach(self, runtime_name: str) -> None:
        import runtime

        self.rt = runtime.connect(runtime_name)

    async def _seed_wait(self, s: Send) -> None:
        # the seed sleeps until its own (per-process) buckets allow the request
        buckets = [self.account]
        if s.tenant == "shared":
            b = self.user_buckets.get(s.user)
            if b is None:
                b = self.user_buckets[s.user] = self._bucket(USER_CAP_RPM, 60.0)
            buckets.append(b)
        for b in buckets:
            while not b.try_take(1):
                await asyncio.sleep(b.wait_time(1))

    async def _one(self, s: Send) -> dict[str, Any]:
        import anthropic

        req = {"model": MODEL, "max_tokens": s.max_tokens, "messages": [{"role": "user", "content": s.prompt}]}
        out: dict[str, Any] = {"tag": s.tag, "user": s.user, "priority": s.priority, "cost": 0.0, "saved": 0.0,
                               "cache": None}
        if self.mode == "ours":
            try:
                res = await self.rt.submit(req, user_id=s.user, tenant=s.tenant, priority=s.priority,
                                           cache=s.cache, deadline_s=s.deadline_s)
                out.update(outcome="ok", cost=res.cost_usd, saved=res.saved_usd, cache=res.cache)
            except Exception as exc:  # noqa: BLE001 - counted by type
                out["outcome"] = type(getattr(exc, "cause", None) or exc).__name__
            return out
        if self.mode == "seed":
            await self._seed_wait(s)
        try:
            msg = await self.client.messages.create(**req)
            out["outcome"] = "ok"
            out["cost"] = _price(msg.usage)
        except anthropic.RateLimitError:
            out["outcome"] = "RateLimitError"
        except anthropic.APIStatusError as exc:
            out["outcome"] = f"status_{exc.status_code}"
        except anthropic.APIConnectionError:
            out["outcome"] = "connection"
        return out

    async def warm(self, n: int, concurrency: int = 32) -> dict[str, int]:
        """``n`` requests through this variant's own path, as fast as it allows: the account (and this
        variant's view of it) starts the scenario at its limit, as after a busy minute."""
        sem = asyncio.Semaphore(concurrency)
        outcomes: dict[str, int] = {}

        async def one(i: int) -> None:
            async with sem:
                r = await self._one(Send(0.0, _q(i, f"warm-up {id(self)}"), f"w{i % 20}", tag="warm-up"))
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
        return outcomes

    async def run(self, sends: list[dict], t0: float) -> list[dict]:
        async def fire(s: Send) -> dict:
            delay = t0 + s.t - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            start = time.time()
            out = await self._one(s)
            out.update(t=start - t0, latency=time.time() - start)
            return out

        return list(await asyncio.gather(*(fire(Send(**s)) for s in sends)))


# -- one run ------------------------------------------------------------------------------------------------------

def _limiter_full(rt: Any, timeout_s: float = 90.0) -> None:
    """Wait until the runtime's limiter has refilled the buckets the last run drained (the server's are reset
    between runs): every variant starts against a full account."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = ray.get(rt.limiter.snapshot.remote())
        levels = [b["level"] / b["capacity"] for b in snap["classes"].get("sonnet", {}).values()
                  if isinstance(b, dict) and b.get("capacity")]
        if levels and min(levels) >= 0.97:
            return
        time.sleep(0.5)


def _counts(st: dict[str, Any]) -> dict[str, float]:
    cls = st.get("by_class", {}).get("sonnet", {})
    return {"429": st.get("by_status", {}).get("429", 0), "200": st.get("by_status", {}).get("200", 0),
            "input_tokens": cls.get("input_tokens", 0), "output_tokens": cls.get("output_tokens", 0)}


def run_variant(mode: str, sends: list[Send], fake: FakeApiProcess, workers: list[Any], rt: Any = None,
                runtime_name: str = "default", warm: bool = False) -> dict[str, Any]:
    pool = rt.pool if rt is not None else None
    if rt is not None:
        _limiter_full(rt)
        ray.get([w.attach.remote(runtime_name) for w in workers])
    fake.reset()
    warmed: dict[str, int] = {}
    if warm:
        share = -(-LIMITS["rpm"] // len(workers))
        for part in ray.get([w.warm.remote(share) for w in workers]):
            for k, v in part.items():
                warmed[k] = warmed.get(k, 0) + v
    base = _counts(fake.stats())
    shares = [[asdict(s) for s in sends[i::len(workers)]] for i in range(len(workers))]
    t0 = time.time() + 2.0
    refs = [w.run.remote(share, t0) for w, share in zip(workers, shares)]
    timeline = []   # (t, server 429s so far, server 200s so far, callers)
    pending = refs
    while pending:
        _done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        st = _counts(fake.stats())
        callers = None
        if pool is not None:
            try:
                rounds = ray.get(pool.history.remote(), timeout=5)["rounds"]
                callers = rounds[-1][1] if rounds else None
            except Exception:  # noqa: BLE001
                callers = None
        timeline.append((time.time() - t0, st["429"] - base["429"], st["200"] - base["200"], callers))
    records = [r for part in ray.get(refs) for r in part]
    end = _counts(fake.stats())
    used = {k: end[k] - base[k] for k in end}
    return {"mode": mode, "records": records, "timeline": timeline, "server_429": used["429"],
            "server_200": used["200"], "billed_usd": _billed(used), "warm_up": warmed,
            "elapsed_s": max((r["t"] + r["latency"] for r in records), default=0.0)}


def _price(usage: Any) -> float:
    from runtime.pricing import price
    from runtime.settings import Settings
    from runtime.usage import Usage

    return price(Usage.from_api(usage), MODEL, Settings()).total_usd


def _billed(cls: dict[str, Any]) -> float:
    from runtime.pricing import price
    from runtime.settings import Settings
    from runtime.usage import Usage

    u = Usage(input_tokens=int(cls["input_tokens"]), output_tokens=int(cls["output_tokens"]))
    return price(u, MODEL, Settings()).total_usd


def summarise(run: dict[str, Any], by_tag: bool = True) -> list[dict[str, Any]]:
    groups: dict[str, list[dict]] = {}
    for r in run["records"]:
        groups.setdefault(r["tag"] if by_tag else "all", []).append(r)
    rows = []
    for tag, rs in sorted(groups.items()):
        ok = [r for r in rs if r["outcome"] == "ok"]
        fails: dict[str, int] = {}
        for r in rs:
            if r["outcome"] != "ok":
                fails[r["outcome"]] = fails.get(r["outcome"], 0) + 1
        lat = [r["latency"] for r in ok]
        rows.append({"variant": run["mode"], "group": tag, "sent": len(rs), "ok": len(ok), "failed": fails,
                     "p50_s": pct(lat, 50), "p99_s": pct(lat, 99),
                     "hits": sum(1 for r in ok if r["cache"] in ("exact", "semantic")),
                     "saved_usd": sum(r["saved"] for r in ok)})
    return rows


# -- output --------------------------------------------------------------------------------------------------------

def table(console: Console, name: str, runs: list[dict[str, Any]], extra: str = "") -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for row in summarise(run):
            row.update(server_429=run["server_429"], billed_usd=run["billed_usd"], elapsed_s=run["elapsed_s"])
            rows.append(row)
    t = Table(title=f"load: {name} ({LIMITS['rpm']} RPM account){extra}")
    for col in ("variant", "group", "sent", "ok", "failed", "p50 s", "p99 s", "server 429s", "billed $",
                "cache hits", "saved $", "done at s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["variant"], r["group"], str(r["sent"]), str(r["ok"]),
                  ", ".join(f"{k} {v}" for k, v in sorted(r["failed"].items())) or "0",
                  f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}", str(r["server_429"]), f"{r['billed_usd']:.4f}",
                  str(r["hits"]), f"{r['saved_usd']:.4f}", f"{r['elapsed_s']:.0f}")
    console.print(t)
    return rows


def plot(name: str, runs: list[dict[str, Any]], png: Path) -> Path:
    """Per variant over time: answers and failures per second, the server's 429s, and a fourth panel for what
    the scenario is about (callers in the pool; critical latency; dollars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    horizon = int(max(r["elapsed_s"] for r in runs)) + 2
    for r in runs:
        c = COLORS.get(r["mode"], None)
        ok = [0] * horizon
        bad = [0] * horizon
        for rec in r["records"]:
            sec = min(horizon - 1, int(rec["t"] + rec["latency"]))
            (ok if rec["outcome"] == "ok" else bad)[sec] += 1
        axes[0].plot(range(horizon), ok, color=c, label=r["mode"])
        axes[1].plot(range(horizon), bad, color=c, label=r["mode"])
        tl = r["timeline"]
        axes[2].plot([p[0] for p in tl], [p[1] for p in tl], color=c, label=r["mode"])
        done = sorted(r["records"], key=lambda x: x["t"] + x["latency"])
        if name == "repeats":
            spent, total = [], 0.0
            for rec in done:
                total += rec["cost"]
                spent.append(total)
            axes[3].plot([x["t"] + x["latency"] for x in done], spent, color=c, label=f"{r['mode']} spent")
        elif name == "priorities":
            crit = [x for x in r["records"] if x["priority"] == "critical" and x["outcome"] == "ok"]
            axes[3].scatter([x["t"] for x in crit], [x["latency"] for x in crit], s=8, color=c, label=r["mode"])
        elif any(p[3] is not None for p in tl):
            axes[3].step([p[0] for p in tl if p[3] is not None], [p[3] for p in tl if p[3] is not None], color=c,
                         where="post", label=r["mode"])
    axes[0].axhline(RATE, color="k", lw=0.8, ls="--", label="account limit")
    fourth = {"repeats": "dollars billed (cumulative)", "priorities": "critical requests: latency s by send time"
              }.get(name, "callers in the pool (ours)")
    for ax, title in zip(axes, ["answers per second", "failed requests per second", "server 429s (cumulative)",
                                fourth]):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("s")
        ax.legend(fontsize=7)
    fig.suptitle(f"load scenario: {name} ({LIMITS['rpm']} RPM account, 3 nodes)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# -- main -----------------------------------------------------------------------------------------------------------

def start_runtime(name: str, fake: FakeApiProcess, data_dir: str, cache: bool):
    import runtime
    from runtime.settings import ClassLimits, Settings

    limits = {c: ClassLimits(**LIMITS) for c in ("haiku", "sonnet", "opus", "fable")}
    callers = {"num_callers": 2, "max_callers": 4, "target_in_flight": 32, "scale_interval_s": 1.0,
               "scale_down_after_s": 10.0, "drain_grace_s": 4.0} if not cache else {"num_callers": 2}
    return runtime.start(Settings(
        base_url=fake.url, api_key="bench-key", limits=limits, cache={"enabled": cache},
        user_limits={"tenant:shared": {"rpm": USER_CAP_RPM}}, callers=callers,
        data_dir=f"{data_dir}/{name}", ledger={"allow_temporary_path": True}), name=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every phase's duration")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--address", default=None, help="a running cluster (default: start a 3-node local one)")
    args = ap.parse_args()
    console = Console(width=170)
    variants = [v for v in args.variants.split(",") if v]
    cluster = None
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
        host, advertise = "0.0.0.0", ray.util.get_node_ip_address()
    else:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        host, advertise = "127.0.0.1", None
    fake = FakeApiProcess("--rpm", str(LIMITS["rpm"]), "--itpm", str(LIMITS["itpm"]), "--otpm", str(LIMITS["otpm"]),
                          "--latency-ms", str(LATENCY_MS), host=host, advertise=advertise)
    data_dir = f"/tmp/load_bench_{fake.port}"
    started = time.time()
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]][:3]
        # one load generator per node and variant, for the whole run
        gens = {mode: [LoadWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            mode, fake.url) for n in nodes] for mode in variants}
        plain = None
        for name in [s for s in args.scenarios.split(",") if s]:
            sends = SCENARIOS[name](args.scale, random.Random(args.seed))
            cached = name == "repeats"
            rt = None
            if "ours" in variants:
                if cached:
                    if plain is not None:
                        plain.shutdown()
                        plain = None
                    rt = start_runtime("cached", fake, data_dir, cache=True)
                else:
                    plain = plain or start_runtime("plain", fake, data_dir, cache=False)
                    rt = plain
            runs = []
            for mode in variants:
                console.print(f"[bold]{name}[/]: {len(sends)} requests over {max(s.t for s in sends):.0f} s, {mode} ...")
                runs.append(run_variant(mode, sends, fake, gens[mode], rt=rt if mode == "ours" else None,
                                        runtime_name="cached" if cached else "plain", warm=name in WARM))
                if runs[-1]["warm_up"]:
                    console.print(f"  warm-up (not counted): {runs[-1]['warm_up']}")
            if cached and rt is not None:
                rt.shutdown()
            rows = table(console, name, runs)
            path = write_json(f"load_{name}", {
                "scenario": name, "limits": LIMITS, "latency_ms": LATENCY_MS, "scale": args.scale,
                "requests": len(sends), "rows": rows,
                "timelines": {r["mode"]: r["timeline"] for r in runs},
                "records": {r["mode"]: r["records"] for r in runs}})
            console.print(f"wrote {path} and {plot(name, runs, RESULTS / f'load_{name}.png')}")
        if plain is not None:
            plain.shutdown()
    finally:
        fake.stop()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    console.print(f"all scenarios in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
