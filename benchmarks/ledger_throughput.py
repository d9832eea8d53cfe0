"""How many durable ledger commits per second? (target: >= 2,000 records/s)

Each commit returns only after its record is fsynced (SQLite WAL, synchronous=FULL); concurrent commits share
a transaction (group commit). Measured: one ``commit`` call per record from 1, 16 and 64 concurrent
committers (asyncio coroutines in the driver awaiting the actor), ``commit_many`` batches of 100, and the bare
store (no Ray) with one transaction per record versus per batch, which bounds what the actor can reach, and
``LedgerClient`` (the caller-side group commit: concurrent commits in one process share a commit_many call).

    .venv/bin/python benchmarks/ledger_throughput.py           # ~40 s
    .venv/bin/python benchmarks/ledger_throughput.py --full    # longer runs per point
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from actors.ledger import LedgerClient, LedgerActor, LedgerStore, NAMESPACE  # noqa: E402
from runtime.pricing import CostBreakdown  # noqa: E402
from runtime.records import Record  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from runtime.usage import Usage  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def record(i: int, tag: str) -> Record:
    return Record(request_id=f"{tag}-{i}", attempt=1, message_id=f"msg-{tag}-{i}", ts=time.time(),
                  user_id=f"u{i % 50}", tenant=f"t{i % 5}", priority="normal", model="claude-sonnet-5-5",
                  usage=Usage(input_tokens=1200, output_tokens=300),
                  cost=CostBreakdown(0.0024, 0.003, 0, 0, 0.0054), latency_s=0.8)


async def run_committers(h, n_committers: int, seconds: float, tag: str, batcher: bool = False) -> dict:
    done = 0
    commit = LedgerClient(h).commit if batcher else (lambda r: h.commit.remote(r))
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            assert await commit(record(next(counter), tag))
            done += 1

    dt, flushes = await _timed(h, n_committers, one)
    return _row("LedgerClient" if batcher else "commit", n_committers, done, dt, flushes)


async def run_batches(h, n_committers: int, batch: int, seconds: float, tag: str) -> dict:
    done = 0
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await h.commit_many.remote([record(next(counter), tag) for _ in range(batch)])
            done += batch

    dt, flushes = await _timed(h, n_committers, one)
    return _row(f"commit_many({batch})", n_committers, done, dt, flushes)


async def _timed(h, n_committers: int, one) -> tuple[float, int]:
    """Run ``n_committers`` copies of ``one`` at once: (seconds, fsyncs the ledger made meanwhile)."""
    before = await h.stats.remote()
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n_committers)))
    dt = time.perf_counter() - t0
    after = await h.stats.remote()
    return dt, after["flushes"] - before["flushes"]


def _row(mode: str, n_committers: int, done: int, dt: float, flushes: int) -> dict:
    return {"mode": mode, "committers": n_committers, "records": done, "seconds": dt,
            "records_per_s": done / dt, "fsyncs": flushes, "records_per_fsync": done / max(1, flushes)}


def bare_store(path: Path, per_txn: int, seconds: float, tag: str) -> dict:
    store = LedgerStore(path)
    done = txns = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        recs = [record(done + k, tag) for k in range(per_txn)]
        store.write([("record", (r, r.to_row())) for r in recs])
        done += per_txn
        txns += 1
    dt = time.perf_counter() - t0
    store.close()
    return {"mode": f"bare SQLite, {per_txn}/txn", "committers": 1, "records": done, "seconds": dt,
            "records_per_s": done / dt, "fsyncs": txns, "records_per_fsync": per_txn}


async def main_async(args) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    rows: list[dict] = []
    secs = args.seconds
    rows.append(bare_store(tmp / "bare1.sqlite3", 1, secs, "b1"))
    rows.append(bare_store(tmp / "bare64.sqlite3", 64, secs, "b64"))
    h = LedgerActor.options(name="ledger-bench", namespace=NAMESPACE).remote(Settings(data_dir=tmp))
    await h.ping.remote()
    for n in (1, 16, 64):
        await run_committers(h, n, 0.5, f"warm{n}")  # first calls on a fresh worker are slower
        rows.append(await run_committers(h, n, secs, f"c{n}"))
    for n in (16, 64):
        rows.append(await run_committers(h, n, secs, f"cb{n}", batcher=True))
    rows.append(await run_batches(h, 4, 100, secs, "batch"))
    st = await h.stats.remote()
    assert st["rows"] == st["billed"]  # nothing lost or doubled
    ray.kill(h)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="10 s per point instead of 3 s")
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()
    args.seconds = args.seconds or (10.0 if args.full else 3.0)
    ray.init(address="local", num_cpus=2, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        rows = asyncio.run(main_async(args))
    finally:
        ray.shutdown()

    from rich.console import Console
    from rich.table import Table

    t = Table(title="Durable ledger commits (SQLite WAL, synchronous=FULL)")
    for c in ("mode", "committers", "records", "records/s", "fsyncs", "records/fsync"):
        t.add_column(c, justify="right" if c != "mode" else "left")
    for r in rows:
        t.add_row(r["mode"], str(r["committers"]), str(r["records"]), f"{r['records_per_s']:,.0f}",
                  str(r["fsyncs"]), f"{r['records_per_fsync']:.1f}")
    Console().print(t)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "ledger_throughput", "target_records_per_s": 2000, "seconds_per_point": args.seconds,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
           "rows": rows}
    (RESULTS / "ledger_throughput.json").write_text(json.dumps(out, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['mode']}\nx{r['committers']}" for r in rows]
    ax.bar(range(len(rows)), [r["records_per_s"] for r in rows], color="tab:blue")
    ax.axhline(2000, color="tab:red", linestyle="--", label="target 2,000/s")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("durable records / s")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "ledger_throughput.png", dpi=100)
    print(f"wrote {RESULTS / 'ledger_throughput.json'}")


if __name__ == "__main__":
    main()
