"""Both HTTP backends of the transport (``RetrySettings.http_client``) against real sockets: an answer, a refused
connection (not sent), a timeout after the send and a server that hangs up after reading the request (both maybe
billed). The aiohttp backend reports a hang-up as a connect error; classifying that as "not sent" would drop a
billed call from the ledger."""

from __future__ import annotations

import asyncio
import socket
import threading

import anthropic
import pytest

from runtime.settings import RetrySettings
from runtime.transport import CallFailed, SdkTransport
from tests.fake_api_fixtures import start_server

PARAMS = {"max_tokens": 16, "messages": [{"role": "user", "content": "Name a colour."}]}


def transport(backend: str, base_url: str, retry: RetrySettings | None = None) -> SdkTransport:
    retry = retry or RetrySettings(connect_timeout_s=2.0)
    http = anthropic.DefaultAioHttpClient(timeout=retry.request_timeout_s) if backend == "aiohttp" else None
    return SdkTransport(retry, api_key="k", base_url=base_url, http_client=http)


def call(t: SdkTransport, rid: str = "r1", max_tokens: int = 16):
    params = {**PARAMS, "max_tokens": max_tokens}

    async def go():
        try:
            return await t.create("claude-haiku-5-5", params, request_id=rid, attempt=1, max_tokens=max_tokens)
        finally:
            await t.client.close()  # its aiohttp session belongs to this loop

    return asyncio.run(go())


@pytest.mark.parametrize("backend", ["aiohttp", "httpx"])
def test_an_answer_comes_back_with_its_headers(tmp_path, backend):
    srv = start_server(tmp_path)
    try:
        resp = call(transport(backend, srv.url))
        assert resp.message.content[0].text and resp.message.usage.output_tokens > 0
        assert "request-id" in resp.headers
    finally:
        srv.stop()


@pytest.mark.parametrize("backend", ["aiohttp", "httpx"])
def test_a_refused_connection_was_not_sent(backend):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CallFailed) as exc:
        call(transport(backend, f"http://127.0.0.1:{port}"))
    assert exc.value.sent == "no" and exc.value.status == 0


@pytest.mark.parametrize("backend", ["aiohttp", "httpx"])
def test_a_server_that_hangs_up_after_reading_the_request_may_have_billed_it(backend):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    got = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            got.append(data)
        # closed without a response: the request was read, and may have been processed

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with pytest.raises(CallFailed) as exc:
            call(transport(backend, f"http://127.0.0.1:{srv.getsockname()[1]}"))
        assert got and got[0].startswith(b"POST /v1/messages")
        assert exc.value.sent == "maybe", exc.value
    finally:
        srv.close()
        th.join(timeout=5)


@pytest.mark.parametrize("backend", ["aiohttp", "httpx"])
def test_a_timeout_after_the_send_may_have_been_billed(tmp_path, backend):
    srv = start_server(tmp_path, output_tokens_per_s=40.0, output_tokens=128)  # ~3 s per answer
    try:
        retry = RetrySettings(request_timeout_s=0.5, min_output_tokens_per_s=10_000.0)
        with pytest.raises(CallFailed) as exc:
            call(transport(backend, srv.url, retry), rid=f"late-{backend}", max_tokens=200)
        assert exc.value.sent == "maybe" and exc.value.timed_out
    finally:
        srv.stop()
