"""The HTTP front door on Ray Serve, driven by the real anthropic SDK with keys made by the real CLI."""

import json
import socket
import subprocess
import sys

import anthropic
import httpx2
import pytest
import ray

from tests.runtime_fixtures import fake_post, fake_url, fast_settings, read_billing, start_local, wait_for

HAIKU = "claude-haiku-5-5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_key(data_dir, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "keys", "create", "--data-dir", str(data_dir),
                          *args], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()[-1]


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    from ray import serve

    from actors.serve import run_front_door
    from runtime.keys import KeyStore

    data_dir = tmp_path_factory.mktemp("frontdoor")
    rt = start_local(fast_settings(data_dir))
    store = KeyStore.in_dir(rt.settings.data_dir)
    keys = {
        "plain": _cli_key(data_dir, "--user", "alice", "--tenant", "acme"),  # the CLI, as an operator would
        "limited": store.create("bob", "acme", rpm=2)[0],
        "poor": store.create("carol", budget_usd=0.00001)[0],
        "revoked": store.create("dave")[0],
    }
    for attempt in range(3):
        # a port free when asked can be taken by a Ray worker before Serve's proxy binds it: ask for another
        try:
            url = run_front_door(port=_free_port())
            break
        except Exception:  # noqa: BLE001
            serve.shutdown()
            if attempt == 2:
                raise
    yield rt, url, keys, data_dir
    serve.shutdown()
    rt.shutdown()
    ray.shutdown()


def _client(url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def _row(rt, request_id: str) -> list[dict]:
    return [r for r in rt.ledger_records() if r["request_id"] == request_id]


def test_sdk_creates_through_the_front_door_as_the_keys_user(door):
    rt, url, keys, _ = door
    c = _client(url, keys["plain"])
    raw = c.messages.with_raw_response.create(model=HAIKU, max_tokens=64,
                                              messages=[{"role": "user", "content": "Name three rivers."}])
    msg = raw.parse()
    assert msg.content[0].text and msg.usage.output_tokens > 0
    rid = raw.headers["request-id"]
    assert rid.startswith("fd-") and raw.headers["x-claude-runtime-cache"] == "miss"
    (row,) = _row(rt, rid)
    assert (row["user_id"], row["tenant"], row["message_id"]) == ("alice", "acme", msg.id)
    (line,) = [b for b in read_billing(rt.settings) if b["id"] == msg.id]
    assert row["cost_usd"] == pytest.approx(line["cost_usd"])
    # the same question again is a cache hit, answered for $0 in the tenant's scope
    again = c.messages.with_raw_response.create(model=HAIKU, max_tokens=64,
                                                messages=[{"role": "user", "content": "Name three rivers."}])
    assert again.headers["x-claude-runtime-cache"] == "exact" and again.parse().content[0].text == msg.content[0].text


def test_sdk_streams_and_the_ledger_row_is_the_billing_line(door):
    rt, url, keys, _ = door
    c = _client(url, keys["plain"])
    with c.messages.stream(model=HAIKU, max_tokens=200,
                           messages=[{"role": "user", "content": "Stream a short note about glaciers."}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
        rid = s.response.headers["request-id"]
    assert text and text == final.content[0].text
    row = wait_for(lambda: [r for r in _row(rt, rid) if r["message_id"]], what="the stream's ledger row")[0]
    (line,) = [b for b in read_billing(rt.settings) if b["id"] == final.id]
    assert row["message_id"] == final.id
    assert (row["input_tokens"], row["output_tokens"]) == (line["input_tokens"], line["output_tokens"])
    assert row["cost_usd"] == pytest.approx(line["cost_usd"])


def test_stream_frames_are_the_apis(door):
    """Same event sequence and framing as the API itself sends for the same request (pings aside)."""
    rt, url, keys, _ = door
    body = {"model": HAIKU, "max_tokens": 120, "stream": True,
            "messages": [{"role": "user", "content": "Describe a lighthouse at dusk."}]}

    def frames(base: str, key: str, extra: dict) -> list[tuple[str, dict]]:
        r = httpx2.post(f"{base}/v1/messages", json=body, timeout=60,
                        headers={"x-api-key": key, "anthropic-version": "2023-06-01", **extra})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        out = []
        for frame in r.text.split("\n\n"):
            if not frame.strip():
                continue
            ev, data = frame.split("\n")
            assert ev.startswith("event: ") and data.startswith("data: ")
            payload = json.loads(data[len("data: "):])
            assert payload["type"] == ev[len("event: "):]
            out.append((payload["type"], payload))
        return [f for f in out if f[0] != "ping"]

    ours = frames(url, keys["plain"], {"x-claude-runtime-cache": "off"})
    theirs = frames(fake_url(rt), "anything", {})
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    assert ours[-2][1]["usage"]["output_tokens"] == theirs[-2][1]["usage"]["output_tokens"]


def test_sdk_counts_tokens(door):
    rt, url, keys, _ = door
    msgs = [{"role": "user", "content": "How many tokens is this sentence, roughly speaking?"}]
    n = _client(url, keys["plain"]).messages.count_tokens(model=HAIKU, messages=msgs).input_tokens
    direct = anthropic.Anthropic(base_url=fake_url(rt), api_key="x", max_retries=0)
    assert n == direct.messages.count_tokens(model=HAIKU, messages=msgs).input_tokens > 0


def test_wrong_and_revoked_keys_get_authentication_error(door):
    rt, url, keys, data_dir = door
    with pytest.raises(anthropic.AuthenticationError) as exc:
        _client(url, "crk_000000000000_" + "x" * 43).messages.create(model=HAIKU, max_tokens=8,
                                                                      messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["error"]["type"] == "authentication_error"
    c = _client(url, keys["revoked"])
    c.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "hello there"}])
    key_id = keys["revoked"].split("_")[1]
    subprocess.run([sys.executable, "-m", "runtime.cli", "keys", "revoke", key_id, "--data-dir", str(data_dir)],
                   check=True, capture_output=True, timeout=120)
    with pytest.raises(anthropic.AuthenticationError):
        c.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "hello again"}])


