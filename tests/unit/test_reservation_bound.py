"""Property: a request's budget reservation is never below what the API bills for it.

Judged by the local API's own engine (its tokenizer, its prompt cache, its reply lengths), priced at the
configured prices: random prompts in several scripts, digits and symbols, tools, images, documents, cached
prefixes, near a long-context price tier, with and without the API's token count."""

import asyncio
import base64
import struct
import zlib

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from runtime.fake_api.config import FakeApiConfig
from runtime.fake_api.engine import Engine
from runtime.fake_api.validation import validate as api_validate
from runtime.pipeline import Pipeline, Ports
from runtime.pricing import price
from runtime.request import validate
from runtime.settings import Settings
from runtime.usage import Usage
from tests.unit.test_pipeline import Admission, Ledger, Transport

# a budget applies, so "auto" asks the API to count unsure prompts (without one it never counts)
S_AUTO = Settings(cache={"enabled": False}, budgets={"daily_usd": 1_000_000.0})
S_NEVER = Settings(cache={"enabled": False}, estimate={"count_tokens": "never"})
S_OFF = Settings(cache={"enabled": False}, prompt_caching="off")
ENGINE = Engine(FakeApiConfig(limits=None, billing_path=None))

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ ",       # prose-like
    "qwrtypsdfghjklzxcvbnm",                          # consonant soup
    "0123456789 ,.;:!?-_()[]{}<>=+*/#@$%^&|~'\"",    # digits and symbols
    "日本語の文章を要約してください。中文句子。한국어 문장",  # CJK
    "Привет мир Ελληνικά עברית العربية हिन्दी",       # other scripts
    "😀🚀🎉👍🏽🧪",                                      # emoji (4-byte)
]


def png(w: int, h: int) -> str:
    raw = b"".join(b"\x00" + b"\x00" * (w * 3) for _ in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return base64.b64encode(data).decode()


PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
                       b"2 0 obj << /Type /Pages /Kids [3 0 R 4 0 R] /Count 2 >> endobj\n"
                       b"3 0 obj << /Type /Page >> endobj\n4 0 obj << /Type /Page >> endobj\n"
                       b"BT (Hello quarterly report) Tj ET\n%%EOF").decode()

text = st.builds(lambda parts: "".join(parts), st.lists(
    st.sampled_from(ALPHABETS).flatmap(lambda a: st.text(alphabet=a, min_size=1, max_size=400)),
    min_size=1, max_size=6)).filter(lambda t: t.strip())


