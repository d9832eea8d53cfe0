"""Helpers for the fake API's tests: a real server on a free port, real SDK clients pointed at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import anthropic
import pytest

from runtime.fake_api import FakeApiConfig, FakeApiServer

HAIKU = "claude-haiku-5-5"      # class haiku, tokenizer v2
SONNET = "claude-sonnet-5-5"    # class sonnet, tokenizer v2
HAIKU_V1 = "claude-haiku-4-5"   # class haiku, tokenizer v1
KEY = "sk-test-key"


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
