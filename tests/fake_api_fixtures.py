"""Helpers for the fake API's tests: a real server on a free port, real SDK clients pointed at it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import anthropic
import pytest

from runtime.fake_api import FakeApiConfig, FakeApiServer

HAIKU = "claude-haiku-5-5"      # class haiku, tokenizer v2
SONNET = "claude-sonnet-5-5"    # class sonnet, tokenizer v2
HAIKU_V1 = "claude-haiku-4-5"   # class haiku, tokenizer v1
KEY = "sk-test-key"
# an Admin API key's shape, built at run time so no key-like literal sits in the source
ADMIN_KEY = "sk-ant-" + "admin01-" + "t" * 20


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def start_server(tmp_path: Path, **overrides: Any) -> FakeApiServer:
    overrides.setdefault("limits", None)
    overrides.setdefault("billing_path", tmp_path / "billing.jsonl")
    overrides.setdefault("batch_seconds", 0.3)
    return FakeApiServer(FakeApiConfig(**overrides)).start()


def client(srv: FakeApiServer, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("api_key", KEY)
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=srv.url, **kw)


def bedrock(srv: FakeApiServer, **kw: Any) -> anthropic.AnthropicBedrock:
    """The SDK's Bedrock client with dummy AWS credentials: requests are really SigV4-signed (botocore)."""
    if "api_key" not in kw:
        kw.setdefault("aws_access_key", "AKIA" + "FAKEFAKEFAKE0001")
        kw.setdefault("aws_secret_key", "not-a-secret")
    kw.setdefault("aws_region", "us-east-1")
    kw.setdefault("max_retries", 0)
    return anthropic.AnthropicBedrock(base_url=srv.url, **kw)


def vertex(srv: FakeApiServer, *, v1: bool = True, **kw: Any) -> anthropic.AnthropicVertex:
    """The SDK's Vertex client with a dummy access token; ``v1`` puts /v1 in the base URL as the SDK's default
    URL has it."""
    kw.setdefault("region", "us-east5")
    kw.setdefault("project_id", "test-project")
    kw.setdefault("access_token", "ya29.dummy-token")
    kw.setdefault("max_retries", 0)
    return anthropic.AnthropicVertex(base_url=srv.url + ("/v1" if v1 else ""), **kw)


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll an observable condition (server stats, a file) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def async_client(srv: FakeApiServer, **kw: Any) -> anthropic.AsyncAnthropic:
    kw.setdefault("api_key", KEY)
    kw.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(base_url=srv.url, **kw)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[FakeApiServer]:
    s = start_server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def cli(srv: FakeApiServer) -> Iterator[anthropic.Anthropic]:
    c = client(srv)
    try:
        yield c
    finally:
        c.close()
