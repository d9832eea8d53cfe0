"""SdkTransport over the real anthropic SDK with an httpx2.MockTransport: what each failure means for billing,
streaming for long answers, timeouts sized to max_tokens, count_tokens."""

import asyncio
import json

import httpx2
import pytest

from runtime.settings import RetrySettings
from runtime.transport import (RUNTIME_ATTEMPT_HEADER, RUNTIME_REQUEST_ID_HEADER, CallFailed, SdkTransport,
                               timeouts_for)

PARAMS = {"max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-5-5",
           "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 3, "output_tokens": 1}}


def sse(message: dict) -> bytes:
    start = {**message, "content": [], "usage": {**message["usage"], "output_tokens": 0}}
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": message["content"][0]["text"]}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()


def transport(handler, **retry) -> SdkTransport:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    return SdkTransport(RetrySettings(**retry), api_key="test-key", base_url="http://api.test", http_client=client)


def call(t: SdkTransport, max_tokens: int = 32, **kw):
    return asyncio.run(t.create("claude-haiku-5-5", {**PARAMS, "max_tokens": max_tokens}, request_id="r1",
                                attempt=3, max_tokens=max_tokens))


def error(status: int, etype: str, headers=None):
    def handler(request):
        return httpx2.Response(status, json={"type": "error", "error": {"type": etype, "message": "nope"},
                                             "request_id": "req_api_1"}, headers=headers or {})
    return handler


def test_answer_carries_the_ratelimit_headers_and_our_request_id_and_attempt():
    seen = {}

    def handler(request):
        seen.update(request.headers)
        return httpx2.Response(200, json=MESSAGE, headers={"anthropic-ratelimit-requests-remaining": "7",
                                                            "x-other": "no"})
    resp = call(transport(handler))
    assert resp.message.id == "msg_1" and resp.headers == {"anthropic-ratelimit-requests-remaining": "7"}
    assert seen[RUNTIME_REQUEST_ID_HEADER] == "r1" and seen[RUNTIME_ATTEMPT_HEADER] == "3"


@pytest.mark.parametrize("status,etype", [(529, "overloaded_error"), (429, "rate_limit_error"),
                                          (400, "invalid_request_error"), (500, "api_error")])
def test_an_error_status_was_processed_and_not_billed(status, etype):
    with pytest.raises(CallFailed) as exc:
        call(transport(error(status, etype, {"retry-after": "2"})))
    f = exc.value
    assert (f.status, f.sent, f.error_type, f.retry_after) == (status, "yes", etype, 2.0)
    assert not f.maybe_billed


def test_a_nan_retry_after_is_dropped():
    with pytest.raises(CallFailed) as exc:
        call(transport(error(429, "rate_limit_error", {"retry-after": "nan"})))
    assert exc.value.retry_after is None


def test_a_connection_that_never_opened_was_not_sent():
    def handler(request):
        raise httpx2.ConnectError("refused", request=request)
    with pytest.raises(CallFailed) as exc:
        call(transport(handler))
    assert exc.value.sent == "no" and exc.value.status == 0


def test_a_read_timeout_after_the_send_may_have_been_billed():
    def handler(request):
        raise httpx2.ReadTimeout("slow", request=request)
    with pytest.raises(CallFailed) as exc:
        call(transport(handler))
    assert exc.value.sent == "maybe" and exc.value.timed_out


def test_an_unparseable_answer_may_have_been_billed():
    def handler(request):
        return httpx2.Response(200, content=b"{not json", headers={"content-type": "application/json"})
    with pytest.raises(CallFailed) as exc:
        call(transport(handler))
    assert exc.value.sent == "maybe"


def test_long_requests_are_streamed_and_accumulate_one_message():
    bodies = []

    def handler(request):
        body = json.loads(request.content)
        bodies.append(body)
        if body.get("stream"):
            return httpx2.Response(200, content=sse(MESSAGE), headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=MESSAGE)

    t = transport(handler, stream_above_max_tokens=1_000)
    assert call(t, max_tokens=500).message.content[0].text == "hello" and not bodies[-1].get("stream")
    resp = call(t, max_tokens=5_000)
    assert bodies[-1]["stream"] is True
    assert resp.message.id == "msg_1" and resp.message.content[0].text == "hello"
    assert resp.message.usage.output_tokens == 1


def test_a_stream_cut_after_it_started_may_have_been_billed():
    def handler(request):
        cut = sse(MESSAGE).split(b"event: content_block_stop")[0]
        return httpx2.Response(200, content=cut, headers={"content-type": "text/event-stream"})

    with pytest.raises(CallFailed) as exc:
        call(transport(handler, stream_above_max_tokens=10), max_tokens=100)
    assert exc.value.sent == "maybe"


def test_timeouts_grow_with_max_tokens_so_long_answers_are_not_cut():
    r = RetrySettings(request_timeout_s=120, min_output_tokens_per_s=10, stream_above_max_tokens=4_096)
    short, long = timeouts_for(100, r), timeouts_for(64_000, r)
    assert not short.stream and short.total_s == pytest.approx(130)
    assert long.stream and long.total_s == pytest.approx(120 + 6_400) and long.read_s == r.stream_idle_timeout_s


def test_count_tokens_sends_only_what_counting_reads():
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content))
        return httpx2.Response(200, json={"input_tokens": 42})

    t = transport(handler)
    n = asyncio.run(t.count_tokens("claude-haiku-5-5", {**PARAMS, "metadata": {"user_id": "u"},
                                                        "stop_sequences": ["x"]}))
    assert n == 42 and set(seen) == {"model", "messages"}
