"""One shared, batched embedding pool vs a model in every caller: throughput, latency, caller memory, and the
semantic-hit latency at 100k cache entries.

1. Embeddings/s and p50/p99 latency with 1, 4 and 16 concurrent callers (each a Ray actor placed like a real
   caller, one closed-loop request stream, a unique text per request). Side by side in one run:
     in-caller       today's design: every caller loads all-MiniLM-L6-v2 and embeds its own requests
     pool            the EmbeddingPoolClient to one replica (the default settings: 2 ms linger only while
                     a send is on the wire, batching across callers inside the replica)
     pool, no linger the same with linger_s=0 (batching inside the replica only)
     pool x2         two replicas
2. Caller RSS: a real runtime (runtime.start against the embedded API) answers 50 requests (misses and
   semantic hits) and each actor's resident memory is read; once with this tree, once with the tree of
   --before-ref (default: d824f33, the last commit before the pool), exported by `git archive`, so "before" is
   the code as it was.
3. Semantic-hit p50 end to end (CacheClient.lookup: exact lookup, embedding, scope-filtered search, guard) at
   100k entries, 10 % in the queried scope, cold embeddings (LRUs off): the model in this process vs the pool.

    .venv/bin/python benchmarks/embedding.py                          # ~6 min on 2 cores
    .venv/bin/python benchmarks/embedding.py --callers 1,4 --duration 5 --entries 20000 --skip-rss   # quick

Writes benchmarks/results/embedding.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from actors.embedder import EmbeddingPoolClient, find_replicas, start_pool, stop_pool  # noqa: E402
from benchmarks.adversarial_pairs import PARAPHRASES  # noqa: E402
from benchmarks.common import pct, write_json  # noqa: E402
from runtime.embedding_types import EmbeddingUnavailable  # noqa: E402
from runtime.settings import Settings  # noqa: E402

MODEL, TENANT = "claude-haiku-5-5", "bench"
SENTENCES = [q for q, _, _ in PARAPHRASES] + [c for _, c, _ in PARAPHRASES]
MB = 1024 * 1024


def rss_of(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def private_of(pid: int | None = None) -> int:
    """Memory this process alone holds (RSS counts the Ray and Python libraries every process shares)."""
    total = 0
    with open(f"/proc/{pid or 'self'}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


# -- 1. throughput and latency --------------------------------------------------------------------------------

@ray.remote(num_cpus=0.01)  # placed like a real caller (runtime.settings.CallerSettings.num_cpus)
class BenchCaller:
    def __init__(self, mode: str, settings: Settings) -> None:
        import actors.caller  # noqa: F401 - everything a real caller imports, for a like-for-like RSS

        self.mode = mode
        if mode == "in-caller":
            from runtime.embedding import get_embedder

            self.emb = get_embedder(settings.cache.embedding_model)
            self.emb.embed(["warm up"])  # what CallerActor.__init__ did
        else:
            self.emb = EmbeddingPoolClient(settings)
            self.emb.discover()

    def info(self) -> dict[str, Any]:
        threads = None
        if "torch" in sys.modules:
            threads = sys.modules["torch"].get_num_threads()
        return {"rss": rss_of(), "torch_loaded": "torch" in sys.modules, "torch_threads": threads}

    async def run(self, duration: float, warmup: float, tag: str, streams: int = 1) -> dict[str, Any]:
        t_start = time.monotonic()
        t_measure, t_stop = t_start + warmup, t_start + warmup + duration
        lat: list[float] = []
        errors = 0

        async def stream(k: int) -> None:
            nonlocal errors
            i = 0
            while (now := time.monotonic()) < t_stop:
                text = f"{SENTENCES[i % len(SENTENCES)]} ({tag}.{k}.{i})"  # unique: no LRU hit anywhere
                t0 = time.perf_counter()
                try:
                    await self.emb.embed_async(text)
                except Exception:  # noqa: BLE001 - a pool past its deadline: counted, not timed
                    errors += now >= t_measure
                else:
                    if now >= t_measure:
                        lat.append(time.perf_counter() - t0)
                i += 1

        await asyncio.gather(*(stream(k) for k in range(streams)))
        return {"lat": lat, "errors": errors, "rss": rss_of(), "private": private_of()}


def variant_settings(base: Settings, name: str) -> Settings:
    over = {"in-caller": {}, "pool": {}, "pool, no linger": {"linger_s": 0.0},
            "pool x2": {"min_replicas": 2, "max_replicas": 2}}[name]
    emb = {"min_replicas": 1, "max_replicas": 1, **over}  # a fixed pool size: no scaling mid-measurement
    return base.model_copy(update={"embedding": base.embedding.model_copy(update=emb)})


def wait_pool_gone(settings: Settings) -> None:
    deadline = time.monotonic() + 60
    while find_replicas(settings) and time.monotonic() < deadline:
        time.sleep(0.2)  # the names are released once the kills land; the next variant reuses them


def throughput(base: Settings, callers: list[int], variants: list[str], duration: float, warmup: float,
               streams: int) -> list[dict[str, Any]]:
    rows = []
    bar = tqdm(total=len(callers) * len(variants), desc="throughput cells", unit="cell")
    for n in callers:
        for name in variants:
            s = variant_settings(base, name)
            pool = start_pool(s) if name != "in-caller" else []
            actors = [BenchCaller.remote("in-caller" if name == "in-caller" else "pool", s) for _ in range(n)]
            infos = ray.get([a.info.remote() for a in actors], timeout=900)
            outs = ray.get([a.run.remote(duration, warmup, f"{n}.{k}", streams) for k, a in enumerate(actors)])
            replica_rss = [ray.get(h.stats.remote())["rss_bytes"] for h in pool]
            for a in actors:
                ray.kill(a)
            if pool:
                stop_pool(s)
                wait_pool_gone(s)
            lat_ms = [x * 1000 for o in outs for x in o["lat"]]
            rows.append({
                "callers": n, "streams_per_caller": streams, "variant": name, "embeddings": len(lat_ms), "per_s": len(lat_ms) / duration,
                "p50_ms": pct(lat_ms, 50), "p99_ms": pct(lat_ms, 99),
                "mean_ms": statistics.fmean(lat_ms) if lat_ms else float("nan"),
                "errors": sum(o["errors"] for o in outs),
                "caller_rss_mb": statistics.fmean(o["rss"] for o in outs) / MB,
                "caller_private_mb": statistics.fmean(o["private"] for o in outs) / MB,
                "callers_rss_total_mb": sum(o["rss"] for o in outs) / MB,
                "replicas_rss_mb": sum(replica_rss) / MB,
                "torch_in_caller": any(i["torch_loaded"] for i in infos),
                "caller_torch_threads": infos[0]["torch_threads"],
            })
            bar.update(1)
    bar.close()
    return rows


# -- 2. caller RSS of a real runtime, before and after ----------------------------------------------------------

RSS_PROBE = r"""
import json, os, sys, tempfile
from collections import Counter
import ray, runtime
from runtime.settings import ClassLimits, Settings, UserLimits

