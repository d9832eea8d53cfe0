"""The front door's pure parts: keys stored hashed, key extraction, error replies the SDKs classify, the per-key
rate and daily budget."""

import json
import os

import pytest

from runtime.errors import (AuthenticationError, BudgetExceeded, InvalidRequest, OverloadedAfterFallback,
                            RateLimitedPastDeadline, UpstreamError, UpstreamTimeout)
from runtime.frontdoor import KeyGate, api_key_from, error_reply, parse_body, request_prefix, new_request_id
from runtime.keys import KeyStore, key_id_of
from runtime.request import check_request_id


# -- keys ----------------------------------------------------------------------------------------------------------

def test_a_created_key_authenticates_and_only_its_hash_is_stored(tmp_path):
    store = KeyStore.in_dir(tmp_path)
    key, entry = store.create("u1", "acme", budget_usd=2.5, rpm=30)
    assert key.startswith("crk_") and key_id_of(key) == entry.key_id
    text = (tmp_path / "frontdoor_keys.json").read_text()
    # the secret is everything after "crk_<id>_": base64url, so it may hold "_" itself (splitting on the last one
    # left a one-letter tail that the file always contains, and failed the test once in a while)
    secret = key.split("_", 2)[2]
    assert len(secret) == 43 and key not in text and secret not in text
    assert oct(os.stat(tmp_path / "frontdoor_keys.json").st_mode & 0o777) == "0o600"
    # another process (a front-door replica) reads the file
    other = KeyStore.in_dir(tmp_path)
    got = other.authenticate(key)
    assert got is not None and (got.user_id, got.tenant, got.budget_usd, got.rpm) == ("u1", "acme", 2.5, 30)


def test_wrong_malformed_and_revoked_keys_are_refused(tmp_path):
    store = KeyStore.in_dir(tmp_path)
    key, entry = store.create("u1")
    reader = KeyStore.in_dir(tmp_path)
    assert reader.authenticate(key) is not None
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for bad in (tampered, "", None, "sk-ant-whatever", key + "x", key.replace("crk_", "crx_")):
        assert reader.authenticate(bad) is None
    assert store.revoke(entry.key_id) and not store.revoke(entry.key_id)
    assert reader.authenticate(key) is None  # the reader notices the file changed
    assert [e.key_id for e in reader.list()] == [entry.key_id] and reader.list(include_revoked=False) == []


def test_salt_is_per_store(tmp_path):
    a, b = KeyStore.in_dir(tmp_path / "a"), KeyStore.in_dir(tmp_path / "b")
    a.create("u")
    b.create("u")
    sa = json.loads((tmp_path / "a" / "frontdoor_keys.json").read_text())["salt"]
    sb = json.loads((tmp_path / "b" / "frontdoor_keys.json").read_text())["salt"]
    assert sa != sb


def test_key_options_are_checked(tmp_path):
    store = KeyStore.in_dir(tmp_path)
    for kw in ({"budget_usd": 0}, {"rpm": 0}, {"rpm": 1.5}):
        with pytest.raises(ValueError):
            store.create("u", **kw)
    with pytest.raises(ValueError):
        store.create("")


def test_key_from_either_header():
    assert api_key_from({"x-api-key": "k1"}) == "k1"
    assert api_key_from({"authorization": "Bearer k2"}) == "k2"
    assert api_key_from({"authorization": "bearer   k3 "}) == "k3"
    assert api_key_from({"authorization": "Basic abc"}) is None
    assert api_key_from({}) is None


def test_front_door_request_ids_are_valid_runtime_ids_with_the_key_prefix():
    rid = new_request_id("0123456789ab")
    assert check_request_id(rid) == rid and rid.startswith(request_prefix("0123456789ab"))


