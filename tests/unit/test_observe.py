"""The pipeline's observer port and the per-request log line: what is reported for answers, failures,
admission waits and failed attempts, and that a prompt, a response or a key never reaches the log."""

from __future__ import annotations

import asyncio
import json
import logging

from actors.metrics import REQUEST_LOG, RequestObserver
from runtime.errors import OverloadedAfterFallback
from runtime.observe import error_line, fallbacks, result_line
from runtime.settings import Settings
from tests.unit.test_pipeline import HAIKU, OPUS, SONNET, Admission, fail, make, req

# observers run just after the result goes back (Pipeline.observe_after_s); here on the next turn of the loop


def run(p, r):
    p.observe_after_s = 0.0

    async def go():
        try:
            return await p.run(r)
        finally:
            await asyncio.sleep(0)  # one turn of the loop: the observation scheduled with the result runs

    return asyncio.run(go())

SECRET_PROMPT = "the launch code is 0000-SECRET-PROMPT"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_result(self, r, result):
        self.events.append(("result", r.request_id, result.model, result.cache))

    def on_error(self, r, exc, latency_s):
        self.events.append(("error", r.request_id, type(exc).__name__))

    def on_admission(self, model_class, priority, wait_s, delayed):
        self.events.append(("admission", model_class, priority, delayed))

    def on_attempt_failed(self, model, upstream, status):
        self.events.append(("failed", model, status))


def observed(script=None, **kw):
    p, ports, clock = make(script, **kw)
    ports.observer = Recorder()
    return p, ports, clock


def test_an_answer_is_observed_once_with_its_admission():
    p, ports, _ = observed()
    r = req()
    run(p, r)
    assert ports.observer.events == [("admission", "sonnet", "normal", False),
                                     ("result", r.request_id, SONNET, "bypass")]


def test_failed_attempts_and_the_fallback_are_observed():
    p, ports, _ = observed({OPUS: [fail(429)]})
    r = req(model=OPUS)
    res = run(p, r)
    assert ("failed", OPUS, 429) in ports.observer.events
    assert ports.observer.events[-1] == ("result", r.request_id, res.model, "bypass")
    assert res.model != OPUS and fallbacks(res.history) == 1


def test_a_typed_failure_is_observed_as_an_error():
    p, ports, _ = observed({SONNET: [fail(529)] * 3, HAIKU: [fail(529)] * 3})
    r = req()
    try:
        run(p, r)
    except OverloadedAfterFallback:
        pass
    else:
        raise AssertionError("expected OverloadedAfterFallback")
    assert ports.observer.events[-1] == ("error", r.request_id, "OverloadedAfterFallback")
    assert sum(1 for e in ports.observer.events if e[0] == "failed") == 6


def test_a_held_back_request_counts_as_a_429_prevented():
    from runtime.admission import Grant

    class Scheduling(Admission):
        async def acquire(self, e, deadline_s=None):
            g = await super().acquire(e, deadline_s)
            return Grant(g.lease_id, g.request_id, g.model_class, g.input_tokens, g.max_output_tokens, g.user_id,
                         delay_s=0.2)

    p, ports, _ = make(admission=Scheduling())
    ports.observer = Recorder()
    run(p, req(priority="bulk"))
    assert ("admission", "sonnet", "bulk", True) in ports.observer.events


def test_an_observer_that_raises_never_fails_the_request():
    class Broken(Recorder):
        def on_result(self, r, result):
            raise RuntimeError("metrics backend down")

    p, ports, _ = make()
    ports.observer = Broken()
    assert run(p, req()).model == SONNET


def test_a_stream_is_observed_when_it_ends():
    p, ports, _ = observed()
    r = req(streaming=True)

    p.observe_after_s = 0.0

    async def consume():
        events = [e async for e in p.stream(r)]
        await asyncio.sleep(0)
        return events

    events = asyncio.run(consume())
    assert events and ports.observer.events[-1][0:2] == ("result", r.request_id)


def test_the_log_line_has_counts_and_ids_never_text(caplog):
    p, ports, _ = make()
    settings = Settings(observability={"metrics": False})
    ports.observer = RequestObserver(settings)
    r = req(text=SECRET_PROMPT, user_id="u7", tenant="acme")
    logger = logging.getLogger(REQUEST_LOG)
    logger.propagate = True  # let caplog see it
    try:
        with caplog.at_level(logging.INFO, logger=REQUEST_LOG):
            res = run(p, r)
    finally:
        logger.propagate = False
    # one record may reach caplog twice: when an earlier test in this process (an in-process caller) set up the
    # request logger, pytest's capture handler sits on that logger as well as on the root
    records = list({id(rec): rec for rec in caplog.records if rec.name == REQUEST_LOG}.values())
    lines = [json.loads(rec.getMessage()) for rec in records]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == r.request_id and line["model"] == SONNET and line["cache"] == "bypass"
    assert line["attempts"] == 1 and line["input_tokens"] == 20 and line["output_tokens"] == 5
    assert line["cost_usd"] == round(res.cost_usd, 8) and line["user_id"] == "u7" and line["tenant"] == "acme"
    text = " ".join(caplog.messages)
    assert "SECRET" not in text and res.text not in text


def test_the_error_line_leaves_the_message_out():
    r = req(text=SECRET_PROMPT)
    exc = OverloadedAfterFallback(f"upstream said: {SECRET_PROMPT}", request_id=r.request_id, status=529,
                                  error_type="overloaded_error", attempts=[{"model": SONNET, "status": 529},
                                                                           {"model": HAIKU, "status": 529}])
    line = error_line(r, exc, 1.5)
    assert line["error_type"] == "OverloadedAfterFallback" and line["status"] == 529 and line["fallbacks"] == 1
    assert "SECRET" not in json.dumps(line)


def test_a_cache_hit_line_bills_nothing():
    from runtime.result import Result
    from tests.unit.test_pipeline import message

    r = req()
    hit = Result(message=message(SONNET, inp=900, out=300), model=SONNET, cache="semantic", cost_usd=0.0,
                 attempts=0, latency_s=0.01, request_id=r.request_id, saved_usd=0.004)
    line = result_line(r, hit)
    assert line["input_tokens"] == 0 and line["output_tokens"] == 0 and line["saved_usd"] == 0.004
