"""Prompt caching: throughput and cost of traffic that shares a ~5,000-token system prompt, three ways in one run.

Question: at an ITPM limit of 60,000, how many requests a minute get through, what do 1,000 of them cost, and
how many cache writes are paid, when the runtime (a) sends requests as given (prompt_caching="off"), (b) places
cache_control automatically but lets every request go at once (no single-flight: prompt_cache.write_wait_s=0),
(c) places it and makes one write per new prefix (the default)?

    python benchmarks/prompt_cache.py                  # 120 s closed loop per variant + a 300-request burst
    python benchmarks/prompt_cache.py --duration 60 --burst 100

The server is `claude-runtime fake-api` in its own process: 4,000 RPM / 60,000 ITPM / 400,000 OTPM (ITPM is the
limit that binds), 500 ms to first token (--latency-ms), a billing log. The fake API makes a cache entry readable
only once its writer's response begins, as the real API does, so concurrent first requests with a new prefix
each pay the write unless something makes them wait.

Two phases per variant, each against a fresh server state:
* burst: --burst requests with a brand-new system prompt, all submitted at once (the issue's scenario):
  wall time, writes paid. Skipped for "off", which needs the whole input at 60k a minute (computed instead).
* closed loop: --concurrency requests in flight for --duration s; the system prompt changes every --rotate-s
  (a new prompt version), so new prefixes keep arriving while traffic flows. Requests/min over the steady
  window (from a quarter into the run), ITPM spent per minute there, dollars per 1,000 requests and the
  writes paid, all from the server's billing log.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import FakeApiProcess, write_json

LIMITS = {"rpm": 4_000, "itpm": 60_000, "otpm": 400_000}
MODEL = "claude-sonnet-5-5"
MAX_TOKENS = 16
VARIANTS = {
    "off": {"prompt_caching": "off"},
    "auto (no single-flight)": {"prompt_cache": {"write_wait_s": 0.0}},
    "auto (one write per prefix)": {},
}


def system_prompt(version: int) -> str:
    """~5,000 tokens on the fake API's tokenizer; each version is a new prefix."""
    return f"Support handbook, version {version}.\n" + "\n".join(
        f"Policy {i}: answer support questions politely, cite section {i} of the handbook, never promise "
        f"refunds beyond thirty days, and escalate billing disputes." for i in range(119))


def request(version: int, tag: str) -> dict:
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "system": system_prompt(version),
            "messages": [{"role": "user", "content": f"Customer {tag} asks: where is my order?"}]}


def lines_of(billing: list[dict], prefix: str) -> list[dict]:
    return [b for b in billing if (b.get("runtime_request_id") or "").startswith(prefix)]


def cost_summary(lines: list[dict]) -> dict:
    writes = [b for b in lines if b["cache_creation_input_tokens"] > 0]
    return {"billed": len(lines), "usd": sum(b["cost_usd"] for b in lines),
            "writes": len(writes), "write_tokens": sum(b["cache_creation_input_tokens"] for b in writes),
            "reads": sum(1 for b in lines if b["cache_read_input_tokens"] > 0)}


async def burst(rt, n: int, tag: str) -> dict:
    t0 = time.perf_counter()
    # a prompt version no other phase uses: the prefix is new
    refs = [rt.submit(request(10_000, f"{tag}-{i}"), request_id=f"{tag}-{i}", cache=False, deadline_s=600)
            for i in range(n)]
    out = await asyncio.gather(*refs, return_exceptions=True)
    return {"wall_s": time.perf_counter() - t0, "ok": sum(1 for r in out if not isinstance(r, BaseException))}


