"""The prefix port: relative times across processes, reports, and claims that wait out another's write."""

import asyncio

import pytest

from runtime.prefixes import LocalPrefixes, PrefixAsk, PrefixReport, decide_many, report_many
from runtime.prompt_cache import PrefixTracker
from runtime.settings import Settings

S = Settings(prompt_cache={"write_wait_s": 5.0, "wait_poll_s": 0.01})
M = "claude-sonnet-5-5"


def test_times_cross_as_seconds_from_now_whatever_the_hosts_clock():
    t = PrefixTracker(S)
    lead, wait = decide_many(t, [PrefixAsk("p", M, 2_000, 30.0), PrefixAsk("p", M, 2_000, 30.0)], 1e6)
    assert lead.kind == "lead" and wait.kind == "wait"
    assert wait.until == pytest.approx(5.0)                     # write_wait_s from now, not a clock reading
    # the request's own deadline caps the wait; time already waited counts against write_wait_s
    assert decide_many(t, [PrefixAsk("p", M, 2_000, 1.5)], 1e6 + 1)[0].until == pytest.approx(1.5)
    assert decide_many(t, [PrefixAsk("p", M, 2_000, 30.0, waited_s=4.0)], 1e6 + 1)[0].until == pytest.approx(1.0)
    assert decide_many(t, [PrefixAsk("p", M, 2_000, 30.0, waited_s=6.0)], 1e6 + 1)[0].kind == "pass"
    # the writer's answer ends the write (True: wake the waiters) and makes the prefix warm
    assert report_many(t, [PrefixReport("p", M, lead.token, True, wrote=True, ttl="5m")], 1e6 + 2) == [True]
    assert decide_many(t, [PrefixAsk("p", M)], 1e6 + 3)[0].kind == "warm"


def test_an_abandoned_write_lets_the_next_request_lead():
    t = PrefixTracker(S)
    lead = decide_many(t, [PrefixAsk("p", M)], 0.0)[0]
    assert report_many(t, [PrefixReport("p", M, 999, answered=False)], 1.0) == [False]   # not its token
    assert report_many(t, [PrefixReport("p", M, lead.token, answered=False)], 1.0) == [True]
    assert decide_many(t, [PrefixAsk("p", M)], 1.0)[0].kind == "lead"


def test_claim_waits_for_the_writer_and_is_woken_by_its_finish():
    port = LocalPrefixes(Settings(prompt_cache={"write_wait_s": 5.0, "wait_poll_s": 1.0}))

    async def go():
        lead = await port.claim(PrefixAsk("p", M, deadline_in_s=10.0))
        waiters = [asyncio.ensure_future(port.claim(PrefixAsk("p", M, deadline_in_s=10.0))) for _ in range(5)]
        await asyncio.sleep(0.02)
        assert not any(w.done() for w in waiters)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        port.finish("p", M, True, False, ttl="5m", token=lead.token)
        got = await asyncio.gather(*waiters)
        return lead, got, loop.time() - t0

    lead, got, took = asyncio.run(go())
    assert lead.kind == "lead" and [d.kind for d in got] == ["warm"] * 5
    assert took < 0.5          # woken by the finish, not by the 1 s poll
    assert port.stats["waited"] == 5 and port.stats["warm"] == 5
