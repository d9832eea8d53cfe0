"""How much of a small budget gets used under concurrency, when a full budget queues vs refuses early?

Issue 16's scenario: a $0.10 daily budget, 200 normal-priority Sonnet requests (~1,000-token prompts,
``max_tokens`` 200, one user each), run with 1, 16, 64 and 200 requests in flight, against the embedded API
answering in ``--latency-ms``. Two modes side by side in one run, each cell on a fresh runtime (fresh ledger,
fresh billing log): **queue** (the default: a request whose worst case fits beside the settled spend waits for
in-flight reservations to settle) and **refuse early** (``budgets.max_queued=0``: refused as soon as in-flight
reservations fill the budget, the behaviour before the queue). Judged by the API's billing log: budget used,
overshoot, answers (Sonnet / downgraded to Haiku), refusals, and refusals that could have fit (the request's own
worst case fitted beside the final bill).

    .venv/bin/python benchmarks/budget_fill.py                  # ~4 min on 2 cores
    .venv/bin/python benchmarks/budget_fill.py --levels 1 200 --n 100

Writes benchmarks/results/budget_fill.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import runtime  # noqa: E402
from benchmarks.common import machine, pct, write_json  # noqa: E402
from runtime.errors import BudgetExceeded, ClaudeRuntimeError  # noqa: E402
from runtime.fake_api.billing import read_billing  # noqa: E402
from runtime.result import Result  # noqa: E402
from tests.runtime_fixtures import fake_post, fast_settings, user_msg  # noqa: E402

SONNET = "claude-sonnet-5-5"
_WORDS = ("the river runs past old mills and quiet farms while boats carry grain toward the harbour where "
          "traders wait for news of rain from the hills beyond the valley").split()
MODES = {"queue": {}, "refuse early": {"max_queued": 0}}


def prompt(i: int, words: int = 650) -> str:
    rng = random.Random(i)
    return f"Request {i}. Summarise this passage in a few sentences: " + " ".join(
        rng.choice(_WORDS) for _ in range(words))


def run_cell(data: Path, mode: str, in_flight: int, n: int, limit: float, latency_ms: float, bar) -> dict:
    settings = fast_settings(data, budgets={"daily_usd": limit, **MODES[mode]}, cache={"enabled": False})
    rt = runtime.start(settings)
    try:
        fake_post(rt, "/_fake/config", {"latency_ms": latency_ms})
        t0 = time.perf_counter()
        pending: dict = {}
        out: list = []
        nxt = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < in_flight:
                ref = rt.submit(user_msg(prompt(nxt), 200, model=SONNET), user_id=f"u{nxt}")
                pending[ref] = time.perf_counter()
                nxt += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                started = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    value = exc.cause if exc.cause is not None else exc
                except ClaudeRuntimeError as exc:
                    value = exc
                out.append((value, time.perf_counter() - started))
                bar.update(1)
        wall = time.perf_counter() - t0
        stats = rt.stats()
    finally:
        rt.shutdown()
    bill = read_billing(settings.billing_path) if settings.billing_path.exists() else []
    billed = sum(b["cost_usd"] for b in bill)
    answers = [v for v, _ in out if isinstance(v, Result)]
    refused = [v for v, _ in out if isinstance(v, BudgetExceeded)]
    other = [v for v, _ in out if not isinstance(v, (Result, BudgetExceeded))]
    models = Counter(r.model for r in answers)
    return {
        "mode": mode, "in_flight": in_flight, "requests": n, "limit_usd": limit,
        "billed_usd": round(billed, 6), "used": round(billed / limit, 4),
        "overshoot_usd": round(max(0.0, billed - limit), 6),
        "answered": len(answers), "sonnet": models.get(SONNET, 0),
        "haiku": sum(v for m, v in models.items() if m != SONNET),
        "refused": len(refused), "refused_by_reason": dict(Counter(e.reason for e in refused)),
        # a refusal that could have fitted: its worst case fitted beside the whole final bill
        "refused_could_fit": sum(1 for e in refused if billed + e.amount_usd <= limit + 1e-12),
        "other_errors": [type(e).__name__ for e in other],
        "billing_lines": len(bill), "wall_s": round(wall, 2),
        "p50_s": round(pct([t for v, t in out if isinstance(v, Result)], 50), 3),
        "p99_s": round(pct([t for v, t in out if isinstance(v, Result)], 99), 3),
        "waited": stats["ledger"].get("budget_queue", {}).get("waited", 0),
        "learned_ratio": stats["budgets"]["ratio_all"]["cost_ratio"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64, 200])
    ap.add_argument("--limit", type=float, default=0.10)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="budget-fill-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cells = []
    bar = tqdm(total=args.n * len(args.levels) * len(MODES), unit="req", desc="budget fill")
    try:
        for level in args.levels:
            for mode in MODES:  # the two modes back to back at each level: same machine load
                cells.append(run_cell(root / f"{mode.replace(' ', '-')}-{level}", mode, level, args.n, args.limit,
                                      args.latency_ms, bar))
    finally:
        bar.close()
        ray.shutdown()
    print()
    print(f"${args.limit:.2f} daily budget, {args.n} Sonnet requests (~1,000-token prompts, max_tokens 200), "
          f"API latency {args.latency_ms:.0f} ms; billed = the API's billing log")
    print("| in flight | mode | budget used | overshoot | answered (Sonnet / Haiku) | refused | refused that "
          "could have fit | waits | wall s | p50 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['in_flight']} | {c['mode']} | {c['used']:.1%} (${c['billed_usd']:.4f}) | "
              f"${c['overshoot_usd']:.4f} | {c['answered']} ({c['sonnet']} / {c['haiku']}) | {c['refused']} "
              f"{c['refused_by_reason'] or ''} | {c['refused_could_fit']} | {c['waited']} | {c['wall_s']} | "
              f"{c['p50_s']} |")
    path = write_json("budget_fill", {"n": args.n, "limit_usd": args.limit, "latency_ms": args.latency_ms,
                                      "levels": args.levels, "cells": cells, "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