async def closed_loop(rt, tag: str, duration: float, concurrency: int, rotate_s: float) -> dict:
    t0, wall0 = time.monotonic(), time.time()
    done: list[tuple[float, str]] = []       # (seconds into the run, request id)
    errors: dict[str, int] = {}
    counter = iter(range(10**9))
    bar = tqdm(total=None, desc=tag, unit="req", leave=False, mininterval=5.0)
    in_flight: dict[int, ray.ObjectRef] = {}

    async def loop(w: int) -> None:
        while time.monotonic() - t0 < duration:
            i = next(counter)
            version = int((time.monotonic() - t0) // rotate_s)
            rid = f"{tag}-{w}-{i}"
            try:
                in_flight[w] = ref = rt.submit(request(version, rid), request_id=rid, cache=False, deadline_s=600)
                await ref
                done.append((time.monotonic() - t0, rid))
                bar.update(1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - counted by type
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    tasks = [asyncio.ensure_future(loop(w)) for w in range(concurrency)]
    # requests still waiting for admission when the time is up are not waited for (uncached traffic queues
    # for minutes): they are cancelled (never sent, their reservations released); what completed counts
    await asyncio.wait(tasks, timeout=duration + 15)
    for w, t in enumerate(tasks):
        if not t.done():
            t.cancel()
            ray.cancel(in_flight[w])
    await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    return {"done": done, "errors": errors, "wall0": wall0}


def run_variant(name: str, over: dict, fake: FakeApiProcess, args, data_root: Path) -> dict:
    import runtime
    from runtime.settings import ClassLimits, Settings, UserLimits

    fake.reset()
    tag = "v" + str(list(VARIANTS).index(name))
    limits = {c: ClassLimits(**LIMITS) for c in ("haiku", "sonnet", "opus", "fable")}
    settings = Settings(base_url=fake.url, api_key="bench-key", limits=limits, user_limits=UserLimits(rpm=0, tpm=0),
                        cache={"enabled": False}, callers={"num_callers": 2}, limiter={"max_wait_s": 600},
                        data_dir=data_root / tag, ledger={"allow_temporary_path": True}, **over)
    rt = runtime.start(settings)
    try:
        out: dict = {"variant": name}
        if name != "off" and args.burst:
            out["burst"] = asyncio.run(burst(rt, args.burst, f"{tag}b"))
        fake.reset()   # the closed loop starts from full buckets and an empty prompt cache
        loop = asyncio.run(closed_loop(rt, f"{tag}c", args.duration, args.concurrency, args.rotate_s))
        out["errors"] = loop["errors"]
        out["server_429"] = fake.stats().get("by_status", {}).get("429", 0)
    finally:
        rt.shutdown()
    from runtime.fake_api import read_billing

    billing = read_billing(Path(args.billing))
    if "burst" in out:
        out["burst"].update(cost_summary(lines_of(billing, f"{tag}b-")))
    done = loop["done"]
    ids = {rid for _, rid in done}
    lines = [b for b in lines_of(billing, f"{tag}c-") if b["runtime_request_id"] in ids]
    # the steady window: from a quarter into the run (the initial full bucket spent) until the load stops
    w0, w1 = 0.25 * args.duration, args.duration
    steady = [t for t, _ in done if w0 <= t < w1]
    window_min = (w1 - w0) / 60
    in_window = [b for b in lines if w0 <= b["ts"] - loop["wall0"] < w1]
    out.update(
        completed=len(done), req_per_min=len(steady) / window_min,
        itpm_used_per_min=sum(b["input_tokens"] + b["cache_creation_input_tokens"] for b in in_window) / window_min,
        **{f"loop_{k}": v for k, v in cost_summary(lines).items()})
    out["usd_per_1000"] = 1000 * out["loop_usd"] / max(1, out["loop_billed"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0, help="closed-loop seconds per variant")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rotate-s", type=float, default=30.0, help="a new system prompt version this often")
    ap.add_argument("--burst", type=int, default=300, help="requests in the burst phase (0: skip)")
    ap.add_argument("--latency-ms", type=float, default=500.0,
                    help="the server's time to first token (a cache entry is readable from then on)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()

    console = Console(width=200)
    data_root = Path(tempfile.mkdtemp(prefix="prompt_cache_bench_"))
    args.billing = str(data_root / "billing.jsonl")
    fake = FakeApiProcess("--rpm", str(LIMITS["rpm"]), "--itpm", str(LIMITS["itpm"]), "--otpm",
                          str(LIMITS["otpm"]), "--latency-ms", str(args.latency_ms), "--billing", args.billing)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name in args.variants.split(","):
            console.print(f"[bold]{name}[/]: burst of {args.burst if name != 'off' else 0}, "
                          f"then {args.duration:.0f} s closed loop ...")
            rows.append(run_variant(name, VARIANTS[name], fake, args, data_root))
    finally:
        fake.stop()
        ray.shutdown()

    from runtime.fake_api.tokenizer import count_text

    prompt_tokens = count_text(system_prompt(0), "v2")
    uncached_burst_min = args.burst * (prompt_tokens + 20) / LIMITS["itpm"]
    t = Table(title=f"prompt caching, {prompt_tokens:,}-token shared system prompt, {LIMITS['itpm']:,} ITPM "
                    f"({args.duration:.0f} s closed loop, {args.concurrency} in flight, new prompt every "
                    f"{args.rotate_s:.0f} s, {args.latency_ms:.0f} ms to first token)")
    for col in ("variant", "req/min", "ITPM used/min", "$ per 1,000 req", "writes paid (loop)", "reads (loop)",
                f"burst of {args.burst}: wall s", "burst: writes paid", "server 429s", "failed"):
        t.add_column(col, justify="right")
    for r in rows:
        b = r.get("burst")
        t.add_row(r["variant"], f"{r['req_per_min']:.1f}", f"{r['itpm_used_per_min']:,.0f}",
                  f"${r['usd_per_1000']:.3f}", str(r["loop_writes"]), f"{r['loop_reads']}/{r['loop_billed']}",
                  f"{b['wall_s']:.1f}" if b else f"≥ {uncached_burst_min * 60:,.0f} (ITPM)",
                  str(b["writes"]) if b else str(args.burst), str(r["server_429"]),
                  str(sum(r["errors"].values())))
    console.print(t)
    path = write_json("prompt_cache", {"limits": LIMITS, "model": MODEL, "prompt_tokens": prompt_tokens,
                                       "latency_ms": args.latency_ms,
                                       "duration_s": args.duration, "concurrency": args.concurrency,
                                       "rotate_s": args.rotate_s, "burst": args.burst, "rows": rows})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
