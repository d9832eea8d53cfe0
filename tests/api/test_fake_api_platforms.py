"""Bedrock- and Vertex-shaped calls through the SDK's own platform clients (AnthropicBedrock with SigV4 or a
Bedrock API key, AnthropicVertex with an access token) against a real fake API server."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from runtime.fake_api import read_billing
from runtime.settings import ClassLimits
from tests.fake_api_fixtures import HAIKU, SONNET, async_client, bedrock, client, start_server, user, vertex

pytest.importorskip("botocore", reason="the SDK's Bedrock client needs the platforms extra (boto3/botocore)")

BEDROCK_SONNET = "us.anthropic.claude-sonnet-5-5-v1:0"
BEDROCK_HAIKU = "anthropic.claude-haiku-5-5-20261001-v1:0"
VERTEX_SONNET = "claude-sonnet-5-5@20261001"


def test_bedrock_invoke_and_stream_are_answered_priced_and_billed(tmp_path):
    with start_server(tmp_path) as s:
        b = bedrock(s)
        raw = b.messages.with_raw_response.create(model=BEDROCK_SONNET, max_tokens=64, messages=user("hello"))
        m = raw.parse()
        assert m.model == SONNET and m.content[0].text and m.usage.input_tokens > 0
        # what an Anthropic request for the same model and prompt would be told
        same = client(s).messages.create(model=SONNET, max_tokens=64, messages=user("hello"))
        assert m.content[0].text == same.content[0].text and m.usage == same.usage
        assert raw.headers["x-amzn-bedrock-output-token-count"] == str(m.usage.output_tokens)
        assert not any(h.startswith("anthropic-ratelimit") for h in raw.headers)
        with b.messages.stream(model=BEDROCK_HAIKU, max_tokens=256, messages=user("stream me")) as st:
            assert st.response.headers["content-type"] == "application/vnd.amazon.eventstream"
            text = "".join(st.text_stream)
            final = st.get_final_message()
        assert text == final.content[0].text and final.model == HAIKU and final.stop_reason == "end_turn"
        lines = read_billing(tmp_path / "billing.jsonl")
        assert [ln["platform"] for ln in lines] == ["bedrock", "anthropic", "bedrock"]
        assert lines[0]["platform_model"] == BEDROCK_SONNET and lines[0]["model"] == SONNET
        assert lines[2]["platform_model"] == BEDROCK_HAIKU and lines[2]["output_tokens"] == final.usage.output_tokens
        # one AWS access key signs every request differently, yet is one caller
        assert lines[0]["api_key_id"] == lines[2]["api_key_id"] != lines[1]["api_key_id"]
        assert lines[0]["cost_usd"] == lines[1]["cost_usd"] > 0
        assert "AKIA" not in (tmp_path / "billing.jsonl").read_text()
        assert s.stats()["billed_by_platform"] == {"bedrock": 2, "anthropic": 1}


async def test_bedrock_async_client_and_bedrock_api_key(tmp_path):
    with start_server(tmp_path) as s:
        ab = anthropic.AsyncAnthropicBedrock(api_key="bedrock-api-key-1", aws_region="eu-west-1", base_url=s.url,
                                             max_retries=0)
        async with ab:
            m = await ab.messages.create(model="eu.anthropic.claude-haiku-5-5-v1:0", max_tokens=20,
                                         messages=user("async"))
            async with ab.messages.stream(model=BEDROCK_HAIKU, max_tokens=20, messages=user("async")) as st:
                final = await st.get_final_message()
        assert final.content[0].text == m.content[0].text
        lines = read_billing(tmp_path / "billing.jsonl")
        assert lines[0]["api_key_id"] == lines[1]["api_key_id"]
        assert "bedrock-api-key-1" not in (tmp_path / "billing.jsonl").read_text()


def test_bedrock_errors_have_bedrock_shapes(tmp_path):
    lim = ClassLimits(rpm=1, itpm=10**6, otpm=10**6)
    with start_server(tmp_path, limits={"haiku": lim}, p529_by_class={"sonnet": 1.0}) as s:
        b = bedrock(s)
        with pytest.raises(anthropic.BadRequestError) as ei:
            b.messages.create(model="anthropic.claude-imaginary-9-v1:0", max_tokens=5, messages=user("x"))
        assert ei.value.body == {"message": "The provided model identifier is invalid."}
        assert ei.value.response.headers["x-amzn-ErrorType"].startswith("ValidationException")
        b.messages.create(model=BEDROCK_HAIKU, max_tokens=5, messages=user("x"))
        with pytest.raises(anthropic.RateLimitError) as ei:  # rpm=1 for haiku, shared with every platform
            b.messages.create(model=BEDROCK_HAIKU, max_tokens=5, messages=user("x"))
        assert ei.value.response.headers["x-amzn-ErrorType"].startswith("ThrottlingException")
        assert "retry-after" not in ei.value.response.headers
        with pytest.raises(anthropic.RateLimitError):
            client(s).messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        # overloaded is a 503 ServiceUnavailableException on Bedrock, not a 529
        with pytest.raises(anthropic.InternalServerError) as ei:
            b.messages.create(model=BEDROCK_SONNET, max_tokens=5, messages=user("x"))
        assert ei.value.status_code == 503 and not isinstance(ei.value, anthropic.OverloadedError)
        with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
            b.messages.create(model=BEDROCK_HAIKU, max_tokens=0, messages=user("x"))
        # raw requests: no credentials, a body in the Anthropic shape, no anthropic_version
        url = f"{s.url}/model/{BEDROCK_HAIKU}/invoke"
        body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": user("x")}
        r = httpx2.post(url, json=body)
        assert r.status_code == 401 and r.headers["x-amzn-ErrorType"].startswith("UnrecognizedClientException")
        auth = {"authorization": "Bearer k"}
        assert "extraneous key [model]" in httpx2.post(url, headers=auth, json={**body, "model": HAIKU}).text
        no_version = {k: v for k, v in body.items() if k != "anthropic_version"}
        assert "anthropic_version" in httpx2.post(url, headers=auth, json=no_version).text
        assert s.stats()["billed"] == 1


def test_bedrock_has_no_count_tokens_or_batches_in_the_sdk(tmp_path):
    with start_server(tmp_path) as s:
        with pytest.raises(anthropic.AnthropicError, match="not supported in Bedrock"):
            bedrock(s).messages.count_tokens(model=BEDROCK_HAIKU, messages=user("x"))


@pytest.mark.parametrize("v1", [True, False])
def test_vertex_raw_predict_stream_and_count_tokens(tmp_path, v1):
    with start_server(tmp_path) as s:
        v = vertex(s, v1=v1)
        m = v.messages.create(model=VERTEX_SONNET, max_tokens=64, messages=user("hello vertex"))
        assert m.model == SONNET and m.content[0].text
        with v.messages.stream(model="claude-haiku-5-5", max_tokens=64, messages=user("stream vertex")) as st:
            assert st.response.headers["content-type"].startswith("text/event-stream")
            final = st.get_final_message()
        n = v.messages.count_tokens(model=VERTEX_SONNET, messages=user("hello vertex"))
        assert n.input_tokens == m.usage.input_tokens
        lines = read_billing(tmp_path / "billing.jsonl")
        assert [(ln["platform"], ln["platform_model"], ln["model"]) for ln in lines] == [
            ("vertex", VERTEX_SONNET, SONNET), ("vertex", "claude-haiku-5-5", HAIKU)]
        assert lines[1]["output_tokens"] == final.usage.output_tokens
        assert s.stats()["count_tokens"] == 1


async def test_vertex_errors_front_end_in_google_shape_model_errors_in_anthropic_shape(tmp_path):
    lim = ClassLimits(rpm=1, itpm=10**6, otpm=10**6)
    with start_server(tmp_path, limits={"sonnet": lim}, p529_by_class={"haiku": 1.0}) as s:
        v = vertex(s)
        with pytest.raises(anthropic.NotFoundError) as ei:
            v.messages.create(model="claude-imaginary-9@20260101", max_tokens=5, messages=user("x"))
        assert ei.value.body["error"]["status"] == "NOT_FOUND"
        v.messages.create(model=VERTEX_SONNET, max_tokens=5, messages=user("x"))
        with pytest.raises(anthropic.RateLimitError) as ei:
            v.messages.create(model=VERTEX_SONNET, max_tokens=5, messages=user("x"))
        assert ei.value.body["error"]["status"] == "RESOURCE_EXHAUSTED"
        with pytest.raises(anthropic.OverloadedError) as ei:
            v.messages.create(model="claude-haiku-5-5@20261001", max_tokens=5, messages=user("x"))
        assert ei.value.body["error"]["type"] == "overloaded_error"
        with pytest.raises(anthropic.BadRequestError) as ei:
            v.messages.create(model=VERTEX_SONNET, max_tokens=5, messages=[{"role": "user", "content": ""}])
        assert ei.value.body["error"]["type"] == "invalid_request_error"
        av = anthropic.AsyncAnthropicVertex(region="us-east5", project_id="p", access_token="t",
                                            base_url=s.url + "/v1", max_retries=0)
        async with av:
            with pytest.raises(anthropic.RateLimitError):
                await av.messages.create(model=VERTEX_SONNET, max_tokens=5, messages=user("x"))
        path = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-haiku-5-5:rawPredict"
        r = httpx2.post(s.url + path, json={"anthropic_version": "vertex-2023-10-16", "max_tokens": 5,
                                           "messages": user("x")})
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
        r = httpx2.post(s.url + path.replace(":rawPredict", ":predict"), headers={"authorization": "Bearer t"},
                        json={})
        assert r.status_code == 404
        assert s.stats()["billed"] == 1


def test_platform_model_ids_configurable_at_start_and_at_run_time(tmp_path):
    with start_server(tmp_path, platform_models={"arn:aws:bedrock:us-east-1:1:application-inference-profile/x1":
                                                 HAIKU}) as s:
        arn = "arn:aws:bedrock:us-east-1:1:application-inference-profile/x1"
        assert bedrock(s).messages.create(model=arn, max_tokens=5, messages=user("x")).model == HAIKU
        with pytest.raises(anthropic.NotFoundError):
            vertex(s).messages.create(model="house-model", max_tokens=5, messages=user("x"))
        assert s.configure(platform_models={"house-model": SONNET})["platform_models"] == {"house-model": SONNET}
        assert vertex(s).messages.create(model="house-model", max_tokens=5, messages=user("x")).model == SONNET


async def test_anthropic_clients_still_reach_the_same_server(tmp_path):
    with start_server(tmp_path) as s:
        async with async_client(s) as ac:
            m = await ac.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        assert m.id and read_billing(tmp_path / "billing.jsonl")[0]["platform"] == "anthropic"
