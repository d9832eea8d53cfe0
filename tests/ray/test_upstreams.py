"""Several upstreams: load spread by headroom, failover to the same model elsewhere before a cheaper one,
Bedrock and Vertex through the SDK's platform clients, limits read from the Admin API, live reconfiguration,
and a second named runtime beside the first."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import ray

import runtime
from runtime.errors import ConfigurationError
from runtime.fake_api import FakeApiConfig, FakeApiServer
from runtime.fake_api.billing import read_billing
from runtime.pricing import price
from runtime.result import Result
from runtime.settings import ClassLimits, Settings
from runtime.usage import Usage
from tests.runtime_fixtures import CLASSES, uniform_limits, user_msg

pytestmark = pytest.mark.ray

SONNET = "claude-sonnet-5-5"


def server(tmp_path, name, rpm=300, **kw):
    lim = {c: ClassLimits(rpm=rpm, itpm=10_000_000, otpm=10_000_000) for c in CLASSES}
    return FakeApiServer(FakeApiConfig(limits=lim, billing_path=tmp_path / f"{name}.jsonl", **kw)).start()


def settings(tmp_path, upstreams, **kw):
    base = dict(data_dir=tmp_path / "data", cache={"enabled": False}, callers={"num_callers": 2},
                ledger={"allow_temporary_path": True},
                retry={"backoff_base_s": 0.02, "backoff_max_s": 0.1, "breaker_cooldown_s": 60.0},
                limits=uniform_limits(300, 10_000_000, 10_000_000), upstreams=upstreams)
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def ray_up():
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="upstream_tests", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def two(tmp_path, ray_up):
    a, b = server(tmp_path, "a"), server(tmp_path, "b")
    lim = uniform_limits(300, 10_000_000, 10_000_000)
    ups = [{"name": "ws-a", "base_url": a.url, "api_key": "key-a", "limits": lim},
           {"name": "ws-b", "base_url": b.url, "api_key": "key-b", "limits": lim}]
    rt = runtime.start(settings(tmp_path, ups))
    yield rt, a, b, tmp_path
    rt.shutdown()
    a.stop()
    b.stop()


def test_two_upstreams_carry_twice_the_load_with_no_429_and_a_fair_share_each(two):
    rt, a, b, tmp = two
    t0 = time.monotonic()
    out = list(rt.map([user_msg(f"Spread question {i}", 8, model=SONNET) for i in range(600)],
                      progress=False, max_in_flight=600))
    elapsed = time.monotonic() - t0
    assert all(isinstance(r, Result) for r in out)
    # one upstream at 300 RPM would need about a minute for 600 requests; two share it
    assert elapsed < 40, elapsed
    for srv in (a, b):
        assert srv.stats()["by_status"].get("429", 0) == 0
    share = Counter(r.upstream for r in out)
    assert set(share) == {"ws-a", "ws-b"} and min(share.values()) >= 200, share
    billed = {r["message_id"]: r["upstream"] for r in rt.ledger_records() if r["message_id"]}
    assert {billed[r.message.id] for r in out if r.upstream == "ws-a"} == {"ws-a"}


def test_an_overloaded_upstream_fails_over_to_the_same_model_on_the_other(two):
    rt, a, b, tmp = two
    a.engine.configure({"p529": 1.0})
    out = list(rt.map([user_msg(f"Failover question {i}", 8, model=SONNET) for i in range(100)],
                      progress=False))
    assert all(isinstance(r, Result) for r in out)
    assert {r.model for r in out} == {SONNET}  # quality kept: no step down to a cheaper model
    assert {r.upstream for r in out} == {"ws-b"}
    rows = {r["message_id"]: r for r in rt.ledger_records() if r["message_id"]}
    lines = {x["id"]: x for x in read_billing(tmp / "b.jsonl")}
    for r in out:
        assert rows[r.message.id]["upstream"] == "ws-b" and r.message.id in lines
    assert not [x for x in read_billing(tmp / "a.jsonl")]  # the overloaded one billed nothing


def test_bedrock_and_vertex_shapes_through_the_sdk_platform_clients(tmp_path, ray_up):
    srv = server(tmp_path, "platforms")
    ups = [{"name": "bedrock-us", "kind": "bedrock", "base_url": srv.url, "aws_region": "us-east-1",
            "aws_access_key": "AKIA" + "TEST" * 4, "aws_secret_key": "secret" * 6},
           {"name": "vertex-eu", "kind": "vertex", "base_url": srv.url + "/v1", "project_id": "proj-1",
            "region": "europe-west1", "access_token": "ya29." + "token" * 6, "price_factor": 1.1}]
    rt = runtime.start(settings(tmp_path, ups), name="platforms")
    try:
        out = list(rt.map([user_msg(f"Platform question {i}", 16, model=SONNET) for i in range(20)],
                          progress=False))
        assert all(isinstance(r, Result) for r in out)
        assert {r.upstream for r in out} == {"bedrock-us", "vertex-eu"}
        lines = {x["id"]: x for x in read_billing(tmp_path / "platforms.jsonl")}
        for r in out:
            line = lines[r.message.id]
            assert line["platform"] == ("bedrock" if r.upstream == "bedrock-us" else "vertex")
            factor = 1.1 if r.upstream == "vertex-eu" else 1.0
            assert r.cost_usd == pytest.approx(price(Usage.from_api(r.message.usage), SONNET, rt.settings).total_usd
                                               * factor)
    finally:
        rt.shutdown()
        srv.stop()


def test_limits_come_from_the_admin_api_when_an_admin_key_is_given(tmp_path, ray_up):
    lim = {c: ClassLimits(rpm=123, itpm=45_600, otpm=7_890) for c in CLASSES}
    srv = FakeApiServer(FakeApiConfig(limits=lim, billing_path=tmp_path / "adm.jsonl")).start()
    ups = [{"name": "org", "base_url": srv.url, "api_key": "key", "admin_api_key": "sk-ant-admin01-" + "z" * 20}]
    rt = runtime.start(settings(tmp_path, ups), name="adminlimits")
    try:
        snap = ray.get(rt.limiter.snapshot.remote())["classes"]
        assert snap["org/sonnet"]["rpm"]["limit"] == 123 and snap["org/sonnet"]["otpm"]["limit"] == 7_890
    finally:
        rt.shutdown()
        srv.stop()


def test_restarting_with_other_settings_is_refused_unless_reconfigured_and_names_are_independent(tmp_path,
                                                                                                ray_up):
    srv = server(tmp_path, "reconf")
    ups = [{"name": "one", "base_url": srv.url, "api_key": "k"}]
    rt = runtime.start(settings(tmp_path, ups), name="reconf")
    try:
        assert runtime.start(settings(tmp_path, ups), name="reconf").callers  # same settings: attaches
        changed = settings(tmp_path, ups, budgets={"daily_usd": 5.0},
                           limits=uniform_limits(60, 10_000_000, 10_000_000))
        with pytest.raises(ConfigurationError, match="budgets"):
            runtime.start(changed, name="reconf")
        rt2 = runtime.start(changed, name="reconf", reconfigure=True)
        snap = ray.get(rt2.limiter.snapshot.remote())["classes"]
        assert snap["one/sonnet"]["rpm"]["limit"] == 60  # the new limits apply live
        assert ray.get(rt2.callers[0].get_settings.remote()).budgets.daily_usd == 5.0
        other = runtime.start(settings(tmp_path, ups), name="reconf-b")
        try:
            assert other.namespace != rt2.namespace
            assert ray.get(other.submit(user_msg("hello from b", 8))).upstream == "one"
        finally:
            other.shutdown()
    finally:
        rt.shutdown()
        srv.stop()


def test_reconfigure_closes_the_replaced_sdk_clients_once_their_requests_are_done(tmp_path, ray_up):
    # each reconfigure builds new SDK clients (their own connection pools); the old ones must be closed, but
    # only after the requests that started on them have their answers
    srv = server(tmp_path, "closing", latency_ms=1_500)
    ups = [{"name": "one", "base_url": srv.url, "api_key": "k"}]
    first = settings(tmp_path, ups, callers={"num_callers": 1, "in_process": True})
    rt = runtime.start(first, name="closing")
    try:
        caller = rt._local.caller
        old = list(caller.pipeline.ports.transports.values())
        running = rt._local._submit(rt.acall(user_msg("started before the change", 8)))
        wait_until = time.monotonic() + 30
        while not caller._running and time.monotonic() < wait_until:
            time.sleep(0.01)   # the request is on the old pipeline
        assert caller._running
        runtime.start(settings(tmp_path, ups, callers={"num_callers": 1, "in_process": True},
                               limits=uniform_limits(200, 10_000_000, 10_000_000)), name="closing", reconfigure=True)
        assert caller.pipeline.ports.transports["one"] is not old[0]
        assert not any(t.client.is_closed() for t in old)   # still in use
        assert running.result(timeout=60).message.content   # answered through the old client
        while not all(t.client.is_closed() for t in old) and time.monotonic() < wait_until:
            time.sleep(0.01)
        assert all(t.client.is_closed() for t in old) and not caller._retired
        assert rt.call(user_msg("after the change", 8)).upstream == "one"   # the new client works
    finally:
        rt.shutdown()
        srv.stop()


def test_the_local_api_runs_only_when_asked_and_says_so(tmp_path, ray_up, monkeypatch):
    monkeypatch.setenv("CLAUDE_RUNTIME_FAKE_API", "1")
    rt = runtime.start(Settings(data_dir=tmp_path / "fake", cache={"enabled": False},
                                ledger={"allow_temporary_path": True}), name="optin")
    try:
        res = ray.get(rt.submit(user_msg("hello", 8)))
        assert rt.fake_api is not None and res.upstream == "fake-api"
        assert [r["upstream"] for r in rt.ledger_records() if r["message_id"]] == ["fake-api"]
    finally:
        rt.shutdown()


def test_no_upstream_and_no_opt_in_refuses_to_start(tmp_path, monkeypatch):
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "CLAUDE_RUNTIME_FAKE_API"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("API_KEY", "x")
    monkeypatch.setenv("BASE_URL", "http://y.invalid")
    with pytest.raises(ConfigurationError) as exc:
        runtime.start(Settings(data_dir=tmp_path))
    assert "ANTHROPIC_API_KEY" in str(exc.value) and "fake_api=True" in str(exc.value)
