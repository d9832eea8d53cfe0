"""Automatic prompt caching in the request pipeline, judged by the fake API's own engine (its tokenizer, its
prompt cache, its usage) called in-process: what is sent, one write per new prefix, the admission estimate,
the tracker told on every path, and reservations that stay above the bill."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from runtime.fake_api.config import FakeApiConfig
from runtime.fake_api.engine import Engine
from runtime.fake_api.protocol import ApiError
from runtime.fake_api.validation import validate as api_validate
from runtime.pipeline import Pipeline, Ports
from runtime.prefixes import LocalPrefixes
from runtime.pricing import price
from runtime.request import validate
from runtime.settings import Settings
from runtime.transport import CallFailed, Response
from runtime.usage import Usage
from tests.unit.test_pipeline import Admission, Ledger

S = Settings(cache={"enabled": False}, retry={"backoff_base_s": 0.001, "backoff_max_s": 0.002})
SONNET = S.router.sonnet_model
SYSTEM = "policy " + "word " * 5_000        # 5,001 tokens on the fake tokenizer: above Sonnet's 1,024


class EngineTransport:
    """The fake API's engine behind the Transport port: real validation, cache and usage, no HTTP. The
    response "begins" (its cache writes become readable) after ``latency_s``, as on the server."""

    def __init__(self, engine: Engine | None = None, latency_s: float = 0.0, fail_first: int = 0) -> None:
        self.engine = engine or Engine(FakeApiConfig(limits=None, billing_path=None))
        self.latency_s = latency_s
        self.fail_first = fail_first
        self.sent: list[dict[str, Any]] = []
        self.usages: list[Usage] = []
        self.tail = asyncio.Event()

    async def create(self, model: str, params: dict, *, request_id: str, attempt: int, max_tokens: int) -> Response:
        self.sent.append(params)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise CallFailed(400, "yes", error_type="invalid_request_error", message="scripted")
        try:
            prep = api_validate({"model": model, "max_tokens": max_tokens, **params}, self.engine.cfg.models)
        except ApiError as err:
            raise CallFailed(err.status, "yes", error_type=err.type, message=err.message) from None
        plan = self.engine.plan(prep, "unit-key")
        rep = self.engine.reply(prep, plan)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self.engine.response_started(plan)
        self.usages.append(Usage.from_api(rep.usage))
        return Response(anthropic.types.Message.model_validate(rep.message()), {})

    async def stream(self, model: str, params: dict, *, request_id: str, attempt: int, max_tokens: int,
                     emit) -> Response:
        """The same answer as its stream events; after the first one the rest waits for ``tail`` (a long
        answer still being generated)."""
        from runtime.streaming import message_events

        resp = await self.create(model, params, request_id=request_id, attempt=attempt, max_tokens=max_tokens)
        events = list(message_events(resp.message.model_dump(mode="json")))
        emit(events[0])
        await self.tail.wait()
        for e in events[1:]:
            emit(e)
        return resp

    async def count_tokens(self, model: str, params: dict) -> int:
        prep = api_validate({"model": model, **params}, self.engine.cfg.models, count_only=True)
        return self.engine.plan(prep, "unit-key", b"").total


def make(settings: Settings = S, **kw: Any) -> tuple[Pipeline, Ports, EngineTransport]:
    t = EngineTransport(**kw)
    ports = Ports(admission=Admission(), ledger=Ledger(), transport=t)
    return Pipeline(settings, ports, caller="caller-0", life="life-1"), ports, t


def req(question: str = "What is TCP?", system: str | list = SYSTEM, **kw: Any):
    return validate({"model": SONNET, "max_tokens": 32, "system": system,
                     "messages": [{"role": "user", "content": question}]}, S, **kw)


def marked(params: dict) -> bool:
    return any(isinstance(b, dict) and b.get("cache_control") for b in (params.get("system") or []))


async def _all(p: Pipeline, reqs: list) -> list:
    return await asyncio.gather(*(p.run(r) for r in reqs), return_exceptions=True)


def test_markers_go_to_the_api_only_and_the_request_is_untouched():
    p, ports, t = make()
    r = req()
    before = repr(r.params)
    res = asyncio.run(p.run(r))
    assert repr(r.params) == before                 # the request (response-cache key, ledger) never changes
    assert marked(t.sent[0]) and not marked(r.params)
    assert t.usages[0].cache_write_tokens >= 5_000
    # the ledger prices the write exactly
    assert res.cost_usd == pytest.approx(price(t.usages[0], SONNET, S).total_usd)
    res2 = asyncio.run(p.run(req("And UDP?")))
    assert t.usages[1].cache_read_tokens >= 5_000 and t.usages[1].cache_write_tokens == 0
    assert res2.cost_usd < res.cost_usd / 5


@pytest.mark.parametrize("how", ["settings", "request"])
def test_off_sends_the_request_exactly_as_given(how):
    settings = Settings(cache={"enabled": False}, prompt_caching="off") if how == "settings" else S
    p, ports, t = make(settings)
    reqs = [req(f"q{i}", prompt_cache=False if how == "request" else None) for i in range(3)]
    for r in reqs:
        asyncio.run(p.run(r))
    assert all(sent is r.params for sent, r in zip(t.sent, reqs))   # the very dict given, no copy, no marker
    assert all(u.cache_write_tokens == 0 and u.cache_read_tokens == 0 for u in t.usages)
    assert p.prefixes.stats["claims"] == 0
    # and the ITPM estimate is the whole prompt every time (the estimator calibrates as it goes)
    assert all(g.input_tokens >= 5_000 for g in ports.admission.grants)


def test_a_request_may_turn_caching_on_when_the_settings_say_off():
    p, _, t = make(Settings(cache={"enabled": False}, prompt_caching="off"))
    asyncio.run(p.run(req(prompt_cache=True)))
    assert marked(t.sent[0])


def test_concurrent_first_requests_make_one_write_and_the_rest_read():
    p, ports, t = make(latency_s=0.05)
    n = 20
    results = asyncio.run(_all(p, [req(f"question {i}") for i in range(n)]))
    assert not [r for r in results if isinstance(r, BaseException)]
    writes = [u for u in t.usages if u.cache_write_tokens]
    reads = [u for u in t.usages if u.cache_read_tokens >= 5_000]
    assert len(writes) == 1 and len(reads) == n - 1
    assert p.prefixes.stats["lead"] == 1 and p.prefixes.stats["waited"] >= n - 2
    # the admission estimate: the whole prompt for the writer, the uncached rest for the readers
    big = [g.input_tokens for g in ports.admission.grants if g.input_tokens > 1_000]
    assert len(big) == 1
    assert max(g.input_tokens for g in ports.admission.grants if g.input_tokens <= 1_000) < 100


def test_without_single_flight_concurrent_first_requests_each_write():
    # the fake API only makes an entry readable once the writer's response begins: N at once pay N writes
    s = Settings(cache={"enabled": False}, prompt_cache={"write_wait_s": 0})
    p, _, t = make(s, latency_s=0.05)
    n = 10
    asyncio.run(_all(p, [req(f"question {i}") for i in range(n)]))
    assert sum(1 for u in t.usages if u.cache_write_tokens) == n


def test_a_failed_writer_frees_the_prefix_at_once():
    p, ports, t = make(fail_first=1)
    from runtime.errors import UpstreamError

    with pytest.raises(UpstreamError):
        asyncio.run(p.run(req("first")))
    tracker = p.prefixes.tracker
    key = next(iter(tracker._entries))
    assert tracker.state(*key).writer is None and tracker.stats["abandoned"] == 1
    asyncio.run(p.run(req("second")))
    assert p.prefixes.stats["lead"] == 2 and p.prefixes.stats["waited"] == 0
    assert t.usages[0].cache_write_tokens >= 5_000


def test_a_prefix_below_the_minimum_is_sent_unmarked_and_not_tracked():
    p, _, t = make()
    asyncio.run(p.run(req(system="A short system prompt.")))
    assert not marked(t.sent[0]) and p.prefixes.stats["claims"] == 0


def test_the_users_own_markers_are_kept_and_the_ttl_order_respected():
    p, _, t = make()
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    msgs = [{"role": "user", "content": "word " * 2_000}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "next question"}]
    r = validate({"model": SONNET, "max_tokens": 32, "system": system, "messages": msgs}, S)
    res = asyncio.run(p.run(r))
    sent = t.sent[0]
    assert sent["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert sent["messages"][1]["content"][0]["cache_control"]["type"] == "ephemeral"   # the earlier turns
    assert t.usages[0].cache_write_1h_tokens >= 5_000 and t.usages[0].cache_write_5m_tokens >= 2_000
    assert res.cost_usd <= ports_reserved(p, r)


def ports_reserved(p: Pipeline, r) -> float:
    return p.ports.ledger.begins[-1].reserve_usd


def test_reservations_cover_the_cold_write_and_are_tighter_than_pricing_every_token_as_a_1h_write():
    from runtime.pricing import bound_cost

    p, ports, t = make()
    for i in range(3):
        res = asyncio.run(p.run(req(f"question {i}")))
        assert res.cost_usd <= ports.ledger.begins[-1].reserve_usd
    assert not ports.ledger.exceeded
    # the first call wrote: its bill is near the bound, yet the bound is well below the old all-1h pricing
    bound = input_bound_of(req())
    assert ports.ledger.begins[0].reserve_usd < 0.75 * bound_cost(SONNET, bound, 32, S)


def input_bound_of(r) -> int:
    from runtime.estimate import input_upper_bound

    return input_upper_bound(r.params).tokens


def test_waiters_give_up_on_a_stuck_writer_within_their_wait_and_send():
    # a writer that never answers (its caller died) holds the prefix only for write_wait_s
    s = Settings(cache={"enabled": False}, prompt_cache={"write_wait_s": 0.05, "wait_poll_s": 0.01})
    port = LocalPrefixes(s)
    stuck = asyncio.run(port.claim(_ask()))
    assert stuck.kind == "lead"
    t = EngineTransport()
    p = Pipeline(s, Ports(admission=Admission(), ledger=Ledger(), transport=t, prefixes=port))
    res = asyncio.run(p.run(req()))
    assert res.attempts == 1 and port.stats["pass"] == 1 and port.stats["waited"] == 1


def _ask():
    from runtime.prefixes import PrefixAsk
    from runtime.prompt_cache import plan

    pl = plan(req().params, SONNET, S, Pipeline(S, Ports(Admission(), Ledger(), EngineTransport())).estimator)
    return PrefixAsk(pl.prefix_hash, SONNET, pl.prefix_tokens, deadline_in_s=10.0)


def test_prompt_cache_must_be_none_or_a_bool():
    from runtime.errors import InvalidRequest

    assert req(prompt_cache=None).prompt_cache is None and req(prompt_cache=False).prompt_cache is False
    for bad in ("yes", 1, 0.0):
        with pytest.raises(InvalidRequest) as exc:
            req(prompt_cache=bad)
        assert exc.value.field == "prompt_cache"


def test_a_streamed_writer_releases_its_waiters_at_its_first_event_not_its_last():
    # a long answer: its first event carries the cache usage; the waiters read from then on, while the
    # writer's answer is still being generated
    p, _, t = make()

    async def go():
        t.tail = asyncio.Event()
        first = asyncio.ensure_future(_drain(p, req("the long one", streaming=True)))
        await asyncio.sleep(0.01)   # the writer claims the prefix first
        rest = asyncio.gather(*(p.run(req(f"short {i}")) for i in range(5)))
        # well under write_wait_s (5 s): waiters not released by the first event would still be waiting
        await asyncio.wait_for(rest, timeout=2.0)
        t.tail.set()
        await first

    asyncio.run(go())
    assert sum(1 for u in t.usages if u.cache_write_tokens) == 1
    assert sum(1 for u in t.usages if u.cache_read_tokens >= 5_000) == 5


async def _drain(p: Pipeline, r) -> list:
    return [e async for e in p.stream(r)]
