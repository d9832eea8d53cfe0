"""runtime.cache_policy: scope, keys, bypass, storability, TTL classes and the near-miss guard. Pure."""

from __future__ import annotations

import pytest

from runtime import cache_policy as cp
from runtime.settings import CacheSettings

pytestmark = pytest.mark.pure


def req(text: str = "What is the capital of France?", **kw) -> dict:
    return {"max_tokens": 256, "messages": [{"role": "user", "content": text}], **kw}


# -- keys and scope ----------------------------------------------------------------------------------------------

def test_exact_key_normalises_outer_whitespace_and_content_shape_but_not_inner_whitespace():
    a = req("What is the capital of France?\r\n")
    b = {"max_tokens": 256, "messages": [{"role": "user", "content": [
        {"type": "text", "text": " What is the capital of France? ", "cache_control": {"type": "ephemeral"}}]}]}
    assert cp.exact_key(a, "m", "t") == cp.exact_key(b, "m", "t")
    inside = "What does this print?\nfor x in range(3):\n    y = x\n    print(y)"
    outside = "What does this print?\nfor x in range(3):\n    y = x\nprint(y)"
    assert cp.exact_key(req(inside), "m", "t") != cp.exact_key(req(outside), "m", "t")
    assert cp.guard(inside, outside) is not None or inside == outside


def test_guard_keeps_case_inside_quotes():
    assert cp.guard("Count the uppercase letters in 'HeLLo World'",
                    "Count the uppercase letters in 'hello world'") is not None


def test_exact_key_ignores_metadata_and_max_tokens_but_not_content():
    base = cp.exact_key(req(), "m", "t")
    assert cp.exact_key(req(metadata={"user_id": "u9"}), "m", "t") == base
    assert cp.exact_key({**req(), "max_tokens": 4000}, "m", "t") == base
    assert cp.exact_key(req("What is the capital of Spain?"), "m", "t") != base
    assert cp.exact_key(req(), "m", "other-tenant") != base
    assert cp.exact_key(req(), "m2", "t") != base
    assert cp.exact_key(req(system="be terse"), "m", "t") != base
    assert cp.exact_key(req(stop_sequences=["\n"]), "m", "t") != base


def test_scope_separates_tenant_system_model_context_and_params():
    base = cp.scope_for(req(), "m", "a")
    assert base.scope_id() == cp.scope_for(req("totally different question"), "m", "a").scope_id()
    variants = [
        cp.scope_for(req(), "m", "b"),
        cp.scope_for(req(), "m", None),
        cp.scope_for(req(system="You are a pirate."), "m", "a"),
        cp.scope_for(req(), "other-model", "a"),
        cp.scope_for(req(tools=[{"name": "x", "input_schema": {"type": "object"}}]), "m", "a"),
        cp.scope_for(req(stop_sequences=["END"]), "m", "a"),
        cp.scope_for(req(thinking={"type": "enabled", "budget_tokens": 2000}), "m", "a"),
        cp.scope_for({"max_tokens": 256, "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "What is the capital of France?"}]}, "m", "a"),
    ]
    ids = {v.scope_id() for v in variants}
    assert base.scope_id() not in ids
    assert len(ids) == len(variants)


def test_scope_ignores_max_tokens_and_metadata():
    assert (cp.scope_for(req(metadata={"user_id": "x"}), "m", "a").scope_id()
            == cp.scope_for({**req(), "max_tokens": 9999}, "m", "a").scope_id())


def test_assistant_prefill_is_part_of_the_scope():
    plain = req("Name a colour")
    prefilled = {**plain, "messages": plain["messages"] + [{"role": "assistant", "content": "Blue"}]}
    assert cp.scope_for(plain, "m", "a").scope_id() != cp.scope_for(prefilled, "m", "a").scope_id()
    assert cp.last_user_text(prefilled) == "Name a colour"


def test_last_user_text_joins_text_blocks():
    p = {"messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"},
                      {"role": "user", "content": [{"type": "text", "text": "line one"},
                                                   {"type": "text", "text": "line two"}]}]}
    assert cp.last_user_text(p) == "line one\nline two"
    assert cp.last_user_text({"messages": []}) == ""


# -- bypass -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,word", [
    ("What is the weather in Paris?", "weather"),
    ("What's the latest version of numpy?", "latest"),
    ("Who is winning the game right now", "right now"),
    ("What happened in the markets TODAY", "today"),
])
def test_bypass_real_time_words(text, word):
    reason = cp.bypass_reason(req(text), CacheSettings())
    assert reason is not None and word in reason


@pytest.mark.parametrize("text", [
    "What is a nowhere-dense set?",      # "now" inside a word is not "now"
    "Explain the livestock industry",   # nor "live" / "stock" inside "livestock"
    "Summarise the history of Rome",
])
def test_bypass_matches_whole_words_only(text):
    assert cp.bypass_reason(req(text), CacheSettings()) is None


def test_bypass_disabled_and_unjudgeable_turns():
    s = CacheSettings()
    assert "disabled" in cp.bypass_reason(req(), s, cache_enabled=False)
    assert "disabled" in cp.bypass_reason(req(), CacheSettings(enabled=False))
    img = {"max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "text", "text": "what is this?"}]}]}
    assert "image" in cp.bypass_reason(img, s)
    tool = {"max_tokens": 10, "messages": [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "5"}]}]}
    assert "tool_use" in cp.bypass_reason(tool, s)
    assert cp.bypass_reason({"max_tokens": 10, "messages": []}, s) is not None
    assert cp.bypass_reason(req("   "), s) == "no user text"


