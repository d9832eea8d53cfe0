"""Generation speed and in-flight requests: answers take N / rate seconds, streams spread their deltas over
that time, /_fake/stats shows what is being processed, and a client that leaves is billed all the same."""

from __future__ import annotations

import threading
import time

import anthropic
import httpx2
import pytest

from runtime.fake_api import read_billing
from tests.fake_api_fixtures import HAIKU, KEY, async_client, client, start_server, user, wait_until

ROUTE = "/v1/messages"


def _in_flight(s) -> dict:
    return s.stats()["in_flight"]


def test_in_flight_counts_a_request_until_it_is_answered(tmp_path):
    # 60 tokens at 60/s: the answer takes 1 s, a wide window to see it in flight
    with start_server(tmp_path, output_tokens=60, output_tokens_per_s=60.0) as s:
        assert _in_flight(s) == {"total": 0, "by_route": {}}
        out: list = []
        t = threading.Thread(target=lambda: out.append(
            client(s).messages.create(model=HAIKU, max_tokens=100, messages=user("x"))))
        t0 = time.monotonic()
        t.start()
        seen = wait_until(lambda: (st := s.stats())["in_flight"]["total"] == 1 and st, what="a request in flight")
        # one snapshot: in flight, so not answered and not billed yet
        assert seen["in_flight"]["by_route"] == {ROUTE: 1} and seen["billed"] == 0
        t.join(10)
        assert time.monotonic() - t0 >= 1.0 and out[0].usage.output_tokens == 60
        assert _in_flight(s) == {"total": 0, "by_route": {}} and s.stats()["billed"] == 1
        # a reset clears counters, not the requests still running
        s.reset()
        assert _in_flight(s)["total"] == 0


async def test_a_stream_spreads_its_deltas_over_the_generation_time(tmp_path):
    n, rate = 120, 300.0  # 0.4 s of generation
    with start_server(tmp_path, output_tokens=n, output_tokens_per_s=rate) as s:
        async with async_client(s) as ac:
            t0 = time.monotonic()
            deltas: list[tuple[float, str]] = []
            async with ac.messages.stream(model=HAIKU, max_tokens=200, messages=user("long answer")) as st:
                async for ev in st:
                    if ev.type == "content_block_delta":
                        deltas.append((time.monotonic() - t0, ev.delta.text))
                    if ev.type == "message_start":
                        assert _in_flight(s)["by_route"] == {ROUTE: 1}
                final = await st.get_final_message()
        assert final.usage.output_tokens == n
        total = n / rate
        chars = sum(len(t) for _, t in deltas)
        done = 0
        for arrived, text in deltas:
            # no delta arrives before its share (by characters) of the generation time has passed
            done += len(text)
            assert arrived >= total * done / chars * 0.99
        # and they come at many moments, not in one burst
        moments = sum(1 for (a, _), (b, _) in zip(deltas, deltas[1:]) if b - a > 0.01)
        assert len(deltas) >= 10 and moments >= 3
        assert _in_flight(s)["total"] == 0


def test_a_client_that_leaves_mid_stream_is_billed_in_full(tmp_path):
    n, rate = 100, 125.0  # 0.8 s
    with start_server(tmp_path, output_tokens=n, output_tokens_per_s=rate) as s:
        t0 = time.time()
        with httpx2.stream("POST", f"{s.url}/v1/messages",
                           headers={"x-api-key": KEY, "anthropic-version": "2026-10-21"},
                           json={"model": HAIKU, "max_tokens": 200, "stream": True, "messages": user("bye")}) as r:
            got = b""
            for chunk in r.iter_bytes():
                got += chunk
                if b"content_block_delta" in got:
                    break  # the first delta: leave, closing the connection
        assert b"message_stop" not in got  # left mid-stream
        wait_until(lambda: s.stats()["billed"] == 1, what="the abandoned stream's bill")
        # the server kept generating until the answer was complete, then billed all of it
        (line,) = read_billing(tmp_path / "billing.jsonl")
        assert line["output_tokens"] == n and line["ts"] >= t0 + n / rate
        wait_until(lambda: _in_flight(s)["total"] == 0, what="the handler to finish")


def test_a_client_that_times_out_is_billed_when_the_answer_is_done(tmp_path):
    with start_server(tmp_path, output_tokens=50, output_tokens_per_s=100.0) as s:  # 0.5 s
        c = client(s, timeout=0.1)
        t0 = time.time()
        with pytest.raises(anthropic.APITimeoutError):
            c.messages.create(model=HAIKU, max_tokens=100, messages=user("slow"))
        wait_until(lambda: s.stats()["billed"] == 1, what="the timed-out request's bill")
        (line,) = read_billing(tmp_path / "billing.jsonl")
        # billed once the answer was complete, long after the client gave up
        assert line["output_tokens"] == 50 and line["ts"] >= t0 + 0.5


def test_generation_speed_is_set_at_run_time(tmp_path):
    with start_server(tmp_path, output_tokens=40) as s:
        url = f"{s.url}/_fake/config"
        assert httpx2.post(url, json={"output_tokens_per_s": 100}).json()["output_tokens_per_s"] == 100
        t0 = time.monotonic()
        client(s).messages.create(model=HAIKU, max_tokens=100, messages=user("x"))
        assert time.monotonic() - t0 >= 0.4
        for bad in (0, -5, "fast", True):
            r = httpx2.post(url, json={"output_tokens_per_s": bad})
            assert r.status_code == 400 and "output_tokens_per_s" in r.json()["error"]
        assert httpx2.post(url, json={"output_tokens_per_s": None}).json()["output_tokens_per_s"] is None