def rss(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def private(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(("Private_Clean:", "Private_Dirty:")))

prompts = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
lim = {c: ClassLimits(rpm=60_000, itpm=50_000_000, otpm=10_000_000) for c in ("haiku", "sonnet", "opus", "fable")}
import runtime.settings as rs
# trees from before the persistence check have no such setting (Settings refuses unknown fields)
extra = ({"ledger": {"allow_temporary_path": True}}
         if "allow_temporary_path" in getattr(getattr(rs, "LedgerSettings", None), "model_fields", {}) else {})
rt = runtime.start(Settings(data_dir=tempfile.mkdtemp(prefix="rss_probe_"), limits=lim, fake_api=True,
                            user_limits=UserLimits(rpm=0, tpm=0), **extra))
kinds = Counter()
for batch in (prompts[0::2], prompts[1::2]):  # the cached side first, then its paraphrases
    for r in ray.get([rt.submit({"model": "auto", "max_tokens": 64, "messages": [{"role": "user", "content": p}]},
                                tenant="rss") for p in batch]):
        kinds[r.cache] += 1
out, priv = {}, {}
for a in ray._private.state.actors().values():
    if a["State"] == "ALIVE" and a.get("Name"):
        out[a["Name"]] = rss(a["Pid"])
        priv[a["Name"]] = private(a["Pid"])
print("RSS_JSON " + json.dumps({"rss": out, "private": priv, "cache": dict(kinds)}))
rt.shutdown()
ray.shutdown()
"""


def runtime_rss(tree: Path, n_requests: int) -> dict[str, Any]:
    prompts = []
    for q, c, _ in PARAPHRASES[: n_requests // 2]:
        prompts += [c, q]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, json.dumps(prompts)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RSS_JSON ")), None)
    if line is None:
        raise RuntimeError(f"RSS probe failed in {tree}: {proc.stderr[-3000:]}")
    return json.loads(line[len("RSS_JSON "):])


def export_ref(ref: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix=f"embedding_before_{ref.replace('/', '_')}_"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def summarise_rss(probe: dict[str, Any]) -> dict[str, Any]:
    rss = probe["rss"]
    callers = [v for k, v in rss.items() if k.startswith("caller-")]
    return {"caller_rss_mb": [round(v / MB, 1) for v in callers],
            "caller_private_mb": [round(v / MB, 1) for k, v in probe["private"].items() if k.startswith("caller-")],
            "embedders_rss_mb": [round(v / MB, 1) for k, v in rss.items() if k.startswith("embedder-")],
            "actors_rss_mb": {k: round(v / MB, 1) for k, v in sorted(rss.items())}, "cache": probe["cache"]}


# -- 3. semantic-hit latency at N entries ------------------------------------------------------------------------

async def semantic_latency(base: Settings, entries: int, hot_fraction: float, queries: int) -> dict[str, Any]:
    from actors.cache import NAMESPACE, CacheActor, CacheClient
    from runtime import cache_policy as cp
    from runtime.embedding import Embedder

    settings = base.model_copy(update={
        "data_dir": Path(tempfile.mkdtemp(prefix="embedding_semantic_")),
        "embedding": base.embedding.model_copy(update={"min_replicas": 1, "max_replicas": 1, "lru_size": 0})})
    # the queried scope holds entries * hot_fraction rows (10k at 100k): searched exactly in memory, so the
    # ANN index, which would take ~90 s to build here, changes nothing for it
    actor = CacheActor.options(name=f"cache-embbench-{int(time.time())}", namespace=NAMESPACE,
                               lifetime="detached").remote(settings, index_min_rows=10**9,
                                                           maintenance_interval_s=0)
    pool = start_pool(settings)
    # today: the model in the caller's process, with the one torch thread Ray gives a 0.01-CPU caller actor
    local = Embedder(settings.cache.embedding_model, lru_size=0, threads=1)
    clients = {"in-caller": CacheClient(actor, settings, local),
               "pool": CacheClient(actor, settings, EmbeddingPoolClient(settings))}
    req = lambda text: {"max_tokens": 512, "messages": [{"role": "user", "content": text}]}  # noqa: E731
    hot_scope = cp.scope_for(req("x"), MODEL, TENANT).scope_id()
    rng = np.random.default_rng(0)
    now = time.time()
    hot_rows = 0
    t0 = time.perf_counter()
    for start in tqdm(range(0, entries, 10_000), desc="fill cache", unit="10k rows"):
        m = min(10_000, entries - start)
        vecs = rng.standard_normal((m, 384)).astype(np.float32)
        rows = []
        for j in range(m):
            i = start + j
            scope = hot_scope if rng.random() < hot_fraction else f"{1 + i % 50:032x}"
            hot_rows += scope == hot_scope
            rows.append({"key": f"{i:064x}", "scope_id": scope, "tenant": TENANT, "model": MODEL,
                         "prompt": f"synthetic prompt {i}", "vector": vecs[j], "response": "{}",
                         "cost_usd": 0.001, "created_at": now, "expires_at": now + 86_400})
        await actor.put_many.remote(rows)
    fill_s = time.perf_counter() - t0
    answer = {"type": "message", "role": "assistant", "stop_reason": "end_turn",
              "content": [{"type": "text", "text": "cached"}], "usage": {"input_tokens": 12, "output_tokens": 4}}
    stored = 0
    for _, c, _ in PARAPHRASES:
        out = await clients["pool"].lookup(req(c), MODEL, TENANT)
        if out.kind == "miss" and await clients["pool"].store(out, answer, MODEL, 0.002):
            stored += 1
    res: dict[str, Any] = {"entries": entries, "hot_scope_rows": hot_rows + stored, "fill_s": fill_s,
                           "stored": stored}
    lat: dict[str, list[float]] = {k: [] for k in clients}
    embed_only: dict[str, list[float]] = {k: [] for k in clients}
    kinds: dict[str, dict[str, int]] = {k: {} for k in clients}
    qs = [q for q, _, _ in PARAPHRASES]
    for i in tqdm(range(queries), desc="semantic lookups", unit="q"):
        order = list(clients) if i % 2 == 0 else list(reversed(clients))  # neither always goes first
        for name in order:
            t0 = time.perf_counter()
            out = await clients[name].lookup(req(qs[i % len(qs)]), MODEL, TENANT)
            dt = time.perf_counter() - t0
            kinds[name][out.kind] = kinds[name].get(out.kind, 0) + 1
            if out.kind == "semantic" and i >= 5:
                lat[name].append(dt * 1000)
            if out.kind == "miss" and out.leader:
                await clients[name].release(out)
            t0 = time.perf_counter()  # the embedding alone, for the breakdown
            try:
                await clients[name].embedder.embed_async(f"{qs[i % len(qs)]} ({i})")
            except EmbeddingUnavailable:  # past the pool's deadline (a starved replica): the slowest there is
                embed_only[name].append(float("inf"))
            else:
                embed_only[name].append((time.perf_counter() - t0) * 1000)
    for name in clients:
        res[name] = {"n": len(lat[name]), "p50_ms": pct(lat[name], 50), "p90_ms": pct(lat[name], 90),
                     "p99_ms": pct(lat[name], 99), "embed_only_p50_ms": pct(embed_only[name][5:], 50),
                     "outcomes": kinds[name]}
    ray.kill(actor, no_restart=True)
    stop_pool(settings)
    wait_pool_gone(settings)
    return res


# -- main ------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--callers", default="1,4,16")
    ap.add_argument("--variants", default="in-caller;pool;pool, no linger;pool x2",
                    help="';'-separated from: in-caller; pool; pool, no linger; pool x2")
    ap.add_argument("--streams", type=int, default=1, help="concurrent request streams per caller")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--hot-fraction", type=float, default=0.1)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rss-requests", type=int, default=50)
    # d824f33: main before the embedding pool landed, the last tree whose callers load the model themselves
    ap.add_argument("--before-ref", default="d824f33", help="git ref whose tree gives the 'before' caller RSS")
    ap.add_argument("--parts", default="rss,throughput,semantic")
    ap.add_argument("--out", default="embedding", help="results/<out>.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    callers = [int(x) for x in args.callers.split(",")]
    variants = [v.strip() for v in args.variants.split(";")]

    res: dict[str, Any] = {"args": vars(args)}
    res["load_average_start"] = os.getloadavg()
    if "rss" in parts:
        print(f"caller RSS: a real runtime answering {args.rss_requests} requests, {args.before_ref} vs this tree")
        before_tree = export_ref(args.before_ref)
        res["rss_before"] = summarise_rss(runtime_rss(before_tree, args.rss_requests))
        res["rss_after"] = summarise_rss(runtime_rss(ROOT, args.rss_requests))

    # logical CPUs: the "pool x2" variant's two replicas hold one each, and the callers need a sliver beside
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    base = Settings(data_dir=Path(tempfile.mkdtemp(prefix="embedding_bench_")))
    if "throughput" in parts:
        res["throughput"] = throughput(base, callers, variants, args.duration, args.warmup, args.streams)
    if "semantic" in parts:
        res["semantic"] = asyncio.run(semantic_latency(base, args.entries, args.hot_fraction, args.queries))
    ray.shutdown()
    res["load_average_end"] = os.getloadavg()

    if "throughput" in res:
        print(f"\nEmbeddings: closed-loop callers (Ray actors), {args.streams} request stream(s) each, unique texts")
        print(f"{'callers':>7} | {'variant':16s} | {'emb/s':>7} | {'p50 ms':>7} | {'p99 ms':>8} | {'errors':>6} | "
              f"{'caller RSS MB':>13} | {'caller private MB':>17} | {'model RSS total MB':>18}")
        for r in res["throughput"]:
            model_total = r["callers_rss_total_mb"] if r["variant"] == "in-caller" else r["replicas_rss_mb"]
            print(f"{r['callers']:>7} | {r['variant']:16s} | {r['per_s']:7.1f} | {r['p50_ms']:7.1f} | "
                  f"{r['p99_ms']:8.1f} | {r['errors']:>6} | {r['caller_rss_mb']:13.0f} | "
                  f"{r['caller_private_mb']:17.0f} | {model_total:18.0f}")
    if "rss_before" in res:
        print(f"\nRuntime callers after {args.rss_requests} requests, MB per caller (RSS / private)")
        for label, key in ((args.before_ref, "rss_before"), ("this tree", "rss_after")):
            r = res[key]
            print(f"  {label:10s} RSS {r['caller_rss_mb']} private {r['caller_private_mb']} "
                  f"embedders {r['embedders_rss_mb']} cache outcomes {r['cache']}")
    if "semantic" in res:
        sem = res["semantic"]
        print(f"\nSemantic hit, end to end (CacheClient.lookup), {sem['entries']:,} entries "
              f"({sem['hot_scope_rows']:,} in the queried scope), cold embeddings")
        print(f"{'embedding':10s} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} | {'embed only p50':>14} | outcomes")
        for name in ("in-caller", "pool"):
            r = sem[name]
            print(f"{name:10s} | {r['p50_ms']:7.1f} | {r['p90_ms']:7.1f} | {r['p99_ms']:7.1f} | "
                  f"{r['embed_only_p50_ms']:14.1f} | {r['outcomes']}")
        print(f"target: pool semantic-hit p50 <= 20 ms: {'met' if sem['pool']['p50_ms'] <= 20 else 'NOT met'}")
    print(f"load average (1/5/15 min) at start {res['load_average_start']}, at end {res['load_average_end']}")
    path = write_json(args.out, res)
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
