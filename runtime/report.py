"""The cost report: spend by UTC day and model, totals, what the response cache and prompt caching saved; a
table and a PNG.

``main`` reads the ledger's SQLite file directly and read-only (WAL lets it run beside the live ledger actor),
so ``claude-runtime report --since 7d`` needs no Ray cluster.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from runtime.budget import day_key


def summarize(records: list[dict[str, Any]], since: float, settings: Any = None) -> dict[str, Any]:
    """Aggregate ledger rows (``Record.to_row`` dicts) with ``ts >= since``. With ``settings`` (for the
    prices), ``prompt_cache`` says what prompt caching read, wrote and saved (prompt_cache.savings_summary)."""
    by_day_model: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_model: dict[str, float] = defaultdict(float)
    saved_by_day: dict[str, float] = defaultdict(float)
    tokens = defaultdict(int)
    n = billed = errors = hits = 0
    calls: dict[str, int] = defaultdict(int)   # rows that are calls, not requests, by status
    unreconciled_usd = 0.0
    total = saved = 0.0
    for r in records:
        if r["ts"] < since:
            continue
        status = r.get("status") or "ok"
        if status in ("ok", "error"):
            n += 1
        else:
            # unreconciled (may have been billed, priced at its reservation) and what reconcile made of it
            calls[status] += 1
            if status == "unreconciled":
                unreconciled_usd += r.get("cost_usd") or 0.0
        day = day_key(r["ts"])
        model = r.get("model") or "-"
        cost = r.get("cost_usd") or 0.0
        billed += r.get("message_id") is not None
        errors += r.get("status") == "error"
        hits += r.get("cache") in ("exact", "semantic")
        if cost:
            by_day_model[day][model] += cost
            by_model[model] += cost
            total += cost
        s = r.get("saved_usd") or 0.0
        if s:
            saved_by_day[day] += s
            saved += s
        for k in ("input_tokens", "output_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                  "cache_read_tokens"):
            tokens[k] += int(r.get(k) or 0)
    days = sorted(set(by_day_model) | set(saved_by_day))
    prompt_cache = None
    if settings is not None:
        from runtime.prompt_cache import savings_summary

        prompt_cache = savings_summary((r for r in records if r["ts"] >= since), settings)
    return {
        "prompt_cache": prompt_cache,
        "since": since,
        "days": days,
        "models": sorted(by_model, key=lambda m: -by_model[m]),
        "by_day_model": {d: dict(by_day_model[d]) for d in days},
        "by_model": dict(by_model),
        "by_day": {d: sum(by_day_model[d].values()) for d in days},
        "saved_by_day": {d: saved_by_day.get(d, 0.0) for d in days},
        "total_usd": total,
        "saved_usd": saved,
        "requests": n,
        "billed": billed,
        "errors": errors,
        "cache_hits": hits,
        "error_rate": errors / n if n else 0.0,
        "hit_rate": hits / n if n else 0.0,
        "tokens": dict(tokens),
        "lost_calls": dict(calls),
        "unreconciled_usd": unreconciled_usd,
    }


def _plot(summary: dict[str, Any], png_path: Path) -> None:
    import matplotlib  # the "report" extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days, models = summary["days"], summary["models"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 1 + 0.8 * len(days)), 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    bottom = [0.0] * len(days)
    x = list(range(len(days)))
    for m in models:
        vals = [summary["by_day_model"][d].get(m, 0.0) for d in days]
        ax1.bar(x, vals, bottom=bottom, label=m)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("spend (USD)")
    ax1.set_title(f"Claude spend by UTC day and model: ${summary['total_usd']:.2f} total")
    if models:
        ax1.legend(fontsize="small")
    ax2.bar(x, [summary["saved_by_day"][d] for d in days], color="tab:green")
    ax2.set_ylabel("saved by cache (USD)")
    ax2.set_xticks(x, days, rotation=45, ha="right")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def render(records: list[dict[str, Any]], since: float, png_path: Path | None, console=None,
           settings: Any = None) -> dict[str, Any]:
    """Print the table (rich) and write the PNG; returns the summary."""
    from rich.console import Console
    from rich.table import Table

    s = summarize(records, since, settings)
    console = console or Console()
    table = Table(title=f"Spend since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(since))} UTC")
    table.add_column("day (UTC)")
    for m in s["models"]:
        table.add_column(m, justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("saved by cache", justify="right", style="green")
    for d in s["days"]:
        table.add_row(d, *(f"${s['by_day_model'][d].get(m, 0.0):.4f}" for m in s["models"]),
                      f"${s['by_day'][d]:.4f}", f"${s['saved_by_day'][d]:.4f}")
    table.add_row("total", *(f"${s['by_model'][m]:.4f}" for m in s["models"]), f"${s['total_usd']:.4f}",
                  f"${s['saved_usd']:.4f}", style="bold")
    console.print(table)
    console.print(f"requests {s['requests']}  billed {s['billed']}  cache hits {s['cache_hits']} "
                  f"({s['hit_rate']:.1%})  errors {s['errors']} ({s['error_rate']:.1%})")
    pc = s["prompt_cache"]
    if pc is not None and pc["calls"]:
        console.print(f"prompt cache: {pc['reads']} of {pc['calls']} billed calls read a cached prefix "
                      f"({pc['read_tokens']:,} tokens, ${pc['read_usd']:.4f}), {pc['writes']} wrote one "
                      f"({pc['write_tokens']:,} tokens, ${pc['write_usd']:.4f}); saved ${pc['saved_usd']:.4f} "
                      f"against the same tokens as uncached input (${pc['as_input_usd']:.4f})")
    lost = s["lost_calls"]
    if lost:
        console.print(f"calls whose answer was lost: {lost.get('unreconciled', 0)} unreconciled "
                      f"(${s['unreconciled_usd']:.4f} booked at their reservations; run `claude-runtime reconcile`), "
                      f"{lost.get('reconciled', 0)} reconciled, {lost.get('void', 0)} void, "
                      f"{lost.get('estimated', 0)} estimated")
    if png_path is not None:
        try:
            _plot(s, Path(png_path))
            console.print(f"chart: {png_path}")
        except ImportError:
            console.print("no chart: install the report extra (pip install 'claude-runtime[report]')")
    return s


def read_records(ledger_path: Path, since: float) -> list[dict[str, Any]]:
    """Rows from the ledger file, opened read-only (never creates or changes it)."""
    ledger_path = Path(ledger_path)
    if not ledger_path.is_file():
        raise FileNotFoundError(f"no ledger at {ledger_path}")
    conn = sqlite3.connect(f"file:{ledger_path.resolve()}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM records WHERE ts >= ? ORDER BY ts", (since,))]
    finally:
        conn.close()


def main(ledger_path: Path, since_seconds: float, png_path: Path, settings: Any = None) -> dict[str, Any]:
    since = time.time() - since_seconds
    return render(read_records(ledger_path, since), since, png_path, settings=settings)