def test_errors_arrive_as_the_sdks_classes(door):
    rt, url, keys, _ = door
    with pytest.raises(anthropic.BadRequestError) as bad:
        _client(url, keys["plain"]).messages.create(model="claude-nonexistent-1", max_tokens=8,
                                                    messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert bad.value.body["request_id"].startswith("fd-")
    with pytest.raises(anthropic.PaymentRequiredError) as poor:
        _client(url, keys["poor"]).messages.create(model=HAIKU, max_tokens=64,
                                                   messages=[{"role": "user", "content": "hi"}])
    assert poor.value.body["error"]["type"] == "billing_error"
    limited = _client(url, keys["limited"])
    got = [limited.messages.with_raw_response.create(model=HAIKU, max_tokens=8,
                                                     messages=[{"role": "user", "content": f"q{i}"}])
           for i in range(2)]
    assert got[-1].headers["anthropic-ratelimit-requests-limit"] == "2"
    assert got[-1].headers["anthropic-ratelimit-requests-remaining"] == "0"
    with pytest.raises(anthropic.RateLimitError) as slow:
        limited.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "q3"}])
    assert int(slow.value.response.headers["retry-after"]) >= 1
    # an upstream that fails everywhere is the API's 529
    fake_post(rt, "/_fake/config", {"p529": 1.0})
    try:
        with pytest.raises(anthropic.OverloadedError):
            _client(url, keys["plain"]).messages.create(model=HAIKU, max_tokens=8,
                                                        messages=[{"role": "user", "content": "overload me"}])
    finally:
        fake_post(rt, "/_fake/config", {"p529": 0.0})


def test_a_client_that_disconnects_mid_stream_is_still_billed(door):
    rt, url, keys, _ = door
    fake_post(rt, "/_fake/config", {"output_tokens_per_s": 100.0})
    try:
        body = {"model": HAIKU, "max_tokens": 120, "stream": True,
                "messages": [{"role": "user", "content": "Tell a long story about a patient lighthouse keeper."}]}
        with httpx2.Client(timeout=60) as http:
            with http.stream("POST", f"{url}/v1/messages", json=body,
                             headers={"x-api-key": keys["plain"], "x-claude-runtime-cache": "off"}) as r:
                assert r.status_code == 200
                rid = r.headers["request-id"]
                seen = b""
                for chunk in r.iter_bytes():
                    seen += chunk
                    if b"content_block_delta" in seen:
                        break  # leave with most of the answer still to come
        assert b"message_stop" not in seen
        row = wait_for(lambda: [x for x in _row(rt, rid) if x["message_id"]], timeout_s=60,
                       what="the abandoned stream's ledger row")[0]
        (line,) = [b for b in read_billing(rt.settings) if b["id"] == row["message_id"]]
        assert (row["input_tokens"], row["output_tokens"]) == (line["input_tokens"], line["output_tokens"])
        assert row["output_tokens"] > 10 and row["cost_usd"] == pytest.approx(line["cost_usd"])
    finally:
        fake_post(rt, "/_fake/config", {"output_tokens_per_s": None})
