"""Hostile input: every malformed request or submit() argument is an InvalidRequest from validation itself (no
other exception type, no hang), and whatever validation accepts, the API accepts too."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from runtime.errors import InvalidRequest
from runtime.fake_api.protocol import ApiError
from runtime.fake_api.validation import validate as api_validate
from runtime.request import validate
from runtime.settings import Settings

S = Settings()
BASE = {"model": "auto", "max_tokens": 64, "messages": [{"role": "user", "content": "What is a monad?"}]}


def deep(n: int) -> dict:
    d: dict = {}
    for _ in range(n):
        d = {"x": d}
    return d


class Opaque:
    pass


# each of these makes a valid request invalid
MUTATIONS = [
    ("metadata", 5), ("metadata", "x"), ("metadata", []), ("metadata", {"user_id": 5}),
    ("metadata", {"other": "x"}), ("metadata", {"user_id": ["u"]}),
    ("messages", {}), ("messages", []), ("messages", "hi"), ("messages", [{}]), ("messages", [5]),
    ("messages", [{"role": ["user"], "content": "hi"}]), ("messages", [{"role": 5, "content": "hi"}]),
    ("messages", [{"role": {"r": 1}, "content": "hi"}]), ("messages", [{"role": None, "content": "hi"}]),
    ("messages", [{"role": "user", "content": "hi", 1: "x"}]),
    ("messages", [{"role": "assistant", "content": "hi"}]),
    ("messages", [{"role": "user", "content": 5}]), ("messages", [{"role": "user", "content": []}]),
    ("messages", [{"role": "user", "content": [5]}]), ("messages", [{"role": "user", "content": [{"type": 5}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": ""}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 7}]}]),
    ("messages", [{"role": "user", "content": [{"type": "document", "source": "abc"}]}]),
    ("messages", [{"role": "user", "content": [{"type": "document", "source": ["a"]}]}]),
    ("messages", [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]),
    ("messages", [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "AA",
                                                                            "media_type": "text/html"}}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": "yes"}]}]),
    ("messages", [{"role": "user", "content": Opaque()}]), ("messages", [{"role": "user", "content": b"hi"}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "x", "extra": {1, 2}}]}]),
    ("system", 5), ("system", [{"type": "text", "text": 5}]), ("system", [{"type": "image"}]), ("system", [5]),
    ("system", [{"type": "text", "text": ""}]),
    ("max_tokens", "10"), ("max_tokens", 10.5), ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", True),
    ("max_tokens", 10**9), ("max_tokens", None), ("max_tokens", float("nan")),
    ("model", 5), ("model", ""), ("model", "gpt-4"), ("model", ["auto"]),
    ("temperature", 0.5), ("top_p", 0.9), ("top_k", 3), ("stream", True), ("bogus_param", 1),
    ("stop_sequences", "x"), ("stop_sequences", [1]), ("stop_sequences", [""]),
    ("tools", "x"), ("tools", [5]), ("tools", [{"name": 5}]), ("tools", [{"description": "nameless"}]),
    ("tools", [{"name": "t", "input_schema": {"x": float("nan")}}]),
    ("tool_choice", "auto"), ("tool_choice", [1]), ("thinking", "on"), ("service_tier", "fastest"),
    ("tool_choice", deep(200)), ("inference_geo", 5), ("container", 5),
]
KEY_MUTATIONS = [7, 1.5, None, ("a", "b")]
BAD_ARGS = [
    ("request_id", 12345), ("request_id", ""), ("request_id", "x" * 65), ("request_id", "has space"),
    ("request_id", "dots.and:colons"),
    ("request_id", ["x"]), ("request_id", {"a": 1}), ("request_id", b"x"), ("request_id", 1.5),
    ("deadline_s", "soon"), ("deadline_s", -1), ("deadline_s", 0), ("deadline_s", float("nan")),
    ("deadline_s", float("inf")), ("deadline_s", True), ("deadline_s", [1]),
    ("priority", "urgent"), ("priority", 1), ("priority", None), ("priority", ["normal"]), ("priority", {"p": 1}),
    ("user_id", ["u"]), ("user_id", {}), ("user_id", 5), ("user_id", ""), ("user_id", "u" * 300),
    ("tenant", {}), ("tenant", []), ("tenant", 3), ("tenant", ""),
    ("cache", "yes"), ("cache", 1), ("cache", None),
]
GOOD_ARGS = {"request_id": st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)),
             "priority": st.sampled_from(["critical", "normal", "bulk"]),
             "user_id": st.one_of(st.none(), st.text(min_size=1, max_size=20)),
             "tenant": st.one_of(st.none(), st.text(min_size=1, max_size=20)),
             "deadline_s": st.one_of(st.none(), st.floats(0.01, 600)),
             "cache": st.booleans()}


@st.composite
def hostile(draw):
    """(request, kwargs) with at least one thing wrong."""
    request = {**BASE, "messages": [dict(m) for m in BASE["messages"]]}
    kwargs = {k: draw(v) for k, v in GOOD_ARGS.items()}
    broken = False
    for _ in range(draw(st.integers(0, 3))):
        field, value = draw(st.sampled_from(MUTATIONS))
        request[field] = value
        broken = True
    if draw(st.booleans()):
        request[draw(st.sampled_from(KEY_MUTATIONS))] = "x"
        broken = True
    for _ in range(draw(st.integers(0 if broken else 1, 2))):
        name, value = draw(st.sampled_from(BAD_ARGS))
        kwargs[name] = value
    return request, kwargs


@hsettings(max_examples=1_500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_every_hostile_request_or_argument_is_an_invalid_request(case):
    request, kwargs = case
    with pytest.raises(InvalidRequest) as exc:
        validate(request, S, **kwargs)
    assert exc.value.field  # it names what is wrong


def test_a_non_dict_request_is_invalid():
    for bad in (None, "hi", 5, [BASE], Opaque()):
        with pytest.raises(InvalidRequest):
            validate(bad, S)


# -- accepted => the API accepts ----------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                      st.text(max_size=30))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=40), json_any)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "document", "tool_result", "weird"]),
                           "source": json_any}),
    json_any)
content = st.one_of(st.text(max_size=40), st.lists(block, max_size=3), json_any)
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": content}), json_any)
loose = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", "claude-haiku-5-5", "claude-opus-5-5", "nope"]),
     "max_tokens": st.one_of(st.integers(-2, 70_000), json_any),
     "messages": st.one_of(st.lists(message, min_size=0, max_size=3), json_any)},
    optional={"system": st.one_of(st.text(max_size=30), st.lists(block, max_size=2), json_any),
              "metadata": st.one_of(st.fixed_dictionaries({"user_id": st.one_of(st.text(max_size=10), json_any)}),
                                    json_any),
              "stop_sequences": st.one_of(st.lists(st.text(max_size=5), max_size=2), json_any),
              "tools": st.one_of(st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=2), json_any)})


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loose)
def test_what_validation_accepts_the_api_accepts(request):
    try:
        norm = validate(request, S)
    except InvalidRequest:
        return
    model = norm.requested_model if norm.requested_model != "auto" else S.router.sonnet_model
    body = {"model": model, **norm.params}
    try:
        api_validate(body, S.models)
    except ApiError as exc:  # pragma: no cover - the failure message is the point
        pytest.fail(f"validation let through what the API refuses: {exc.status} {exc.message}: {body!r}")
    assert all(math.isfinite(v) for v in _floats(body))


def _floats(v):
    if isinstance(v, float):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _floats(x)
    elif isinstance(v, list):
        for x in v:
            yield from _floats(x)