# -- error replies ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc,status,etype", [
    (InvalidRequest("bad"), 400, "invalid_request_error"),
    (BudgetExceeded("spent"), 402, "billing_error"),
    (RateLimitedPastDeadline("slow", retry_after_s=2.2), 429, "rate_limit_error"),
    (OverloadedAfterFallback("busy"), 529, "overloaded_error"),
    (UpstreamTimeout("silent"), 504, "timeout_error"),
    (AuthenticationError("401 authentication_error: invalid x-api-key", status=401,
                         error_type="authentication_error"), 500, "api_error"),
    (UpstreamError("404 not_found_error: x", status=404, error_type="not_found_error"), 404, "not_found_error"),
    (UpstreamError("413", status=413, error_type="request_too_large"), 413, "request_too_large"),
    (RuntimeError("secret internals sk-ant-abc"), 500, "api_error"),
])
def test_typed_failures_map_to_the_apis_status_and_type(exc, status, etype):
    r = error_reply(exc)
    assert (r.status, r.error_type) == (status, etype)
    body = json.loads(r.body("req_1"))
    assert body == {"type": "error", "error": {"type": etype, "message": r.message}, "request_id": "req_1"}
    assert "sk-ant" not in r.message and "internals" not in r.message
    if status == 429:
        assert r.headers["retry-after"] == "3"
    if status == 500 and isinstance(exc, AuthenticationError):
        assert "401" not in r.message and "x-api-key" not in r.message


def test_body_must_be_a_json_object():
    assert parse_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"", b"[1]", b"{", b"\xff"):
        with pytest.raises(InvalidRequest):
            parse_body(raw)


# -- the per-key gate -----------------------------------------------------------------------------------------------

class _Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


class _Entry:
    def __init__(self, key_id="k", rpm=None, budget_usd=None):
        self.key_id, self.rpm, self.budget_usd = key_id, rpm, budget_usd


def test_rpm_bucket_refuses_with_retry_after_then_refills():
    clock = _Clock()
    gate = KeyGate(clock=clock)
    e = _Entry(rpm=6)
    for _ in range(6):
        gate.settle(gate.admit(e, 0.0), 0.0)
    with pytest.raises(RateLimitedPastDeadline) as exc:
        gate.admit(e, 0.0)
    assert exc.value.retry_after_s == pytest.approx(10.0)
    assert gate.headers(e)["anthropic-ratelimit-requests-remaining"] == "0"
    clock.t += 10.0
    gate.admit(e, 0.0)
    # another key has its own bucket
    gate.admit(_Entry("other", rpm=6), 0.0)


def test_rpm_is_split_between_replicas():
    clock = _Clock()
    gate = KeyGate(replicas=3, clock=clock)
    e = _Entry(rpm=6)
    gate.admit(e, 0.0)
    gate.admit(e, 0.0)
    with pytest.raises(RateLimitedPastDeadline):
        gate.admit(e, 0.0)


def test_budget_reserves_worst_case_and_settles_actual():
    clock = _Clock()
    gate = KeyGate(clock=clock, refresh_s=60)
    e = _Entry(budget_usd=1.0)
    gate.refreshed("k", 0.2, asked_at=clock.t)
    t1 = gate.admit(e, 0.5)
    with pytest.raises(BudgetExceeded) as exc:
        gate.admit(e, 0.4)  # 0.2 spent + 0.5 in flight + 0.4 > 1.0
    assert exc.value.budget == "key:k:daily"
    gate.settle(t1, 0.05)
    t2 = gate.admit(e, 0.4)
    assert float(gate.headers(e)["x-claude-runtime-budget-remaining-usd"]) == pytest.approx(1.0 - 0.25 - 0.4)
    gate.settle(t2, 0.0)


def test_a_ledger_read_replaces_what_was_settled_before_it_was_asked():
    clock = _Clock()
    gate = KeyGate(clock=clock, refresh_s=1.0)
    e = _Entry(budget_usd=1.0)
    gate.refreshed("k", 0.0, asked_at=clock.t)
    gate.settle(gate.admit(e, 0.3), 0.3)       # in the ledger before the next read was asked
    clock.t += 2
    asked = clock.t
    clock.t += 0.1
    gate.settle(gate.admit(e, 0.2), 0.2)       # settled after the read was asked: may be missing from it
    assert gate.needs_refresh(e)
    gate.refreshed("k", 0.3, asked_at=asked)   # the ledger had the first only
    assert float(gate.headers(e)["x-claude-runtime-budget-remaining-usd"]) == pytest.approx(0.5)
    assert not gate.needs_refresh(e)


def test_a_new_day_starts_a_fresh_budget():
    clock = _Clock(86400 * 100 + 86000)
    gate = KeyGate(clock=clock, refresh_s=1e9)
    e = _Entry(budget_usd=1.0)
    gate.refreshed("k", 0.9, asked_at=clock.t)
    with pytest.raises(BudgetExceeded):
        gate.admit(e, 0.2)
    clock.t += 1000  # past midnight UTC
    assert gate.needs_refresh(e)
    gate.admit(e, 0.2)
