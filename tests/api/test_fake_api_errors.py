"""Every error the fake API answers, checked through the SDK class it must raise, plus seeded faults and the
run-time /_fake/config switch."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from tests.fake_api_fixtures import HAIKU, KEY, SONNET, cli, client, srv, start_server, user  # noqa: F401

HDRS = {"x-api-key": KEY, "anthropic-version": "2026-10-21"}


def _raw(srv, body, path="/v1/messages", headers=HDRS):
    return httpx2.post(f"{srv.url}{path}", headers=headers, json=body)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(messages=[]), "at least one message"),
    (dict(messages=[{"role": "bot", "content": "x"}]), "role"),
    (dict(messages=user("")), "non-empty"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]), "non-empty"),
    (dict(messages=user("x"), max_tokens=0), "greater than or equal to 1"),
    (dict(messages=user("x"), max_tokens=10**6), "maximum allowed number of output tokens"),
])
def test_bad_requests_raise_bad_request_error(cli, kwargs, fragment):
    kwargs.setdefault("max_tokens", 10)
    with pytest.raises(anthropic.BadRequestError) as ei:
        # an explicit timeout: the SDK refuses huge non-streaming max_tokens itself before sending
        cli.messages.create(model=HAIKU, timeout=30, **kwargs)
    assert ei.value.status_code == 400
    assert ei.value.body["error"]["type"] == "invalid_request_error"
    assert fragment in ei.value.body["error"]["message"]
    assert ei.value.body["request_id"] == ei.value.response.headers["request-id"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k", "frobnicate"])
def test_removed_sampling_params_are_extra_inputs(cli, field):
    with pytest.raises(TypeError):  # the 2.13 SDK itself refuses them as keyword arguments
        cli.messages.create(model=HAIKU, max_tokens=10, messages=user("x"), **{field: 0.5})
    with pytest.raises(anthropic.BadRequestError) as ei:
        cli.messages.create(model=HAIKU, max_tokens=10, messages=user("x"), extra_body={field: 0.5})
    assert ei.value.body["error"]["message"] == f"{field}: Extra inputs are not permitted"


def test_missing_fields_and_bad_json_over_raw_http(srv):
    r = _raw(srv, {"model": HAIKU, "messages": user("x")})
    assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens: Field required"
    r = httpx2.post(f"{srv.url}/v1/messages", headers=HDRS, content=b"{not json")
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = _raw(srv, {"model": HAIKU, "max_tokens": 5, "messages": user("x")}, headers={"x-api-key": KEY})
    assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]


def test_authentication(tmp_path):
    with start_server(tmp_path, api_key="right-key") as s:
        with pytest.raises(anthropic.AuthenticationError) as ei:
            client(s, api_key="wrong-key").messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        assert ei.value.body["error"]["type"] == "authentication_error"
        assert "wrong-key" not in ei.value.response.text
        ok = client(s, api_key="right-key").messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        assert ok.usage.output_tokens == 5
        # older clients send x-api-key; both are accepted
        r = httpx2.post(f"{s.url}/v1/messages", headers={"x-api-key": "right-key", "anthropic-version": "v"},
                        json={"model": HAIKU, "max_tokens": 5, "messages": user("x")})
        assert r.status_code == 200
        r = httpx2.post(f"{s.url}/v1/messages", headers={"anthropic-version": "v"},
                        json={"model": HAIKU, "max_tokens": 5, "messages": user("x")})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_any_key_accepted_when_none_configured(srv):
    for key in ("a", "sk-ant-whatever"):
        assert client(srv, api_key=key).messages.create(model=HAIKU, max_tokens=5, messages=user("x")).id


def test_unknown_model_is_not_found(cli):
    with pytest.raises(anthropic.NotFoundError) as ei:
        cli.messages.create(model="claude-imaginary-9", max_tokens=5, messages=user("x"))
    assert ei.value.body["error"]["type"] == "not_found_error"


def test_prompt_over_max_input_is_413(tmp_path):
    from runtime.settings import default_models
    models = default_models()
    models[HAIKU] = models[HAIKU].model_copy(update={"max_input_tokens": 50})
    with start_server(tmp_path, models=models) as s:
        c = client(s)
        with pytest.raises(anthropic.ContentTooLargeError) as ei:
            c.messages.create(model=HAIKU, max_tokens=5, messages=user("word " * 60))
        assert ei.value.status_code == 413 and ei.value.body["error"]["type"] == "request_too_large"
        assert c.messages.create(model=HAIKU, max_tokens=5, messages=user("word " * 10)).id
        assert s.stats()["billed"] == 1


def test_p529_one_raises_overloaded_and_is_not_billed(tmp_path):
    with start_server(tmp_path, p529=1.0) as s:
        with pytest.raises(anthropic.OverloadedError) as ei:
            client(s).messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        assert isinstance(ei.value, anthropic.InternalServerError) and ei.value.status_code == 529
        assert ei.value.body["error"]["type"] == "overloaded_error"
        assert "anthropic-ratelimit-requests-remaining" in ei.value.response.headers
        st = s.stats()
        assert st["by_status"] == {"529": 1} and st["billed"] == 0
        assert not (tmp_path / "billing.jsonl").read_text()


def test_p500_one_raises_internal_server_error(tmp_path):
    with start_server(tmp_path, p500=1.0) as s:
        with pytest.raises(anthropic.InternalServerError) as ei:
            client(s).messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        assert ei.value.status_code == 500 and ei.value.body["error"]["type"] == "api_error"
        assert not isinstance(ei.value, anthropic.OverloadedError)


def _fault_pattern(tmp_path, seed, n=40):
    with start_server(tmp_path, p529=0.3, p500=0.2, seed=seed) as s:
        c = client(s)
        out = []
        for i in range(n):
            try:
                c.messages.create(model=HAIKU, max_tokens=5, messages=user(f"q{i}"))
                out.append(200)
            except anthropic.APIStatusError as e:
                out.append(e.status_code)
        return out


def test_faults_are_deterministic_under_seed(tmp_path):
    a = _fault_pattern(tmp_path / "a", seed=7)
    b = _fault_pattern(tmp_path / "b", seed=7)
    c = _fault_pattern(tmp_path / "c", seed=8)
    assert a == b
    assert a != c
    assert {200, 500, 529} <= set(a)


def test_runtime_config_makes_a_529_storm_on_one_class(srv, cli):
    r = httpx2.post(f"{srv.url}/_fake/config", json={"p529_by_class": {"sonnet": 1.0}})
    assert r.status_code == 200 and r.json()["p529_by_class"] == {"sonnet": 1.0}
    with pytest.raises(anthropic.OverloadedError):
        cli.messages.create(model=SONNET, max_tokens=5, messages=user("x"))
    assert cli.messages.create(model=HAIKU, max_tokens=5, messages=user("x")).id
    srv.configure(p529_by_class={})
    assert cli.messages.create(model=SONNET, max_tokens=5, messages=user("x")).id
    st = srv.stats()
    assert st["by_class"]["sonnet"]["by_status"] == {"529": 1, "200": 1}
    assert st["by_class"]["haiku"]["by_status"] == {"200": 1}
    bad = httpx2.post(f"{srv.url}/_fake/config", json={"p529": 2})
    assert bad.status_code == 400


def test_unknown_path_is_a_json_404(srv):
    r = httpx2.get(f"{srv.url}/v1/nothing-here", headers=HDRS)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_prompt_past_the_default_context_is_413_not_a_transport_error(cli):
    # ~1.3 MB of JSON: past aiohttp's 1 MB default body limit, so this also checks the server accepts big bodies
    with pytest.raises(anthropic.ContentTooLargeError) as ei:
        cli.messages.create(model=HAIKU, max_tokens=5, messages=user("word " * 250_000))
    assert "prompt is too long: 250003 tokens > 200000 maximum" in ei.value.body["error"]["message"]


def test_error_responses_carry_request_id_and_the_class_rate_limit_headers(tmp_path):
    from runtime.settings import default_limits
    with start_server(tmp_path, api_key="right", limits=default_limits()) as s:
        with pytest.raises(anthropic.AuthenticationError) as ei:
            client(s, api_key="wrong").messages.create(model=SONNET, max_tokens=5, messages=user("x"))
        h = ei.value.response.headers
        assert h["request-id"].startswith("req_") and h["anthropic-ratelimit-requests-limit"] == "50"
        with pytest.raises(anthropic.BadRequestError) as ei:
            client(s, api_key="right").messages.create(model=SONNET, max_tokens=5, messages=[])
        assert "anthropic-ratelimit-input-tokens-remaining" in ei.value.response.headers
