"""Bedrock / Vertex specifics of the fake API that need no server: model ids, bodies, credentials, error shapes
and the AWS event-stream framing (decoded by botocore, the decoder the SDK's Bedrock client uses)."""

from __future__ import annotations

import base64
import json

import pytest

from runtime.fake_api import platforms
from runtime.fake_api.platforms import BEDROCK, VERTEX
from runtime.fake_api.protocol import ApiError
from runtime.settings import default_models

MODELS = default_models()


@pytest.mark.parametrize("pid,want", [
    ("anthropic.claude-sonnet-5-5-v1:0", "claude-sonnet-5-5"),
    ("us.anthropic.claude-sonnet-5-5-v1:0", "claude-sonnet-5-5"),
    ("global.anthropic.claude-haiku-5-5-20261001-v1:0", "claude-haiku-5-5"),
    ("apac.anthropic.claude-opus-4-7-v2", "claude-opus-4-7"),
    ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.anthropic.claude-haiku-4-5-20251001-v1:0",
     "claude-haiku-4-5"),
    ("claude-sonnet-5-5", None),                       # Bedrock always names the provider and a version
    ("anthropic.claude-imaginary-9-v1:0", None),
    ("meta.llama3-70b-instruct-v1:0", None),
])
def test_bedrock_model_ids(pid, want):
    assert platforms.resolve_model(BEDROCK, pid, MODELS, {}) == want


@pytest.mark.parametrize("pid,want", [
    ("claude-sonnet-5-5@20261001", "claude-sonnet-5-5"),
    ("claude-haiku-5-5", "claude-haiku-5-5"),
    ("claude-opus-4-1@latest", "claude-opus-4-1"),
    ("claude-imaginary-9@20260101", None),
    ("anthropic.claude-sonnet-5-5-v1:0", None),
])
def test_vertex_model_ids(pid, want):
    assert platforms.resolve_model(VERTEX, pid, MODELS, {}) == want


def test_explicit_platform_models_win_and_must_name_a_registry_model():
    explicit = {"my-profile-arn": "claude-opus-5", "claude-sonnet-5-5@20261001": "claude-haiku-5-5",
                "dangling": "claude-not-configured"}
    assert platforms.resolve_model(BEDROCK, "my-profile-arn", MODELS, explicit) == "claude-opus-5"
    assert platforms.resolve_model(VERTEX, "claude-sonnet-5-5@20261001", MODELS, explicit) == "claude-haiku-5-5"
    assert platforms.resolve_model(VERTEX, "dangling", MODELS, explicit) is None


def test_platform_body_rules():
    body = {"anthropic_version": "bedrock-2023-05-31", "anthropic_beta": ["x"], "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}
    inner = platforms.platform_body(BEDROCK, body, "claude-haiku-5-5")
    assert inner == {"model": "claude-haiku-5-5", "max_tokens": 5, "messages": body["messages"]}
    for extra in ("model", "stream"):
        with pytest.raises(ApiError, match=f"extraneous key \\[{extra}\\]"):
            platforms.platform_body(BEDROCK, {**body, extra: True}, "claude-haiku-5-5")
    # Vertex keeps `stream` in the body
    vbody = {**body, "anthropic_version": "vertex-2023-10-16", "stream": True}
    assert platforms.platform_body(VERTEX, vbody, "claude-haiku-5-5")["stream"] is True
    for p in (BEDROCK, VERTEX):
        with pytest.raises(ApiError) as ei:
            platforms.platform_body(p, {"max_tokens": 5, "messages": []}, "claude-haiku-5-5")
        assert ei.value.status == 400 and "anthropic_version" in ei.value.message


def test_credentials_are_required_and_named_by_access_key_not_signature():
    sig = ("AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20261125/us-east-1/bedrock/aws4_request, "
           "SignedHeaders=host;x-amz-date, Signature=")
    a = platforms.credential(BEDROCK, {"authorization": sig + "aa" * 32})
    b = platforms.credential(BEDROCK, {"authorization": sig + "bb" * 32})
    assert a == b == "aws:AKIAEXAMPLE"
    assert platforms.credential(BEDROCK, {"authorization": "Bearer bedrock-api-key"}) != a
    assert platforms.credential(VERTEX, {"authorization": "Bearer ya29.token"}) == "gcp:ya29.token"
    for p, hdrs in ((BEDROCK, {}), (BEDROCK, {"authorization": "Basic xyz"}), (VERTEX, {}),
                    (VERTEX, {"authorization": "Bearer "})):
        with pytest.raises(ApiError) as ei:
            platforms.credential(p, hdrs)
        assert ei.value.status == 401


@pytest.mark.parametrize("status,want_status,kind", [
    (400, 400, "ValidationException"), (401, 401, "UnrecognizedClientException"),
    (413, 400, "ValidationException"), (429, 429, "ThrottlingException"), (500, 500, "InternalServerException"),
    (529, 503, "ServiceUnavailableException"),
])
def test_bedrock_error_shapes(status, want_status, kind):
    got_status, body, headers = platforms.bedrock_error(ApiError(status, "detail"))
    assert got_status == want_status
    assert set(json.loads(body)) == {"message"}
    assert headers["x-amzn-ErrorType"].startswith(kind + ":")


def test_vertex_front_errors_are_google_shaped_and_model_errors_pass_through():
    for status, google in ((401, "UNAUTHENTICATED"), (404, "NOT_FOUND"), (429, "RESOURCE_EXHAUSTED")):
        body = json.loads(platforms.vertex_front_error(ApiError(status, "m")))
        assert body["error"]["code"] == status and body["error"]["status"] == google
    for status in (400, 413, 500, 529):
        assert platforms.vertex_front_error(ApiError(status, "m")) is None


def test_event_stream_frames_decode_with_botocore():
    eventstream = pytest.importorskip("botocore.eventstream")
    events = [{"type": "message_start", "message": {"id": "msg_1"}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "héllo " * 50}},
              {"type": "message_stop"}]
    wire = b"".join(platforms.bedrock_chunk(e) for e in events)
    buf = eventstream.EventStreamBuffer()
    # fed in uneven pieces, as a socket delivers them; the buffer checks both CRCs of every frame
    for i in range(0, len(wire), 37):
        buf.add_data(wire[i:i + 37])
    got = list(buf)
    assert len(got) == 3
    for msg, want in zip(got, events):
        assert msg.headers[":event-type"] == "chunk" and msg.headers[":message-type"] == "event"
        payload = json.loads(msg.payload)
        assert json.loads(base64.b64decode(payload["bytes"])) == want
