"""`make demo`: a short mixed load through the whole runtime against the embedded local API and a local Ray."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

TOPICS = ["photosynthesis", "the TCP handshake", "binary search", "the French revolution", "vaccines",
          "compound interest", "black holes", "the Rust borrow checker", "plate tectonics", "inflation"]


def workload(n: int) -> list[tuple[dict, dict]]:
    """(request, submit kwargs) pairs: simple and complex prompts, repeats (exact hits), paraphrases (semantic
    hits), a real-time prompt (bypass), over three tenants and ten users."""
    out: list[tuple[dict, dict]] = []
    for i in range(n):
        # six kinds of prompt per topic; a topic belongs to one tenant, so its repeats can hit its cache
        t = (i // 6) % len(TOPICS)
        topic = TOPICS[t]
        tenant = ["acme", "globex", "initech"][t % 3]
        user = f"user-{t}"
        kind = i % 6
        if kind == 0:
            text, max_tokens = f"Explain {topic} in one paragraph.", 256
        elif kind == 1:
            text, max_tokens = f"Explain {topic} in one paragraph.", 256          # exact repeat
        elif kind == 2:
            text, max_tokens = f"Could you explain {topic} in one paragraph?", 256   # paraphrase
        elif kind == 3:
            text, max_tokens = f"Classify the sentiment of this review of {topic}: 'great'.", 64
        elif kind == 4:
            text = (f"Analyze the design trade-offs of {topic} step by step and propose an architecture "
                    f"for teaching it.")
            max_tokens = 1024
        else:
            text, max_tokens = f"What is the latest news about {topic} today?", 128
        out.append(({"model": "auto", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]},
                    {"user_id": user, "tenant": tenant}))
    return out


# a support assistant's instructions, ~5,000 tokens: the kind of long shared system prompt that prompt caching
# turns from full price on every call into one write and then reads at a tenth of the price
SUPPORT_PROMPT = "\n".join(
    f"Rule {i}: when a customer asks about {TOPICS[i % len(TOPICS)]}, answer briefly, cite the policy section "
    f"{i}, never promise refunds beyond thirty days, and escalate billing disputes to a human agent."
    for i in range(95))


def shared_prompt_workload(n: int) -> list[tuple[dict, dict]]:
    """Unique customer questions under one long system prompt, sent without any cache_control: the runtime
    places it. The response cache is bypassed so every one is a billed call."""
    return [({"model": "claude-sonnet-5-5", "max_tokens": 64, "system": SUPPORT_PROMPT,
              "messages": [{"role": "user", "content": f"Customer {i} asks: my order #{1000 + i} about "
                                                       f"{TOPICS[i % len(TOPICS)]} is late, what now?"}]},
             {"user_id": f"support-{i % 4}", "tenant": "acme", "cache": False})
            for i in range(n)]


def main(n_requests: int = 120, data_dir: str | None = None) -> dict:
    import ray

    import runtime
    from runtime.settings import ClassLimits, Settings, UserLimits

    console = Console()
    data = Path(data_dir or tempfile.mkdtemp(prefix="claude_runtime_demo_"))
    limits = {c: ClassLimits(rpm=600, itpm=200_000, otpm=60_000) for c in ("haiku", "sonnet", "opus", "fable")}
    # the demo opts in to the embedded local API unless a real upstream is configured
    settings = Settings(data_dir=data, limits=limits, user_limits=UserLimits(rpm=120, tpm=100_000),
                        fake_api=not Settings().configured_upstreams(),
                        # a demo's ledger is throwaway when it lives in a temp folder
                        ledger={"allow_temporary_path": data_dir is None})
    backend = "the embedded local API" if settings.uses_fake_api else f"{settings.base_url or 'api.anthropic.com'}"
    console.print(f"[bold]claude-runtime demo[/]: {n_requests} requests against {backend}; data in {data}")
    ray.init(address="local", num_cpus=int(os.environ.get("DEMO_NUM_CPUS", "2")), include_dashboard=False,
             log_to_driver=False)
    try:
        t0 = time.perf_counter()
        rt = runtime.start(settings)
        console.print(f"runtime started in {time.perf_counter() - t0:.1f} s "
                      f"({settings.callers.num_callers} callers)")
        work = workload(n_requests)
        # one bad request on purpose: it fails locally with a typed error and costs nothing
        work.append(({"model": "auto", "max_tokens": 64, "temperature": 0.2,
                      "messages": [{"role": "user", "content": "hi"}]}, {"user_id": "user-0", "tenant": "acme"}))
        t1 = time.perf_counter()
        # originals first, then their repeats and paraphrases, so those find the first answers cached
        second = {1, 2}
        phases = [[(w, i) for i, w in enumerate(work) if i % 6 not in second or i >= n_requests],
                  [(w, i) for i, w in enumerate(work) if i % 6 in second and i < n_requests]]
        results = []
        for phase in phases:
            refs = []
            for (req, kw), _ in phase:
                try:
                    refs.append(rt.submit(req, **kw))
                except Exception as exc:  # noqa: BLE001 - shown in the table
                    refs.append(exc)
            for ((req, kw), _), ref in zip(phase, refs):
                results.append((req, kw, rt._get_value(ref)))
        # the shared-system-prompt workload, all at once: one request writes the prefix, the rest read it
        shared = shared_prompt_workload(max(10, n_requests // 3))
        refs = [rt.submit(req, **kw) for req, kw in shared]
        results += [(req, kw, rt._get_value(ref)) for (req, kw), ref in zip(shared, refs)]
        wall = time.perf_counter() - t1
        summary = _summarize(console, rt, results, wall)
        rt.shutdown()
        return summary
    finally:
        ray.shutdown()


def _summarize(console: Console, rt, results, wall: float) -> dict:

    from runtime.result import Result

    ok = [r for _, _, r in results if isinstance(r, Result)]
    errors = Counter(type(r).__name__ for _, _, r in results if not isinstance(r, Result))
    by_model = Counter(r.model for r in ok if r.cache in ("miss", "bypass"))
    by_cache = Counter(r.cache for r in ok)
    lat = sorted(r.latency_s * 1000 for r in ok if r.cache in ("miss", "bypass"))
    hit_lat = sorted(r.latency_s * 1000 for r in ok if r.cache in ("exact", "semantic"))
    stats = rt.stats()
    fake = stats.get("fake_api", {})
    server_429 = fake.get("by_status", {}).get("429", 0)
    cost = sum(r.cost_usd for r in ok)
    saved = sum(r.saved_usd for r in ok)

    t = Table(title="claude-runtime demo")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("requests", str(len(results)))
    t.add_row("succeeded", str(len(ok)))
    t.add_row("typed errors", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0")
    for model, n in sorted(by_model.items()):
        t.add_row(f"  API calls to {model}", str(n))
    for kind in ("miss", "exact", "semantic", "bypass"):
        t.add_row(f"  cache {kind}", str(by_cache.get(kind, 0)))
    t.add_row("cost (USD)", f"{cost:.6f}")
    t.add_row("saved by cache (USD)", f"{saved:.6f}")
    pc = rt.prompt_cache_savings()
    t.add_row("prompt cache: calls that read / wrote", f"{pc['reads']} / {pc['writes']} of {pc['calls']}")
    t.add_row("saved by prompt caching (USD)", f"{pc['saved_usd']:.6f}")
    ledger_total = sum(rt.spend(by="model").values())
    t.add_row("ledger total (USD)", f"{ledger_total:.6f}")
    if lat:
        t.add_row("API-path latency p50 / p99 (ms)",
                  f"{statistics.median(lat):.1f} / {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.1f}")
    if hit_lat:
        t.add_row("cache-hit latency p50 (ms)", f"{statistics.median(hit_lat):.1f}")
    t.add_row("server-side 429s", str(server_429))
    t.add_row("wall time (s)", f"{wall:.1f}")
    console.print(t)
    return {"requests": len(results), "ok": len(ok), "errors": dict(errors), "by_cache": dict(by_cache),
            "by_model": dict(by_model), "cost_usd": cost, "saved_usd": saved, "ledger_usd": ledger_total,
            "server_429": server_429, "prompt_cache": {k: v for k, v in pc.items() if k != "by_model"}}
