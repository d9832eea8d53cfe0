"""What the HTTP front door adds: latency over in-process ``rt.submit``, requests/s, and streaming
time-to-first-token, side by side with the same API called directly.

    python benchmarks/frontdoor.py [--n 300] [--throughput-n 2000] [--concurrency 64] [--direct-ingress]

The fake API runs in its own process with no limits; the runtime calls it as its upstream (cache bypassed, so
every request takes the whole miss path: validation, routing, ledger reservation and record, limiter grant).
Three ways in, measured alternately so they share the machine's noise:

    direct      the anthropic SDK straight to the fake API (no runtime: the floor)
    in-process  rt.submit / rt.stream from the driver (the runtime, no HTTP)
    front door  the anthropic SDK to `claude-runtime serve` (Ray Serve -> runtime), with a key
    serve echo  the anthropic SDK to a Ray Serve deployment that answers a fixed message at once: what Serve
                alone costs on this machine (its proxy and replica hops), the floor under any front door on it

Targets (issue 11): front door p50 <= 5 ms over in-process submit, >= 500 requests/s.
``--direct-ingress`` sets RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (Serve's replicas take HTTP themselves, no proxy
hop) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FakeApiProcess, free_port, pct, write_json  # noqa: E402

HAIKU = "claude-haiku-5-5"


def _req(i: int, tag: str, max_tokens: int = 32) -> dict:
    return {"model": HAIKU, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"{tag} front door probe number {i}"}]}


_CANNED = {"id": "msg_echo", "type": "message", "role": "assistant", "model": HAIKU,
           "content": [{"type": "text", "text": "echo"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 5, "output_tokens": 1}}


class Echo:
    """A Serve deployment doing no work: reads the body, answers a fixed message."""

    async def __call__(self, request):
        import orjson
        from starlette.responses import Response

        await request.body()
        return Response(orjson.dumps(_CANNED), media_type="application/json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="sequential calls per path")
    ap.add_argument("--stream-n", type=int, default=100, help="streamed calls per path")
    ap.add_argument("--throughput-n", type=int, default=2000, help="requests per path in the throughput run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--direct-ingress", action="store_true")
    args = ap.parse_args()
    if args.direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"

    import anthropic
    import httpx2
    import ray
    from ray import serve
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    import runtime
    from actors.serve import run_front_door
    from runtime.keys import KeyStore
    from runtime.settings import ClassLimits, Settings, UserLimits

    console = Console()
    big = ClassLimits(rpm=10**7, itpm=10**10, otpm=10**10)
    load = os.getloadavg()
    with FakeApiProcess("--rpm", str(10**7), "--itpm", str(10**10), "--otpm", str(10**10),
                        "--output-tokens-per-s", "2000") as fake:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            data_dir = f"/tmp/frontdoor_bench_{fake.port}"
            rt = runtime.start(Settings(base_url=fake.url, api_key="bench-key",
                                        limits={c: big for c in ("haiku", "sonnet", "opus", "fable")},
                                        user_limits=UserLimits(rpm=0, tpm=0), cache={"enabled": False},
                                        callers={"num_callers": 2}, data_dir=data_dir,
                                        ledger={"allow_temporary_path": True}))  # a throwaway run under /tmp
            key, _ = KeyStore.in_dir(rt.settings.data_dir).create("bench", "bench")
            url = run_front_door(port=free_port(), replicas=args.replicas)
            serve.run(serve.deployment(Echo, name="Echo").options(
                max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0},
                logging_config={"enable_access_log": False, "log_level": "WARNING"}).bind(),
                name="echo", route_prefix="/echo")
            echo = anthropic.Anthropic(base_url=url + "/echo", api_key=key, max_retries=0)
            direct = anthropic.Anthropic(base_url=fake.url, api_key="bench-key", max_retries=0)
            door = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0,
                                       default_headers={"x-claude-runtime-cache": "off"})

            for i in range(30):  # warm connections, callers, the replica
                direct.messages.create(**_req(i, "warm"))
                ray.get(rt.submit(_req(i, "warm"), cache=False))
                door.messages.create(**_req(i, "warm-door"))
                echo.messages.create(**_req(i, "warm-echo"))

            # -- sequential latency ----------------------------------------------------------------------------
            lat = {"direct": [], "in-process": [], "front door": [], "serve echo": []}
            for i in tqdm(range(args.n), desc="sequential", unit="round"):
                t0 = time.perf_counter()
                direct.messages.create(**_req(i, "direct"))
                lat["direct"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ray.get(rt.submit(_req(i, "inproc"), cache=False))
                lat["in-process"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                door.messages.create(**_req(i, "door"))
                lat["front door"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                echo.messages.create(**_req(i, "echo"))
                lat["serve echo"].append(time.perf_counter() - t0)

            # -- streaming: time to the first text delta -------------------------------------------------------
            ttft = {"direct": [], "in-process": [], "front door": []}
            for i in tqdm(range(args.stream_n), desc="streaming", unit="round"):
                for name in ttft:
                    t0 = time.perf_counter()
                    if name == "in-process":
                        for ev in rt.stream(_req(i, "s-inproc", 64), cache=False):
                            if ev["type"] == "content_block_delta" and len(ttft[name]) <= i:
                                ttft[name].append(time.perf_counter() - t0)
                    else:
                        client = direct if name == "direct" else door
                        with client.messages.stream(**_req(i, f"s-{name[:4]}", 64)) as s:
                            for ev in s:
                                if ev.type == "content_block_delta" and len(ttft[name]) <= i:
                                    ttft[name].append(time.perf_counter() - t0)

            # -- throughput ------------------------------------------------------------------------------------
            async def hammer(base: str, headers: dict, tag: str) -> float:
                headers = {"anthropic-version": "2023-06-01", "content-type": "application/json", **headers}
                limits = httpx2.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
                async with httpx2.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=120) as c:
                    sem = asyncio.Semaphore(args.concurrency)
                    bad = 0

                    async def one(i: int) -> None:
                        nonlocal bad
                        async with sem:
                            r = await c.post("/v1/messages", json=_req(i, tag))
                            bad += r.status_code != 200

                    t0 = time.perf_counter()
                    await asyncio.gather(*(one(i) for i in range(args.throughput_n)))
                    dt = time.perf_counter() - t0
                    if bad:
                        console.print(f"[red]{bad} failed requests on {tag}[/red]")
                    return args.throughput_n / dt

            async def inproc_rate() -> float:
                t0 = time.perf_counter()
                n = 0
                async for _ in rt.amap((_req(i, "tp-inproc") for i in range(args.throughput_n)),
                                       max_in_flight=args.concurrency, cache=False):
                    n += 1
                return n / (time.perf_counter() - t0)

            console.print("throughput runs ...")
            rps = {"direct": asyncio.run(hammer(fake.url, {"x-api-key": "bench-key"}, "tp-direct")),
                   "in-process": asyncio.run(inproc_rate()),
                   "front door": asyncio.run(hammer(url, {"x-api-key": key, "x-claude-runtime-cache": "off"},
                                                    "tp-door")),
                   "serve echo": asyncio.run(hammer(url + "/echo", {"x-api-key": key}, "tp-echo"))}
            serve.shutdown()
            rt.shutdown()
        finally:
            ray.shutdown()

    def ms(v: list[float], q: float) -> float:
        return pct(v, q) * 1000

    rows = {}
    for name in lat:
        rows[name] = {"p50_ms": ms(lat[name], 50), "p99_ms": ms(lat[name], 99),
                      "mean_ms": statistics.mean(lat[name]) * 1000,
                      "ttft_p50_ms": ms(ttft[name], 50) if name in ttft else None,
                      "ttft_p99_ms": ms(ttft[name], 99) if name in ttft else None, "requests_per_s": rps[name]}
    added = {"front_door_over_in_process_p50_ms": rows["front door"]["p50_ms"] - rows["in-process"]["p50_ms"],
             "front_door_over_in_process_p99_ms": rows["front door"]["p99_ms"] - rows["in-process"]["p99_ms"],
             "front_door_ttft_over_in_process_p50_ms":
                 rows["front door"]["ttft_p50_ms"] - rows["in-process"]["ttft_p50_ms"],
             "front_door_ttft_over_direct_p50_ms": rows["front door"]["ttft_p50_ms"] - rows["direct"]["ttft_p50_ms"],
             "serve_alone_p50_ms": rows["serve echo"]["p50_ms"],
             "front_door_own_work_p50_ms": rows["front door"]["p50_ms"] - rows["in-process"]["p50_ms"]
             - rows["serve echo"]["p50_ms"]}
    t = Table(title=f"front door vs in-process vs direct ({args.n} sequential, {args.stream_n} streamed, "
                    f"{args.throughput_n} at concurrency {args.concurrency}; load avg {load[0]:.1f})")
    for col in ("path", "p50 ms", "p99 ms", "TTFT p50 ms", "TTFT p99 ms", "req/s"):
        t.add_column(col, justify="right")
    for name, r in rows.items():
        ttft_cells = ((f"{r['ttft_p50_ms']:.2f}", f"{r['ttft_p99_ms']:.2f}") if r["ttft_p50_ms"] is not None
                      else ("-", "-"))
        t.add_row(name, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", *ttft_cells, f"{r['requests_per_s']:.0f}")
    console.print(t)
    console.print(f"front door adds p50 {added['front_door_over_in_process_p50_ms']:.2f} ms (target <= 5), "
                  f"TTFT p50 {added['front_door_ttft_over_in_process_p50_ms']:.2f} ms over in-process; "
                  f"{rows['front door']['requests_per_s']:.0f} req/s (target >= 500); Serve alone (echo) p50 "
                  f"{added['serve_alone_p50_ms']:.2f} ms, {rows['serve echo']['requests_per_s']:.0f} req/s")
    path = write_json("frontdoor" + ("_direct_ingress" if args.direct_ingress else ""),
                      {"n": args.n, "stream_n": args.stream_n, "throughput_n": args.throughput_n,
                       "concurrency": args.concurrency, "replicas": args.replicas,
                       "direct_ingress": args.direct_ingress, "load_avg_at_start": load, "rows": rows,
                       "added": added})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
