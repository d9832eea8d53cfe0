"""Helpers shared by the end-to-end tests: start a runtime on a fresh local Ray against the embedded API."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
import ray

import runtime
from runtime import fake_api
from runtime.settings import ClassLimits, Settings, UserLimits

CLASSES = ("haiku", "sonnet", "opus", "fable")


def uniform_limits(rpm: int, itpm: int, otpm: int) -> dict[str, ClassLimits]:
    return {c: ClassLimits(rpm=rpm, itpm=itpm, otpm=otpm) for c in CLASSES}


def wait_for(cond, what: str = "condition", timeout_s: float = 60.0, every_s: float = 0.05):
    """Poll ``cond`` until it returns something truthy and return that; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


async def stats_when(actor, pred, timeout_s: float = 30.0) -> dict[str, Any]:
    """An actor's ``stats()`` once ``pred`` holds (its counters are fed by fire-and-forget calls, or a model
    loads in the background); fail the test after ``timeout_s``."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while True:
        st = await actor.stats.remote()
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"stats never reached the expected state: {st}"
        await asyncio.sleep(0.02)


def fast_settings(data_dir, **over: Any) -> Settings:
    """Generous limits, quick backoff: tests exercise behaviour, not waiting."""
    kw: dict[str, Any] = dict(
        data_dir=data_dir,
        limits=uniform_limits(60_000, 50_000_000, 10_000_000),
        user_limits=UserLimits(rpm=0, tpm=0),
        fake_api=True,  # tests opt in to the embedded local API
        retry={"backoff_base_s": 0.02, "backoff_max_s": 0.1, "breaker_cooldown_s": 1.0},
        callers={"num_callers": 2},
        # a semantic hit must not turn into a bypass because a loaded test machine was slow to embed
        embedding={"deadline_s": 30.0},
    )
    ledger = dict(over.pop("ledger", {}))
    # pytest's folders live under /tmp: the ledger's persistence check would rightly refuse them
    ledger.setdefault("allow_temporary_path", True)
    kw["ledger"] = ledger
    kw.update(over)
    return Settings(**kw)


def start_local(settings: Settings, num_cpus: int = 2, **start_kw: Any) -> runtime.Runtime:
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace="claude_runtime_tests")
    return runtime.start(settings, **start_kw)


def fake_url(rt: runtime.Runtime) -> str:
    return ray.get(rt.fake_api.url.remote())


def fake_post(rt: runtime.Runtime, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(fake_url(rt) + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return json.loads(text) if text else {}


def fake_stats(rt: runtime.Runtime) -> dict[str, Any]:
    return ray.get(rt.fake_api.stats.remote())


def read_billing(settings: Settings) -> list[dict[str, Any]]:
    path = settings.billing_path
    return fake_api.read_billing(path) if path.exists() else []


def user_msg(text: str, max_tokens: int = 128, model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(scope="module")
def ray_local():
    """A bare local Ray for actor tests that start their own actors (namespace claude_runtime)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="claude_runtime",
             log_to_driver=False)
    yield
    ray.shutdown()
