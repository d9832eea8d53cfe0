"""A real-looking key used for real calls is found nowhere: not in logs, ledger rows, cache rows, exception
texts, pickled handles or reprs; nor is the alert webhook's URL."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import ray

import runtime
from runtime.errors import ClaudeRuntimeError
from runtime.fake_api import FakeApiConfig, FakeApiServer
from tests.runtime_fixtures import fast_settings, user_msg

pytestmark = pytest.mark.ray

# built at run time: no key-shaped literal sits in the source
KEY = "-".join(["sk", "ant", "api03", "RECOGNISABLE" + "x7Q2" * 10, "AA"])


def _grep(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def test_a_recognisable_key_appears_nowhere(tmp_path):
    # the key must really travel: the API refuses any other
    srv = FakeApiServer(FakeApiConfig(api_key=KEY, limits=None, billing_path=tmp_path / "api" / "billing.jsonl",
                                      latency_ms=0.0)).start()
    webhook = "https://hooks.example.test/services/T000/B000/" + "s3cr3t" * 4
    try:
        settings = fast_settings(tmp_path / "data", api_key=KEY, base_url=srv.url,
                                 alerts={"webhook_url": webhook, "request_usd": 10.0})
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="secrets_test")
        rt = runtime.start(settings)
        errors: list[BaseException] = []
        try:
            ok = ray.get(rt.submit(user_msg("Explain what a hash map is.", 64), tenant="t1"))
            assert ok.message.content  # the key worked
            ray.get(rt.submit(user_msg("Explain what a hash map is.", 64), tenant="t1"))  # a cache hit
            for bad in (user_msg("x", 16, temperature=1.0),):
                try:
                    rt.submit(bad)
                except ClaudeRuntimeError as exc:
                    errors.append(exc)
            bad_cc = {"model": "auto", "max_tokens": 16, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "x", "cache_control": {"type": "forever"}}]}]}
            try:
                ray.get(rt.submit(bad_cc, cache=False))
            except ClaudeRuntimeError as exc:
                errors.append(exc)
            assert len(errors) == 2
            handle_bytes = pickle.dumps(rt)
            connected = runtime.connect()
            texts = [repr(settings), str(settings), repr(rt.settings), repr(connected.settings),
                     repr(ray.get(rt.callers[0].get_settings.remote()))]
            texts += [str(e) for e in errors] + [repr(e) for e in errors]
            texts += [repr(r) for r in rt.ledger_records()]
            session = Path(ray._private.worker._global_node.get_session_dir_path())
        finally:
            rt.shutdown()
            ray.shutdown()
        for needle in (KEY, webhook):
            assert not any(needle in t for t in texts), "a secret in a repr, record or error text"
            assert needle.encode() not in handle_bytes, "a secret in a pickled runtime handle"
            assert _grep(tmp_path / "data", needle.encode()) == [], "a secret in the ledger or cache files"
            assert _grep(session / "logs", needle.encode()) == [], "a secret in Ray's logs"
        assert _grep(tmp_path / "api", KEY.encode()) == [], "the API's own billing log kept the key"
    finally:
        srv.stop()
