"""Faults in combination, judged against the local API's billing log, never against our own counters.

One run with the cache on: callers are killed while their calls are in flight, then the ledger actor, then
the cache actor. Afterwards every billed response is in the ledger exactly once (under its message id, or as an
unreconciled row of its request and attempt), every request ended in one answer or one typed error, and
after ``rt.reconcile()`` the ledger's total equals the bill's."""

from __future__ import annotations

from collections import Counter

import pytest
import ray

from runtime.errors import ClaudeRuntimeError
from runtime.result import Result
from tests.runtime_fixtures import (fake_post, fake_stats, fast_settings, read_billing, start_local, user_msg,
                                    wait_for)

pytestmark = pytest.mark.ray

TOPICS = ["tidal locking", "the krebs cycle", "b-trees", "raft consensus", "photosynthesis", "tcp slow start",
          "bloom filters", "the doppler effect", "garbage collection", "plate tectonics"]


def workload(n: int) -> list[tuple[dict, str]]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        if i % 4 == 3:   # repeats: exact hits or single-flight waiters
            q = f"Explain {topic} to a new engineer."
        elif i % 4 == 2:  # near paraphrases
            q = f"Explain {topic} to a new engineer"
        else:
            q = f"Question {i}: explain {topic} in {i % 7 + 2} sentences."
        out.append((user_msg(q, 96), f"tenant-{i % 3}"))
    return out


def in_flight(rt) -> int:
    return int(fake_stats(rt)["in_flight"]["total"])


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    # slow answers keep calls in flight long enough to be killed mid-call; a long unreconciled grace keeps the
    # ledger's sweep out of it (the re-runs are what must book the lost calls)
    settings = fast_settings(tmp_path_factory.mktemp("chaos"), ledger={"unreconciled_after_s": 3600},
                             callers={"num_callers": 2})
    rt = start_local(settings)
    fake_post(rt, "/_fake/config", {"latency_ms": 400.0})
    yield rt
    rt.shutdown()
    ray.shutdown()


def test_kills_of_callers_ledger_and_cache_lose_nothing_and_bill_nothing_unrecorded(rt):
    work = workload(90)
    refs: list = []
    kills = Counter()

    def send(batch):
        for req, tenant in batch:
            refs.append(rt.submit(req, tenant=tenant, user_id="chaos"))

    # 1: kill each caller while its calls are on the wire
    send(work[:30])
    for caller in rt.callers:
        wait_for(lambda: in_flight(rt) >= 2, what="calls in flight", every_s=0.02)
        ray.kill(caller, no_restart=False)
        kills["caller"] += 1
    # 2: kill the ledger while calls are in flight (their intents and commits retry across its restart)
    send(work[30:60])
    wait_for(lambda: in_flight(rt) >= 2, what="calls in flight", every_s=0.02)
    ray.kill(rt.ledger, no_restart=False)
    kills["ledger"] += 1
    # 3: kill the cache while lookups and single-flight waits are going on
    send(work[60:])
    wait_for(lambda: in_flight(rt) >= 2, what="calls in flight", every_s=0.02)
    ray.kill(rt.cache, no_restart=False)
    kills["cache"] += 1

    outcomes = []
    for ref in refs:
        try:
            outcomes.append(ray.get(ref, timeout=300))
        except ray.exceptions.RayTaskError as exc:
            outcomes.append(exc.cause if exc.cause is not None else exc)
    # every request ended in exactly one answer or one typed error
    assert len(outcomes) == len(work)
    untyped = [o for o in outcomes if not isinstance(o, (Result, ClaudeRuntimeError))]
    assert untyped == []
    answered = [o for o in outcomes if isinstance(o, Result)]
    assert len(answered) >= len(work) * 0.9  # faults may cost a few requests a typed error, never silence

    ray.get(rt.ledger.ping.remote(), timeout=60)
    wait_for(lambda: in_flight(rt) == 0, what="the API to go quiet", every_s=0.02)
    ours = {r.request_id for r in answered} | {o.request_id for o in outcomes if isinstance(o, ClaudeRuntimeError)}
    bill = [b for b in read_billing(rt.settings) if b.get("runtime_request_id") in ours]
    rows = rt.ledger_records()
    by_message = Counter(r["message_id"] for r in rows if r["message_id"])
    assert all(n == 1 for n in by_message.values()), "a billed response is in the ledger twice"
    placeholders = {(r["request_id"], r["attempt"]) for r in rows if r["status"] == "unreconciled"}
    missing = [b for b in bill if b["id"] not in by_message
               and (b["runtime_request_id"], b["runtime_attempt"]) not in placeholders]
    assert missing == [], f"{len(missing)} billed responses left no trace in the ledger"
    lost_calls = [b for b in bill if b["id"] not in by_message]
    assert kills["caller"] == 2 and len(placeholders) >= 1  # the kills did catch calls on the wire

    # every answered request has its billed row or its hit row
    answered_ids = Counter(r["request_id"] for r in rows if r["status"] == "ok")
    assert all(answered_ids[r.request_id] >= 1 for r in answered)

    summary = rt.reconcile()
    assert summary["matched"] == len(lost_calls)
    rows = rt.ledger_records()
    assert not [r for r in rows if r["status"] == "unreconciled"]
    ledger_usd = sum(r["cost_usd"] or 0.0 for r in rows if r["request_id"] in ours)
    bill_usd = sum(b["cost_usd"] for b in bill)
    assert ledger_usd == pytest.approx(bill_usd, rel=1e-9, abs=1e-12)
    print(f"\nchaos: requests={len(work)} answered={len(answered)} typed_errors={len(work) - len(answered)} "
          f"billed={len(bill)} in_ledger_by_id={len(bill) - len(lost_calls)} unreconciled={len(placeholders)} "
          f"kills={dict(kills)}")