def test_bypass_words_come_from_settings():
    s = CacheSettings(bypass_words=("bitcoin",))
    assert cp.bypass_reason(req("What is bitcoin?"), s) is not None
    assert cp.bypass_reason(req("What is the weather like in June in Paris?"), s) is None


# -- storable / fits / classify / ttl -------------------------------------------------------------------------

def msg(stop="end_turn", content=None, out=10):
    return {"type": "message", "role": "assistant", "stop_reason": stop,
            "content": content if content is not None else [{"type": "text", "text": "Paris."}],
            "usage": {"input_tokens": 5, "output_tokens": out}}


def test_is_storable_only_complete_text_answers():
    assert cp.is_storable(msg())
    assert cp.is_storable(msg(content=[{"type": "thinking", "thinking": "hm", "signature": "s"},
                                       {"type": "text", "text": "Paris."}]))
    assert not cp.is_storable(msg(stop="max_tokens"))
    assert not cp.is_storable(msg(stop="tool_use"))
    assert not cp.is_storable(msg(stop="refusal"))
    assert not cp.is_storable(msg(content=[]))
    assert not cp.is_storable(msg(content=[{"type": "text", "text": "  "}]))
    assert not cp.is_storable(msg(content=[{"type": "text", "text": "x"},
                                           {"type": "tool_use", "id": "1", "name": "f", "input": {}}]))
    assert not cp.is_storable(None)
    assert not cp.is_storable({"type": "error", "stop_reason": "end_turn"})


def test_answer_fits_max_tokens():
    assert cp.answer_fits(msg(out=100), 100)
    assert not cp.answer_fits(msg(out=101), 100)
    assert cp.answer_fits({"content": []}, 5)


@pytest.mark.parametrize("text,kind", [
    ("How do I reverse a list in Python?", "code"),
    ("Why does `foo()` raise a KeyError?", "code"),
    ("Write a SQL query that counts orders per day", "code"),
    ("Compare the economic policies of Keynes and Hayek", "analysis"),
    ("What are the pros and cons of remote work?", "analysis"),
    ("What is the capital of France?", "factual"),
    ("How tall is Mount Everest?", "factual"),
])
def test_classify(text, kind):
    assert cp.classify(text) == kind


def test_ttl_for_reads_settings():
    s = CacheSettings(ttl_factual_s=1, ttl_code_s=2, ttl_analysis_s=3)
    assert [cp.ttl_for(k, s) for k in ("factual", "code", "analysis", "weird")] == [1, 2, 3, 1]


# -- guard ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q,c,why", [
    ("Is it safe to eat raw chicken?", "Is it not safe to eat raw chicken?", "negation"),
    ("Why is the sky blue?", "Why isn't the sky blue?", "negation"),
    ("What is 15% of 80?", "What is 15% of 90?", "how much"),
    ("How many calories are in two eggs?", "How many calories are in 3 eggs?", "how much"),
    ("What is the 3rd planet from the sun?", "What is the fourth planet from the sun?", "how much"),
    ("Who is the president of France?", "Who is the president of Germany?", "where"),
    ("How do I read a CSV file in python?", "How do I read a CSV file in Rust?", "object"),
    ("How do I drop a column in pandas?", "How do I drop a column in polars?", "object"),
    ("Translate 'thank you' into French", "Translate 'thank you' into German", "where"),
    ("What does the error 'connection refused' mean?", "What does the error 'connection reset' mean?", "quoted"),
    ("What is the height of Everest in meters?", "What is the height of Everest in feet?", "how much"),
    ("How many grams are in a cup of flour?", "How many ounces are in a cup of flour?", "how much"),
    ("How do I turn on Bluetooth?", "How do I turn off Bluetooth?", "which way"),
    ("How to enable 2FA on Gmail", "How to disable 2FA on Gmail", "which way"),
    ("Sort a list in ascending order", "Sort a list in descending order", "which way"),
    ("Is Paris bigger than London?", "Is London bigger than Paris?", "which way"),
    ("Convert a list to a string", "Convert a string to a list", "which way"),
    ("Convert Celsius to Fahrenheit", "Convert Fahrenheit to Celsius", "which way"),
])
def test_guard_rejects_near_misses(q, c, why):
    reason = cp.guard(q, c)
    assert reason is not None
    assert reason.startswith(why + ":"), reason
    assert cp.guard(c, q) is not None  # symmetric: the cached side may be either


@pytest.mark.parametrize("q,c", [
    ("How do I reverse a list in Python?", "How can I reverse a list in Python?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("How do I sort a dictionary by value in Python?", "How can I sort a Python dictionary by its values?"),
    ("How do I convert a string to an int in Python?", "How can I convert a string to an integer in Python?"),
    ("Who wrote Romeo and Juliet?", "Who is the author of Romeo and Juliet?"),
    ("Why don't cats like water?", "Why do cats not like water?"),
    ("What is the boiling point of water at sea level?", "At sea level, what is the boiling point of water?"),
    ("same   text", "Same text"),
])
def test_guard_accepts_paraphrases(q, c):
    assert cp.guard(q, c) is None
