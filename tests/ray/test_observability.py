"""Metrics on Ray's Prometheus endpoint, the JSON request log in the workers' logs, and `claude-runtime status`,
against a real local Ray and the embedded API."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import ray

import runtime
from tests.runtime_fixtures import fake_post, fast_settings, user_msg

SECRET = "zebra-moonlight-7731"   # a phrase in a prompt: it must reach no log line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="observability_tests",
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500})
    settings = fast_settings(tmp_path_factory.mktemp("obs"), callers={"num_callers": 1, "scale_interval_s": 0.5},
                             budgets={"daily_usd": 50.0}, observability={"gauge_interval_s": 0.5})
    rt = runtime.start(settings)
    rt.metrics_port = port
    yield rt
    rt.shutdown()
    ray.shutdown()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _wait_for(port: int, *patterns: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = _metrics(port)
        missing = [p for p in patterns if not re.search(p, text)]
        if not missing:
            return text
        assert time.monotonic() < deadline, f"metrics never showed {missing}"
        time.sleep(0.25)


def test_metrics_reach_rays_prometheus_endpoint(rt):
    q = f"Explain how a {SECRET} differs from a hash map."
    first = ray.get(rt.submit(user_msg(q, 400), tenant="obs", user_id="u1"))
    hit = ray.get(rt.submit(user_msg(q, 400), tenant="obs", user_id="u1"))
    assert (first.cache, hit.cache) == ("miss", "exact")
    opus = rt.settings.router.opus_model
    fake_post(rt, "/_fake/config", {"p529_by_class": {"opus": 1.0}})
    try:
        fell = ray.get(rt.submit(user_msg("Summarize: observability of fallbacks.", 32, model=opus), cache=False))
    finally:
        fake_post(rt, "/_fake/config", {"p529_by_class": {}})
    assert fell.model != opus
    text = _wait_for(
        rt.metrics_port,
        r'ray_claude_runtime_requests_total\{[^}]*cache="miss"[^}]*outcome="ok"',
        r'ray_claude_runtime_requests_total\{[^}]*cache="exact"',
        r'ray_claude_runtime_tokens_total\{[^}]*kind="output"',
        r"ray_claude_runtime_spend_usd_total\{",
        r"ray_claude_runtime_saved_usd_total\{",
        r'ray_claude_runtime_attempt_failures_total\{[^}]*status="529"',
        r"ray_claude_runtime_fallbacks_total\{",
        r'ray_claude_runtime_limiter_wait_seconds_bucket\{[^}]*model_class="',
        r"ray_claude_runtime_latency_seconds_count\{",
        r'ray_claude_runtime_budget_used_ratio\{[^}]*budget="daily"',
        r'ray_claude_runtime_callers\{[^}]*state="active"',
        r"ray_claude_runtime_cache_entries\{",
    )
    # the counters count: at least the three answers and the one hit
    ok = sum(float(v) for v in re.findall(r'ray_claude_runtime_requests_total\{[^}]*outcome="ok"[^}]*\} (\S+)',
                                          text))
    assert ok >= 3
    assert SECRET not in text


def test_one_json_line_per_request_with_no_prompt_or_answer(rt):
    res = ray.get(rt.submit(user_msg(f"Define the word {SECRET}.", 48), tenant="logs", cache=False))
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    deadline = time.monotonic() + 30
    while True:
        lines = []
        blob = ""
        # the request log's own files, and the workers' output: neither may hold the prompt or the answer
        for path in glob.glob(os.path.join(logs, "claude_runtime_requests-*")) + glob.glob(os.path.join(logs,
                                                                                                       "worker-*")):
            with open(path, errors="replace") as f:
                text = f.read()
            blob += text
            lines += [json.loads(x) for x in text.splitlines() if x.startswith("{") and '"event":"request"' in x]
        mine = [x for x in lines if x["request_id"] == res.request_id]
        if mine:
            break
        assert time.monotonic() < deadline, "no request log line"
        time.sleep(0.2)
    assert len(mine) == 1
    line = mine[0]
    assert line["model"] == res.model and line["cache"] == "bypass" and line["attempts"] == 1
    assert line["output_tokens"] == res.message.usage.output_tokens and line["latency_s"] > 0
    assert SECRET not in blob and res.text not in blob


def test_status_shows_callers_buckets_budgets_and_cache(rt):
    fake_post(rt, "/_fake/config", {"latency_ms": 1500})
    try:
        refs = [rt.submit(user_msg(f"status question {i}", 16), cache=False) for i in range(5)]
        deadline = time.monotonic() + 30
        while True:
            st = rt.status()
            if st["callers"]["in_flight"] >= 5:
                break
            assert time.monotonic() < deadline, st["callers"]
            time.sleep(0.1)
    finally:
        fake_post(rt, "/_fake/config", {"latency_ms": 0})
    ray.get(refs)
    assert st["callers"]["active"] == 1 and st["callers"]["members"][0]["name"] == "caller-0"
    assert "sonnet/rpm" in st["bucket_levels"] or "haiku/rpm" in st["bucket_levels"]
    assert st["budgets"]["daily"]["limit_usd"] == 50.0 and st["budgets"]["daily"]["settled_usd"] > 0
    assert st["cache"]["entries"] >= 1 and "leases" in st
    from runtime.status import render

    shown = render(st)
    assert "caller-0" in shown and "budgets" in shown and "daily" in shown


def test_status_cli_attaches_from_another_driver(rt):
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "status", "--json"], capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    st = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert st["callers"]["active"] == 1 and st["cache"]["entries"] >= 1