@st.composite
def requests(draw):
    blocks = [{"type": "text", "text": draw(text)}]
    if draw(st.booleans()):
        blocks.append({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": png(draw(st.integers(1, 60)), draw(st.integers(1, 60)))}})
    if draw(st.booleans()):
        blocks.append({"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                       "data": PDF}})
    if draw(st.booleans()):
        blocks.append({"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                       "data": draw(text)}})
    body = {"model": draw(st.sampled_from(["claude-haiku-5-5", "claude-sonnet-5-5", "claude-opus-4-1",
                                           "claude-haiku-4-5"])),
            "max_tokens": draw(st.integers(1, 3_000)),
            "messages": [{"role": "user", "content": blocks}]}
    if draw(st.booleans()):
        sys_text = draw(text) * draw(st.integers(1, 40))
        body["system"] = [{"type": "text", "text": sys_text, "cache_control": {"type": "ephemeral",
                                                                              "ttl": draw(st.sampled_from(["5m", "1h"]))}}]
    if draw(st.booleans()):
        body["tools"] = [{"name": "lookup", "description": draw(text),
                          "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    if draw(st.booleans()):
        # a conversation: earlier turns before the last user turn (a boundary automatic caching may mark)
        body["messages"] = [{"role": "user", "content": draw(text) * draw(st.integers(1, 20))},
                            {"role": "assistant", "content": draw(text)}] + body["messages"]
    if draw(st.booleans()):
        # the user's own marker in the last turn: the whole prompt may then be written
        last = body["messages"][-1]["content"]
        last[-1] = {**last[-1], "cache_control": {"type": "ephemeral"}}
    return body


def billed(body: dict) -> float:
    prep = api_validate(body, ENGINE.cfg.models)
    plan = ENGINE.plan(prep, "property-test-key")
    usage = Usage.from_api(ENGINE.reply(prep, plan).usage)
    ENGINE.response_started(plan)  # later examples may read what this one wrote
    return price(usage, prep.model, S_AUTO).total_usd


def reservation(body: dict, settings: Settings, count: int | None) -> float:
    ports = Ports(admission=Admission(), ledger=Ledger(), transport=Transport(count=count))
    p = Pipeline(settings, ports)
    req = validate(body, settings)
    return asyncio.run(p._reservation(req, body["model"], deadline_at=float("inf")))


def exact_count(body: dict) -> int:
    prep = api_validate(body, ENGINE.cfg.models, count_only=False)
    return ENGINE.plan(prep, "count-key").total


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_reserved_is_never_below_billed(body):
    bill = billed(body)
    # automatic caching off (the request goes as given): with the API's count where the local estimate is
    # unsure (the default), and with no count at all
    assert reservation(body, S_OFF, exact_count(body)) >= bill - 1e-12
    assert reservation(body, S_OFF.model_copy(update={"estimate": S_NEVER.estimate}), None) >= bill - 1e-12


def sent_bills_and_reservation(body: dict, settings: Settings, count: int | None, ttl: str) -> tuple[list, float]:
    """The pipeline's own placement (markers added at ``ttl``, as a tracker decision would set it) sent to a
    fresh fake API that caches every prefix, however short: the cold bill (writes), then the warm one (reads),
    and the reservation the pipeline makes for that placement."""
    ports = Ports(admission=Admission(), ledger=Ledger(), transport=Transport(count=count))
    p = Pipeline(settings, ports)
    req = validate(body, settings)
    model = body["model"]
    plan = p._plan(req, model).with_ttl(ttl)
    p._plans[req.request_id][model] = plan
    reserved = asyncio.run(p._reservation(req, model, deadline_at=float("inf")))
    engine = Engine(FakeApiConfig(limits=None, billing_path=None, cache_min_tokens=1))
    sent = {**plan.params, "model": model, "max_tokens": body["max_tokens"]}
    bills = []
    for _ in range(2):
        prep = api_validate(sent, engine.cfg.models)
        cp = engine.plan(prep, "k")
        bills.append(price(Usage.from_api(engine.reply(prep, cp).usage), model, settings).total_usd)
        engine.response_started(cp)
    return bills, reserved


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.sampled_from(["5m", "1h"]))
def test_reserved_is_never_below_billed_with_automatic_cache_control(body, ttl):
    for settings, count in ((S_AUTO, exact_count(body)), (S_NEVER, None)):
        bills, reserved = sent_bills_and_reservation(body, settings, count, ttl)
        assert reserved >= max(bills) - 1e-12, (bills, reserved)


def test_placed_markers_tighten_the_reservation_of_a_long_shared_prefix():
    body = {"model": "claude-sonnet-5-5", "max_tokens": 100, "system": "Shared rules of the house. " * 800,
            "messages": [{"role": "user", "content": "one short question"}]}
    bills, tight = sent_bills_and_reservation(body, S_NEVER, None, "5m")
    loose = reservation(body, S_OFF.model_copy(update={"estimate": S_NEVER.estimate}), None)
    assert bills[0] > bills[1] and tight >= bills[0]
    # every token at the 5 m write rate (1.25x) instead of the 1 h one (2x), the short question at 1x
    assert tight < 0.65 * loose


def test_near_the_long_context_tier_the_reservation_prices_the_dearer_tier():
    # haiku-5-5 bills prompts over 100k tokens at 5x the input rate: the reported undercount that overshot
    body = {"model": "claude-haiku-5-5", "max_tokens": 100,
            "messages": [{"role": "user", "content": "数据" * 60_000}]}
    bill = billed(body)
    assert reservation(body, S_AUTO, exact_count(body)) >= bill
    assert reservation(body, S_NEVER, None) >= bill


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_the_local_input_bound_is_never_below_the_api_count(body):
    # the input side on its own (the output side's max_tokens slack would hide an undercount above)
    from runtime.estimate import input_upper_bound

    assert input_upper_bound(body).tokens >= exact_count(body)


@hsettings(max_examples=500, deadline=None)
@given(st.sampled_from(ALPHABETS).flatmap(lambda a: st.text(alphabet=a, min_size=1, max_size=3_000)),
       st.sampled_from(["v1", "v2"]))
def test_text_bound_covers_the_api_tokenizer_on_any_script(t, family):
    from runtime.estimate import text_upper_bound
    from runtime.fake_api.tokenizer import count_text

    assert text_upper_bound(t) >= count_text(t, family)
