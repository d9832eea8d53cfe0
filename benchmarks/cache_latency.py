"""How fast is the cache on its real path (CacheClient -> Ray actor -> LanceDB), at N entries?

Fills the table with synthetic unit vectors (spread over --scopes scopes, with --hot-fraction of them in the
scope the queries use), stores the benchmark's real paraphrase prompts with real embeddings in that scope, then
measures through CacheClient.lookup:
  exact hit (actor round trip + dict), semantic hit (encoding the prompt with its token embeddings + scope-filtered
  vector search + guard + verifier), side by side with the same lookups judged by cosine alone (verifier off)
  and with the same lookups through the eager (untraced) transformer, miss; plus insert throughput (bulk put_many
  and coalesced concurrent put), and table size on disk.

    .venv/bin/python benchmarks/cache_latency.py                    # 20k entries (~1 min)
    .venv/bin/python benchmarks/cache_latency.py --entries 100000   # the 100k target
    .venv/bin/python benchmarks/cache_latency.py --entries 1000000 --hot-fraction 1.0   # 1M, one scope, ANN

Past --index-min-rows (default 100k) the actor builds its IVF-PQ index; scopes above 20k rows are searched
through it, smaller ones exactly. Writes benchmarks/results/cache_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from actors.cache import NAMESPACE, CacheActor, CacheClient  # noqa: E402
from benchmarks.adversarial_pairs import PARAPHRASES  # noqa: E402
from runtime import cache_policy as cp  # noqa: E402
from runtime.embedding import Embedder, get_embedder  # noqa: E402
from runtime.settings import Settings  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
MODEL, TENANT = "claude-haiku-5-5", "bench"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def summary(xs_s: list[float]) -> dict:
    ms = [x * 1000 for x in xs_s]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else float("nan")}


def req(text: str) -> dict:
    return {"max_tokens": 512, "messages": [{"role": "user", "content": text}]}


def answer(text: str) -> dict:
    return {"type": "message", "role": "assistant", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": text}], "usage": {"input_tokens": 12, "output_tokens": 40}}


async def run(args) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="cache_latency_"))
    settings = Settings(data_dir=data_dir)
    actor = CacheActor.options(name=f"cache-bench-{int(time.time())}", namespace=NAMESPACE,
                               lifetime="detached").remote(settings, index_min_rows=args.index_min_rows,
                                                           maintenance_interval_s=0)
    ray.get(actor.ping.remote())
    emb = get_embedder()
    client = CacheClient(actor, settings, emb)
    hot_scope = cp.scope_for(req("x"), MODEL, TENANT).scope_id()
    res: dict = {"entries": args.entries, "scopes": args.scopes, "hot_fraction": args.hot_fraction}

    # -- fill ------------------------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    n, batch = args.entries, 10_000
    now = time.time()
    other_scopes = [f"{i:032x}" for i in range(1, args.scopes + 1)]
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        m = min(batch, n - start)
        vecs = rng.standard_normal((m, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        entries = []
        for j in range(m):
            i = start + j
            scope = hot_scope if rng.random() < args.hot_fraction else other_scopes[i % len(other_scopes)]
            entries.append({"key": f"{i:064x}", "scope_id": scope, "tenant": TENANT, "model": MODEL,
                            "kind": "factual", "prompt": f"synthetic prompt {i}", "vector": vecs[j],
                            "response": json.dumps(answer(f"synthetic answer {i}")), "cost_usd": 0.001,
                            "created_at": now, "expires_at": now + 86_400})
        await actor.put_many.remote(entries)
    fill_s = time.perf_counter() - t0
    res["bulk_insert_rows_per_s"] = n / fill_s
    print(f"filled {n} rows in {fill_s:.1f}s ({n / fill_s:,.0f} rows/s, batches of {batch})")

    t0 = time.perf_counter()
    maint = await actor.maintain.remote()  # scope_id index, compaction; the ANN index past index_min_rows
    res["maintain_s"] = time.perf_counter() - t0
    res["maintain"] = maint
    print(f"maintenance after fill: {res['maintain_s']:.1f}s {maint}")

    # -- store the real prompts through the client (concurrent puts coalesce) ---------------------------------
    cached_side = [c for _, c, _ in PARAPHRASES]
    outs = await asyncio.gather(*[client.lookup(req(c), MODEL, TENANT) for c in cached_side])
    t0 = time.perf_counter()
    await asyncio.gather(*[client.store(o, answer(f"answer to {o.prompt}"), MODEL, 0.002) for o in outs])
    put_s = time.perf_counter() - t0
    res["concurrent_put_per_s"] = len(outs) / put_s
    writes = (await actor.stats.remote())["writes"]
    print(f"{len(outs)} concurrent client.store: {put_s * 1000:.0f} ms ({len(outs) / put_s:,.0f}/s)")

    # -- exact hits -------------------------------------------------------------------------------------------
    lat = []
    for i in range(args.queries):
        p = req(cached_side[i % len(cached_side)])
        t0 = time.perf_counter()
        o = await client.lookup(p, MODEL, TENANT)
        lat.append(time.perf_counter() - t0)
        assert o.kind == "exact", o
    res["exact_hit"] = summary(lat[5:])

    # -- semantic lookups, with the verifier (ours) and without it (the cosine rule), interleaved -------------
    # cold embedding: every lookup encodes its prompt (with token embeddings, one forward pass)
    plain = CacheClient(actor, Settings(data_dir=data_dir, cache={"verifier": False}), emb)
    # the same lookups with the transformer's eager forward pass (the embedder before it ran as a trace); same
    # process, so same torch threads; the two give bit-identical embeddings, so the same outcomes
    eager_emb = Embedder(emb.model_path, trace=False)
    eager = CacheClient(actor, settings, eager_emb)
    variants = {"ours": client, "plain": plain, "eager": eager}
    lat: dict[str, list[float]] = {k: [] for k in variants}
    hit_lat: dict[str, list[float]] = {k: [] for k in variants}
    kinds: dict[str, dict[str, int]] = {k: {} for k in variants}
    emb_lat, search_lat = [], []
    queries = [q for q, _, _ in PARAPHRASES]
    for i in range(args.queries):
        q = queries[i % len(queries)]
        names = list(variants) if i % 2 == 0 else list(reversed(variants))  # none always goes first
        for name in names:
            c = variants[name]
            emb._lru.clear()
            eager_emb._lru.clear()
            t0 = time.perf_counter()
            o = await c.lookup(req(q), MODEL, TENANT)
            dt = time.perf_counter() - t0
            lat[name].append(dt)
            if o.kind == "semantic":
                hit_lat[name].append(dt)
            kinds[name][o.kind] = kinds[name].get(o.kind, 0) + 1
            if o.kind == "miss" and o.leader:
                await c.release(o)
        # the parts, for the breakdown
        t1 = time.perf_counter()
        enc = await asyncio.to_thread(emb.encode, [q], tokens=True)
        emb_lat.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        await actor.search.remote(enc.vectors[0], hot_scope, 5, None, 0.70)
        search_lat.append(time.perf_counter() - t1)
    res["semantic_lookup"] = summary(lat["ours"][5:])
    res["semantic_hit"] = summary(hit_lat["ours"][5:])
    res["semantic_lookup_cosine_only"] = summary(lat["plain"][5:])
    res["semantic_hit_cosine_only"] = summary(hit_lat["plain"][5:])
    res["semantic_lookup_eager"] = summary(lat["eager"][5:])
    res["semantic_hit_eager"] = summary(hit_lat["eager"][5:])
    res["semantic_outcomes"] = kinds["ours"]
    res["semantic_outcomes_cosine_only"] = kinds["plain"]
    res["semantic_outcomes_eager"] = kinds["eager"]
    res["traced"] = emb.traced
    res["embed_only"] = summary(emb_lat[5:])
    res["search_only"] = summary(search_lat[5:])

    # -- misses (new questions) -------------------------------------------------------------------------------
    lat = []
    for i in range(min(args.queries, 100)):
        o_t0 = time.perf_counter()
        o = await client.lookup(req(f"Tell me something interesting about the number {i * 7919}"), MODEL, TENANT)
        lat.append(time.perf_counter() - o_t0)
        await client.release(o)
    res["miss"] = summary(lat[5:])

    # -- coalesced single puts under load ---------------------------------------------------------------------
    vecs = rng.standard_normal((args.puts, 384)).astype(np.float32)
    base = n + 10_000
    t0 = time.perf_counter()
    await asyncio.gather(*[actor.put.remote({
        "key": f"{base + i:064x}", "scope_id": hot_scope, "prompt": f"p{i}", "vector": vecs[i],
        "response": "{}", "expires_at": time.time() + 3600}) for i in range(args.puts)])
    dt = time.perf_counter() - t0
    st = await actor.stats.remote()
    res["put_coalesced_per_s"] = args.puts / dt
    res["put_coalesced_writes"] = st["writes"] - writes - 0
    res["disk_bytes"] = await actor.disk_bytes.remote()
    res["disk_bytes_per_entry"] = res["disk_bytes"] / st["entries"]
    res["stats"] = st
    ray.kill(actor, no_restart=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=20_000)
    ap.add_argument("--scopes", type=int, default=100)
    ap.add_argument("--hot-fraction", type=float, default=0.1,
                    help="share of the filler rows in the queried scope (1.0: one big scope)")
    ap.add_argument("--index-min-rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--puts", type=int, default=2_000)
    ap.add_argument("--name", default=None, help="results file name (default cache_latency[_<entries>])")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = asyncio.run(run(args))
    finally:
        ray.shutdown()
    print(f"\nentries {res['entries']:,}  scopes {res['scopes']}  rows in the queried scope "
          f"~{int(res['entries'] * res['hot_fraction']):,}  ANN index: {res['stats']['vector_indexed']}")
    print(f"{'path':28s} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for k in ("exact_hit", "semantic_hit", "semantic_lookup", "semantic_hit_eager", "semantic_hit_cosine_only",
              "semantic_lookup_cosine_only", "embed_only", "search_only", "miss"):
        s = res[k]
        print(f"{k:28s} {s['p50_ms']:8.2f} {s['p90_ms']:8.2f} {s['p99_ms']:8.2f}")
    print(f"semantic outcomes: guard + verifier {res['semantic_outcomes']} (eager forward pass "
          f"{res['semantic_outcomes_eager']}), cosine + guard {res['semantic_outcomes_cosine_only']}; "
          f"traced transformer: {res['traced']}; mirror {res['stats']['memory']}")
    print(f"bulk insert {res['bulk_insert_rows_per_s']:,.0f} rows/s; coalesced put() "
          f"{res['put_coalesced_per_s']:,.0f}/s in {res['put_coalesced_writes']} writes; "
          f"disk {res['disk_bytes'] / 1e6:.1f} MB ({res['disk_bytes_per_entry']:.0f} B/entry)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or ("cache_latency" if args.entries == 20_000 else f"cache_latency_{args.entries}")
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {RESULTS / (name + '.json')}")


if __name__ == "__main__":
    main()
