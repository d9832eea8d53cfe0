"""What the runtime adds to one call, with no contention: ours vs a direct SDK call to the same server.

    python benchmarks/overhead.py [--n 300]

The fake API runs in its own process with no limits and no latency, so the difference is the runtime's own work:
validation, routing, the ledger reservation and durable record, the limiter grant and reconcile, Ray hops. Calls
alternate (direct, ours, direct, ...) so both see the same machine noise. Variants of ours: cache bypassed
(cache=False), and cache on with unique prompts (the miss path: embedding + vector search + single-flight), each
through a caller actor (``ray.get(rt.submit(...))``: two Ray hops) and through the driver's own in-process caller
(``rt.call(...)`` with ``Settings.callers.in_process=True``: no hop). The miss path twice: with
``cache.embed_in_actor`` (the cache actor embeds and searches in one trip) and without (the embedding pool
embeds, then the cache is asked), each against the embedding's own floor: one prompt embedded by the model copy
that path uses (the pool's, or the cache actor's), measured in the same iterations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anthropic  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import FakeApiProcess, pct, write_json  # noqa: E402


FLOOR = "embedding alone (pool, with token embeddings)"
FLOOR_HERE = "embedding alone (cache actor, with token embeddings)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--budget", action="store_true", help="with a daily budget (reservations on budget leases)")
    args = ap.parse_args()

    import runtime
    from runtime.settings import ClassLimits, Settings, UserLimits

    console = Console()
    big = ClassLimits(rpm=10**7, itpm=10**10, otpm=10**10)
    with FakeApiProcess("--rpm", str(10**7), "--itpm", str(10**10), "--otpm", str(10**10)) as fake:
        # two runtimes side by side, each with an embedding replica that asks for one logical CPU: four logical
        # CPUs on the two cores, or the second replica never schedules and its miss path bypasses the cache
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
        try:
            def settings(fast: bool, tag: str, in_process: bool = False, embed_in_actor: bool = False) -> Settings:
                return Settings(base_url=fake.url, api_key="bench-key",
                                limits={c: big for c in ("haiku", "sonnet", "opus", "fable")},
                                user_limits=UserLimits(rpm=0, tpm=0),
                                callers={"num_callers": 1, "in_process": in_process},
                                limiter={"leases": fast},
                                ledger={"local_journal": fast, "allow_temporary_path": True},
                                budgets={"daily_usd": 1_000.0} if args.budget else {},
                                cache={"embed_in_actor": embed_in_actor},
                                data_dir=f"/tmp/overhead_bench_{fake.port}_{tag}")

            # today's design (leases and the caller's journal) beside the previous one (every decision and
            # every write a call to the limiter or the ledger), in one run on the same machine noise
            rt = runtime.start(settings(True, "fast", in_process=True, embed_in_actor=True))
            # the miss path as it is by default: the caller has the embedding pool embed, then asks the cache
            pooled = runtime.start(settings(True, "pool", in_process=True), name="pool")
            old = runtime.start(settings(False, "rpc"), name="rpc")
            client = anthropic.Anthropic(base_url=fake.url, api_key="bench-key", max_retries=0)

            def req(i: int, tag: str, max_tokens: int = 32) -> dict:
                # the miss phase asks for room for the whole answer (the fake's are 16-128 tokens): a truncated
                # answer is not stored, and a miss path that skips the cache's write would flatter it
                return {"model": "claude-haiku-5-5", "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": f"{tag} overhead probe number {i}"}]}

            # warm up connections, the caller, the embedding model
            for i in range(40):
                client.messages.create(**req(i, "warm"))
                ray.get(rt.submit(req(i, "warm"), cache=False))
                ray.get(old.submit(req(i, "warm"), cache=False))
                ray.get(rt.submit(req(i, "warm-cache")))
                rt.call(req(i, "warm-local"), cache=False)
                rt.call(req(i, "warm-local-cache"))
                pooled.call(req(i, "warm-pool-cache"))
            # the miss path's own floor, measured beside it: one prompt embedded (with the token embeddings the
            # verifier needs) by the model copy that path uses, as its cache client asks: through the embedding
            # pool, or by the cache actor (cache.embed_in_actor)
            embedder = pooled._local.caller._cache.embedder
            cache_actor = rt._local.caller._cache._actor

            def timed(fn) -> float:
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0

            # Phases, each alternating direct SDK calls with its own variants: the miss path leaves work behind
            # (the cache's write) that would land on whichever call came next, so bypass and miss paths are not
            # interleaved with each other, only each with the direct call. Each miss phase measures its own floor,
            # one prompt embedded by its model copy, in the same iterations (the floor moved by 3 ms between runs
            # when it had a phase of its own)
            def floor(i: int) -> None:
                pooled._local._submit(embedder.encode([f"embedding probe number {i}"], tokens=True)).result()

            async def embed_here(text: str) -> None:
                if await cache_actor.embed.remote(text) is None:
                    raise RuntimeError("the cache actor did not embed: its floor would be a no-op")

            def floor_here(i: int) -> None:
                rt._local._submit(embed_here(f"embedding probe number {i}")).result()

            phases = {
                "bypass, in-process": {
                    "runtime in-process (rt.call), cache bypassed": lambda i: rt.call(req(i, "local"), cache=False)},
                "bypass, through actors": {
                    "runtime via a caller actor (rt.submit), cache bypassed":
                        lambda i: ray.get(rt.submit(req(i, "bypass"), cache=False)),
                    "previous design (an actor call per decision and write), bypassed":
                        lambda i: ray.get(old.submit(req(i, "rpc"), cache=False))},
                "cache miss, in-process, pool embeds": {
                    FLOOR: floor,
                    "runtime in-process (rt.call), miss, embedding pool then cache":
                        lambda i: pooled.call(req(i, "poolmiss", 128))},
                "cache miss, in-process": {
                    FLOOR_HERE: floor_here,
                    "runtime in-process (rt.call), cache miss path": lambda i: rt.call(req(i, "localmiss", 128))},
                "cache miss, through actors": {
                    FLOOR_HERE: floor_here,
                    "runtime via a caller actor (rt.submit), cache miss path":
                        lambda i: ray.get(rt.submit(req(i, "cachemiss", 128)))},
            }
            # A miss sends its answer's write to the cache after answering (LanceDB append, ~10 ms of the cache
            # actor's CPU): waited out untimed after each call, so it lands on no later measured call (a direct
            # call slowed by it would flatter the 'added' column). Its cost is throughput's, not this latency's.
            settle = {
                "cache miss, in-process, pool embeds":
                    lambda: pooled._local._submit(pooled._local.caller._cache.drain()).result(),
                "cache miss, in-process": lambda: rt._local._submit(rt._local.caller._cache.drain()).result(),
                "cache miss, through actors": lambda: ray.get(rt.callers[0].flush.remote()),
            }
            # a runtime no later phase uses goes once its last phase is done: its idle actors are noise there
            last_use = {"bypass, through actors": old.shutdown}
            samples: dict[str, dict[str, list[float]]] = {}
            for phase, variants in phases.items():
                got = samples[phase] = {"direct SDK": [], **{name: [] for name in variants}}
                room = 128 if phase.startswith("cache miss") else 32
                after = settle.get(phase, lambda: None)
                entries = [("direct SDK", lambda i: client.messages.create(**req(i, f"direct-{phase}", room))),
                           *variants.items()]
                for i in track(range(args.n), description=phase):
                    # the order turns each iteration: what ran just before a call changes it (an encode by one
                    # copy of the model leaves another copy out of the CPU's cache: the cache actor's next encode
                    # took ~3 ms longer right after the pool's), so no entry always follows the same one
                    turn = i % len(entries)
                    for name, fn in entries[turn:] + entries[:turn]:
                        got[name].append(timed(lambda: fn(i)))
                        after()
                if phase in last_use:
                    last_use.pop(phase)()
            lease_stats = ray.get(rt.callers[0].pipeline_stats.remote())
            cache_stats = rt.stats().get("cache", {})  # stats() flushes every caller first
            rt.shutdown()
            pooled.shutdown()
        finally:
            ray.shutdown()

    def ms(v: list[float], q: float) -> float:
        return pct(v, q) * 1000

    rows = {}
    t = Table(title=f"per-call latency, {args.n} sequential calls each (ms); 'added' against the direct calls of "
                    "the same phase")
    for col in ("phase", "path", "p50", "p99", "mean", "added p50", "added p99"):
        t.add_column(col, justify="right")
    for phase, got in samples.items():
        direct = got["direct SDK"]
        for name, vals in got.items():
            row = {"phase": phase, "p50_ms": ms(vals, 50), "p99_ms": ms(vals, 99),
                   "mean_ms": statistics.mean(vals) * 1000,
                   "added_p50_ms": ms(vals, 50) - ms(direct, 50), "added_p99_ms": ms(vals, 99) - ms(direct, 99)}
            rows[f"{phase}: {name}"] = row
            t.add_row(phase, name, f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['mean_ms']:.2f}",
                      f"{row['added_p50_ms']:.2f}" if name != "direct SDK" else "",
                      f"{row['added_p99_ms']:.2f}" if name != "direct SDK" else "")
    console.print(t)
    emb = {}
    for phase, name in (("cache miss, in-process, pool embeds",
                         "runtime in-process (rt.call), miss, embedding pool then cache"),
                        ("cache miss, in-process", "runtime in-process (rt.call), cache miss path"),
                        ("cache miss, through actors", "runtime via a caller actor (rt.submit), cache miss path")):
        row = rows[f"{phase}: {name}"]
        floor_of = samples[phase][FLOOR if FLOOR in samples[phase] else FLOOR_HERE]
        emb[phase] = ms(floor_of, 50)
        row["added_p50_minus_embedding_ms"] = row["added_p50_ms"] - emb[phase]
        # the same, per iteration: each call less the direct call and the floor measured beside it (one
        # machine state), then the median. A second estimate, not a replacement: reported beside the first
        paired = [o - d - f for o, d, f in zip(samples[phase][name], samples[phase]["direct SDK"], floor_of)]
        row["paired_p50_minus_embedding_ms"] = statistics.median(paired) * 1000
        console.print(f"{name}: added p50 less this phase's embedding p50 ({emb[phase]:.2f} ms): "
                      f"{row['added_p50_minus_embedding_ms']:.2f} ms; per iteration, median: "
                      f"{row['paired_p50_minus_embedding_ms']:.2f} ms")
    console.print(f"caller pipeline stats: {lease_stats}")
    out = {"n": args.n, "budget": args.budget, "rows": rows, "embedding_p50_ms": emb,
           "machine_load": os.getloadavg(), "cache_puts": cache_stats.get("puts"),
           "cache_misses": cache_stats.get("misses"), "cache_embedding": cache_stats.get("embedding")}
    console.print(f"wrote {write_json('overhead', out)}")


if __name__ == "__main__":
    main()
