"""The fake API's Messages surface through the real anthropic SDK: create (sync, async), streaming, count_tokens,
deterministic replies and the tokenizer they are counted with."""

from __future__ import annotations

import anthropic
import httpx2
from hypothesis import given, settings, strategies as st

from runtime.fake_api.generate import reply_text
from runtime.fake_api.tokenizer import MESSAGE_OVERHEAD, count_prompt, count_text
from tests.fake_api_fixtures import HAIKU, HAIKU_V1, SONNET, KEY, async_client, cli, client, srv, user  # noqa: F401


def test_sync_create_returns_a_well_formed_message(cli):
    m = cli.messages.create(model=HAIKU, max_tokens=512, messages=user("What is a token bucket?"))
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == HAIKU
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.input_tokens == count_text("What is a token bucket?", "v2") + MESSAGE_OVERHEAD
    assert 16 <= m.usage.output_tokens <= 128
    assert m.usage.output_tokens == count_text(m.content[0].text, "v2")
    assert m.usage.cache_creation_input_tokens == 0 and m.usage.cache_read_input_tokens == 0
    assert m.usage.cache_creation.ephemeral_5m_input_tokens == 0


async def test_async_create_matches_sync(srv):
    sync = client(srv)
    want = sync.messages.create(model=SONNET, max_tokens=256, messages=user("hello async"))
    async with async_client(srv) as ac:
        got = await ac.messages.create(model=SONNET, max_tokens=256, messages=user("hello async"))
    assert got.content[0].text == want.content[0].text
    assert got.usage.output_tokens == want.usage.output_tokens
    assert got.id != want.id


def test_same_prompt_same_text_different_prompt_different_text(cli):
    a = cli.messages.create(model=HAIKU, max_tokens=256, messages=user("alpha"))
    b = cli.messages.create(model=HAIKU, max_tokens=256, messages=user("alpha"), metadata={"user_id": "u9"})
    c = cli.messages.create(model=HAIKU, max_tokens=256, messages=user("beta"))
    assert a.content[0].text == b.content[0].text
    assert a.content[0].text != c.content[0].text


def test_max_tokens_caps_output_and_says_so(cli):
    m = cli.messages.create(model=HAIKU, max_tokens=5, messages=user("tell me a long story"))
    assert m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 5 == count_text(m.content[0].text, "v2")


def test_fixed_output_tokens_and_stop_sequences(tmp_path):
    from tests.fake_api_fixtures import start_server
    with start_server(tmp_path, output_tokens=40) as s:
        c = client(s)
        m = c.messages.create(model=HAIKU_V1, max_tokens=100, messages=user("x"))
        assert m.usage.output_tokens == 40 and m.stop_reason == "end_turn"
        word = m.content[0].text.split()[3]
        m2 = c.messages.create(model=HAIKU_V1, max_tokens=100, messages=user("x"), stop_sequences=[word])
        assert m2.stop_reason == "stop_sequence" and m2.stop_sequence == word
        assert word not in m2.content[0].text
        assert m2.usage.output_tokens == count_text(m2.content[0].text, "v1") < 40


def test_stream_event_sequence_and_final_message(cli):
    prompt = user("stream this please")
    plain = cli.messages.create(model=HAIKU, max_tokens=300, messages=prompt)
    events = []
    with cli.messages.stream(model=HAIKU, max_tokens=300, messages=prompt) as stream:
        for ev in stream:
            events.append(ev.type)
        final = stream.get_final_message()
    raw = [e for e in events if e in ("message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop")]
    assert raw[0] == "message_start" and raw[1] == "content_block_start"
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert raw.count("content_block_delta") >= 2
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens


def test_raw_sse_has_ping_and_usage_in_message_delta(srv):
    r = httpx2.post(f"{srv.url}/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2026-10-21"},
                    json={"model": HAIKU, "max_tokens": 3, "stream": True, "messages": user("hi")})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    names = [line[len("event: "):] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert '"stop_reason":"max_tokens"' in r.text and '"output_tokens":3' in r.text


async def test_async_stream(srv):
    async with async_client(srv) as ac:
        async with ac.messages.stream(model=SONNET, max_tokens=200, messages=user("async stream")) as s:
            text = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens > 0


def test_count_tokens_counts_system_messages_and_tools(cli, srv):
    msgs = [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four"},
            {"role": "user", "content": [{"type": "text", "text": "five six"}]}]
    tools = [{"name": "lookup", "description": "find a thing", "input_schema": {"type": "object"}}]
    base = cli.messages.count_tokens(model=HAIKU, messages=msgs).input_tokens
    with_sys = cli.messages.count_tokens(model=HAIKU, messages=msgs, system="be brief").input_tokens
    with_tools = cli.messages.count_tokens(model=HAIKU, messages=msgs, system="be brief", tools=tools).input_tokens
    assert base == count_prompt({"messages": msgs}, "v2")
    assert with_sys == base + count_text("be brief", "v2")
    assert with_tools > with_sys
    created = cli.messages.create(model=HAIKU, max_tokens=10, messages=msgs, system="be brief", tools=tools)
    assert created.usage.input_tokens == with_tools
    st_ = srv.stats()
    assert st_["count_tokens"] == 3 and st_["requests"] == 1  # count_tokens is not a rate-limited request


def test_v2_family_counts_about_30_percent_more():
    prose = ("It was a cold morning in the old city, and the people who waited for the first train talked about "
             "the weather, the prices at the market and the game they had watched the night before. ") * 5
    v1, v2 = count_text(prose, "v1"), count_text(prose, "v2")
    assert 1.2 <= v2 / v1 <= 1.45
    assert count_text("Hello, world!", "v1") == 4 and count_text("Hello, world!", "v2") == 6


def test_v1_model_reports_v1_counts(cli):
    m1 = cli.messages.create(model=HAIKU_V1, max_tokens=300, messages=user("internationalization matters"))
    m2 = cli.messages.create(model=HAIKU, max_tokens=300, messages=user("internationalization matters"))
    assert m1.usage.input_tokens == count_text("internationalization matters", "v1") + MESSAGE_OVERHEAD
    assert m2.usage.input_tokens > m1.usage.input_tokens
    assert m1.usage.output_tokens == count_text(m1.content[0].text, "v1")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 400), family=st.sampled_from(["v1", "v2"]))
def test_reply_text_has_exactly_the_requested_token_count(seed, n, family):
    assert count_text(reply_text(seed, n, family), family) == n


@settings(max_examples=200, deadline=None)
@given(a=st.text(max_size=200), b=st.text(max_size=200))
def test_tokenizer_is_additive_across_whitespace(a, b):
    for fam in ("v1", "v2"):
        assert count_text(a + " " + b, fam) == count_text(a, fam) + count_text(b, fam)


def test_models_endpoint(cli):
    ids = [m.id for m in cli.models.list()]
    assert HAIKU in ids and SONNET in ids
    assert cli.models.retrieve(HAIKU).id == HAIKU
    try:
        cli.models.retrieve("claude-nope")
    except anthropic.NotFoundError:
        pass
    else:
        raise AssertionError("unknown model must be 404")
