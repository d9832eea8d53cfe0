"""A timeout after the send, against a real server that keeps working: the transport says "maybe billed", and
the server's bill proves it was right to."""

import asyncio
import time

import pytest

from runtime.fake_api.billing import read_billing
from runtime.settings import RetrySettings
from runtime.transport import CallFailed, SdkTransport
from tests.fake_api_fixtures import start_server


def test_a_timeout_after_the_send_is_maybe_billed_and_the_server_bills_it(tmp_path):
    srv = start_server(tmp_path, output_tokens_per_s=40.0, output_tokens=128)  # ~3 s per answer
    try:
        retry = RetrySettings(request_timeout_s=0.5, min_output_tokens_per_s=10_000.0)
        t = SdkTransport(retry, api_key="k", base_url=srv.url)
        params = {"max_tokens": 200, "messages": [{"role": "user", "content": "Describe an estuary."}]}
        with pytest.raises(CallFailed) as exc:
            asyncio.run(t.create("claude-haiku-5-5", params, request_id="late-1", attempt=1, max_tokens=200))
        assert exc.value.sent == "maybe" and exc.value.timed_out and exc.value.status == 0
        deadline = time.monotonic() + 30
        while not [b for b in read_billing(tmp_path / "billing.jsonl") if b["runtime_request_id"] == "late-1"]:
            assert time.monotonic() < deadline, "the server never billed the abandoned call"
            time.sleep(0.05)
        line = [b for b in read_billing(tmp_path / "billing.jsonl") if b["runtime_request_id"] == "late-1"][0]
        assert line["runtime_attempt"] == 1 and line["output_tokens"] == 128
    finally:
        srv.stop()


def test_a_refused_connection_was_not_sent():
    t = SdkTransport(RetrySettings(connect_timeout_s=1.0), api_key="k", base_url="http://127.0.0.1:9")
    with pytest.raises(CallFailed) as exc:
        asyncio.run(t.create("claude-haiku-5-5", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
                             request_id="r", attempt=1, max_tokens=5))
    assert exc.value.sent == "no"
