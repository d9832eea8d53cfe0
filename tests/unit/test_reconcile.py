"""Reconciliation plans: exact against a billing log, totals-only against the usage report."""

import pytest

from runtime.intents import OpenIntent, unreconciled_record
from runtime.pricing import price
from runtime.reconcile import plan_from_billing, plan_from_usage
from runtime.settings import Settings
from runtime.usage import Usage

S = Settings()
SONNET = "claude-sonnet-5-5"
TS = 1_790_000_000.0


def placeholder(rid, attempt, reserved=0.05, model=SONNET, ts=TS):
    row = unreconciled_record(OpenIntent(rid, attempt, model, ts, "c|l|e", reserved, "u1", "t1"), "dev", ts).to_row()
    return row


def line(mid, rid, attempt, inp=100, out=20, model=SONNET, batch=False, custom_id=None):
    return {"id": mid, "runtime_request_id": rid if custom_id is None else None, "runtime_attempt": attempt,
            "custom_id": custom_id, "model": model, "input_tokens": inp, "output_tokens": out,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "cache_write_5m": 0,
            "cache_write_1h": 0, "batch": batch, "ts": TS + 1, "user_id": "u1"}


def test_each_placeholder_becomes_its_bill_or_void_and_strangers_are_recovered():
    ph = [placeholder("a", 1), placeholder("b", 2), placeholder("c", 1, ts=TS + 100)]
    lines = [line("m-a1", "a", 1), line("m-x", "x", 1, inp=50), line("m-other", None, None),
             line("m-known", "k", 1)]
    plan = plan_from_billing(ph, {"m-known"}, lines, S, min_age_s=30, now=TS + 110)
    assert plan.summary() == {"matched": 1, "voided": 1, "duplicates": 0, "recovered": 1, "estimated": 0,
                              "pending": 1}
    by_old = {c["old_ident"]: c for c in plan.changes}
    a = by_old["u|a|1"]["row"]
    assert a["status"] == "reconciled" and a["message_id"] == "m-a1" and a["attempt"] == 1
    assert a["cost_usd"] == pytest.approx(price(Usage(100, 20), SONNET, S).total_usd)
    assert a["user_id"] == "u1" and a["tenant"] == "t1"  # who it belongs to comes from the placeholder
    assert by_old["u|b|2"]["row"]["status"] == "void" and by_old["u|b|2"]["row"]["cost_usd"] is None
    rec = by_old[None]["row"]
    assert rec["request_id"] == "x" and rec["message_id"] == "m-x" and rec["status"] == "reconciled"


def test_a_placeholder_whose_bill_is_already_in_the_ledger_is_only_removed():
    plan = plan_from_billing([placeholder("a", 1)], {"m-a1"}, [line("m-a1", "a", 1)], S)
    assert plan.duplicates == 1 and plan.changes[0]["row"] is None


def test_batch_lines_without_an_attempt_match_by_custom_id():
    plan = plan_from_billing([placeholder("q", 1)], set(), [line("m-q", None, None, batch=True, custom_id="q")], S)
    row = plan.changes[0]["row"]
    assert plan.matched == 1 and row["batch"] and row["cost_usd"] == pytest.approx(
        price(Usage(100, 20), SONNET, S, batch=True).total_usd)


def test_the_usage_report_shares_each_buckets_gap_by_reservation():
    day = "2026-09-21"
    ts = 1_790_000_000.0  # 2026-09-21 UTC
    ph = [placeholder("a", 1, reserved=0.3, ts=ts), placeholder("b", 1, reserved=0.1, ts=ts),
          placeholder("c", 1, reserved=0.2, ts=ts + 86_400)]
    billed_rows = [{"message_id": "m1", "cost_usd": price(Usage(1000, 100), SONNET, S).total_usd, "ts": ts,
                    "model": SONNET}]
    report = [{"day": day, "model": SONNET, "service_tier": "standard", "uncached_input_tokens": 3000,
               "output_tokens": 300, "cache_read_input_tokens": 0, "cache_creation": {}}]
    plan = plan_from_usage(ph, billed_rows, report, S)
    rows = {c["old_ident"]: c["row"] for c in plan.changes}
    gap = price(Usage(3000, 300), SONNET, S).total_usd - billed_rows[0]["cost_usd"]
    assert rows["u|a|1"]["status"] == "estimated" and rows["u|a|1"]["cost_usd"] == pytest.approx(gap * 0.75)
    assert rows["u|b|1"]["cost_usd"] == pytest.approx(gap * 0.25)
    assert rows["u|c|1"]["status"] == "void"  # nothing unexplained on that day
