"""Is the local fake API ever the bottleneck? Requests/s and latency it serves from one client process.

The server runs in its own process (``runtime.fake_api.serve``, uvloop), unlimited buckets, writing its billing
log to a temp file (as the embedded server always does); one client process
drives it with aiohttp at a fixed concurrency, non-streaming and then streaming. Target: >= 1,500 non-streaming
requests/s on a 2-core machine (client and server share those cores).

    .venv/bin/python benchmarks/fake_api.py            # ~10 s + ~5 s
    .venv/bin/python benchmarks/fake_api.py --full     # 30 s each
Writes benchmarks/results/fake_api.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "claude-haiku-5-5"

_SERVER = """
from runtime.fake_api import FakeApiConfig, serve
serve(FakeApiConfig(limits=None, billing_path={billing!r}), host="127.0.0.1", port=0)
"""


def start_server(billing: str | None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _SERVER.format(billing=billing)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"(http://\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, m.group(1)


async def load(url: str, seconds: float, concurrency: int, stream: bool) -> dict:
    bodies = [orjson.dumps({"model": MODEL, "max_tokens": 256, "stream": stream,
                            "messages": [{"role": "user", "content": f"Question {i}: how do token buckets "
                                                                     f"refill, and why per minute?"}]})
              for i in range(100)]
    headers = {"x-api-key": "bench", "anthropic-version": "2026-10-21", "content-type": "application/json"}
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, headers=headers) as session:
        # warm the connections so the first handshake is not in the numbers
        async with session.post(f"{url}/v1/messages", data=bodies[0]) as r:
            await r.read()
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while True:
                s = time.perf_counter()
                if s >= deadline:
                    return
                async with session.post(f"{url}/v1/messages", data=bodies[i % 100]) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - s)
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    n = len(lat)
    return {"mode": "stream" if stream else "json", "requests": n, "errors": errors, "seconds": round(elapsed, 2),
            "req_per_s": round(n / elapsed, 1), "p50_ms": round(lat[n // 2] * 1000, 2),
            "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 2), "concurrency": concurrency}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="30 s per mode instead of 10 s / 5 s")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--no-billing", action="store_true",
                    help="skip the billing log (on by default: the embedded server always writes one)")
    args = ap.parse_args()
    secs = args.seconds or (30.0 if args.full else 10.0)
    billing = None
    if not args.no_billing:
        import tempfile
        billing = os.path.join(tempfile.mkdtemp(), "billing.jsonl")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    proc, url = start_server(billing)
    try:
        rows = [asyncio.run(load(url, secs, args.concurrency, stream=False)),
                asyncio.run(load(url, secs if args.full else max(2.0, secs / 2), args.concurrency, stream=True))]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"{'mode':8} {'conc':>5} {'requests':>9} {'errors':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['mode']:8} {r['concurrency']:>5} {r['requests']:>9} {r['errors']:>7} {r['req_per_s']:>9} "
              f"{r['p50_ms']:>8} {r['p99_ms']:>8}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "fake_api", "cpus": os.cpu_count(), "billing_log": bool(billing), "rows": rows,
           "target_req_per_s": 1500, "meets_target": rows[0]["req_per_s"] >= 1500}
    (RESULTS / "fake_api.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'fake_api.json'}")


if __name__ == "__main__":
    main()
