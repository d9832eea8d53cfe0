"""Reconciliation: settle the ledger's unreconciled rows against what the API really billed.

An unreconciled row is an attempt that went out and whose answer never arrived (its caller died mid-call, or
the call timed out after the send). The ledger books it at its reservation, the most it can have cost, so
budgets stay safe; reconciliation replaces that bound with the truth. Two sources, proving different things:

* **A billing log** (the local API's, one line per billed response, carrying the runtime's request id and
  attempt headers): exact. Each placeholder is matched to its call's line and becomes a ``reconciled`` row
  with the real message id, tokens and price, or ``void`` (cost 0) when no line exists; a billed line the
  ledger has no row for at all is inserted as a recovered ``reconciled`` row. Afterwards the ledger equals the
  bill row for row.
* **The Admin API's usage report** (real API): aggregates by day and model only, no per-request rows. For
  each (UTC day, model) the report's tokens are priced and compared with the ledger's billed rows; the gap is
  shared among that bucket's placeholders in proportion to their reservations (``estimated`` rows), or they
  become ``void`` when there is no gap. Afterwards the ledger's totals per day and model equal the API's, as
  long as the key is used by nothing but this runtime; which request the money belongs to stays an estimate.

Pure planning here; ``rt.reconcile()`` fetches the inputs and the ledger applies the plan in one transaction.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtime.pricing import price
from runtime.records import Record
from runtime.settings import Settings
from runtime.usage import Usage


@dataclass
class Plan:
    changes: list[dict[str, Any]] = field(default_factory=list)
    matched: int = 0      # placeholders matched to their bill
    voided: int = 0       # placeholders the bill proved unpaid
    duplicates: int = 0   # placeholders whose bill is already in the ledger under its own row
    recovered: int = 0    # billed responses with no ledger row at all, inserted
    estimated: int = 0    # placeholders priced from the usage report
    pending: int = 0      # too recent to judge

    def summary(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("matched", "voided", "duplicates", "recovered", "estimated",
                                              "pending")}


def read_billing_lines(path: Path) -> list[dict[str, Any]]:
    from runtime.fake_api.billing import read_billing

    return read_billing(Path(path)) if Path(path).exists() else []


def _usage_of_line(line: dict[str, Any]) -> Usage:
    return Usage.from_api({
        "input_tokens": line.get("input_tokens") or 0, "output_tokens": line.get("output_tokens") or 0,
        "cache_creation_input_tokens": line.get("cache_creation_input_tokens") or 0,
        "cache_read_input_tokens": line.get("cache_read_input_tokens") or 0,
        "cache_creation": {"ephemeral_5m_input_tokens": line.get("cache_write_5m") or 0,
                           "ephemeral_1h_input_tokens": line.get("cache_write_1h") or 0},
    })


def _line_key(line: dict[str, Any]) -> tuple[str | None, int | None]:
    rid = line.get("runtime_request_id") or line.get("custom_id")
    attempt = line.get("runtime_attempt")
    try:
        attempt = int(attempt) if attempt is not None else None
    except (TypeError, ValueError):
        attempt = None
    return rid, attempt


def _row_from_line(line: dict[str, Any], base: dict[str, Any], settings: Settings, attempt: int) -> dict:
    usage = _usage_of_line(line)
    model = line.get("model") or base.get("model")
    batch = bool(line.get("batch"))
    cost = price(usage, model, settings, batch=batch)
    rec = Record(
        request_id=base["request_id"], attempt=attempt, message_id=line["id"],
        ts=float(base.get("ts") or line.get("ts") or time.time()), user_id=base.get("user_id"),
        tenant=base.get("tenant"), priority=base.get("priority") or "normal", model=model, usage=usage, cost=cost,
        cache="miss", saved_usd=0.0, latency_s=0.0, attempts=attempt, status="reconciled",
        error_type=None, batch=batch, environment=base.get("environment") or settings.environment,
    )
    return rec.to_row()


def _void_row(p: dict[str, Any]) -> dict[str, Any]:
    row = dict(p)
    for k in ("cost_input_usd", "cost_output_usd", "cost_cache_write_usd", "cost_cache_read_usd", "cost_usd"):
        row[k] = None
    row["status"] = "void"
    row["error_type"] = "not_billed"
    row.pop("id", None)
    return row


def plan_from_billing(placeholders: list[dict[str, Any]], known_message_ids: set[str],
                      lines: list[dict[str, Any]], settings: Settings, *, min_age_s: float = 0.0,
                      now: float | None = None) -> Plan:
    """Match placeholders to billing lines by (request id, attempt). ``min_age_s``: placeholders younger than
    this stay (their call may still be running at the server, its line not yet written)."""
    now = time.time() if now is None else now
    plan = Plan()
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    by_rid_only: dict[str, list[dict[str, Any]]] = {}
    ours = []
    for line in lines:
        rid, attempt = _line_key(line)
        if rid is None or not line.get("id"):
            continue  # another client of the same API: not ours to book
        ours.append(line)
        if attempt is not None:
            by_key[(rid, attempt)] = line
        else:
            by_rid_only.setdefault(rid, []).append(line)
    used: set[str] = set()
    for p in placeholders:
        if p.get("status") not in ("unreconciled", "estimated"):
            continue
        rid, attempt = p["request_id"], int(p.get("attempt") or 0)
        line = by_key.get((rid, attempt))
        if line is None and by_rid_only.get(rid):
            # a line without an attempt header (a batch result): the request's only such line answers it
            cands = [x for x in by_rid_only[rid] if x["id"] not in used]
            line = cands[0] if len(cands) == 1 else None
        if line is not None:
            used.add(line["id"])
            if line["id"] in known_message_ids:
                plan.changes.append({"old_ident": p["ident"], "row": None, "old_status": p["status"], "old": p})
                plan.duplicates += 1
            else:
                plan.changes.append({"old_ident": p["ident"], "row": _row_from_line(line, p, settings, attempt),
                                     "old_status": p["status"]})
                plan.matched += 1
                known_message_ids = known_message_ids | {line["id"]}
        elif now - float(p.get("ts") or now) >= min_age_s:
            plan.changes.append({"old_ident": p["ident"], "row": _void_row(p), "old_status": p["status"]})
            plan.voided += 1
        else:
            plan.pending += 1
    for line in ours:
        if line["id"] in used or line["id"] in known_message_ids:
            continue
        rid, attempt = _line_key(line)
        base = {"request_id": rid, "ts": line.get("ts"), "user_id": line.get("user_id"), "model": line.get("model")}
        plan.changes.append({"old_ident": None, "row": _row_from_line(line, base, settings, attempt or 1),
                             "old_status": None})
        plan.recovered += 1
    return plan


# -- the real API's usage report ----------------------------------------------------------------------------

def fetch_usage_report(base_url: str, admin_key: str, *, since: float, until: float | None = None,
                       timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Daily usage grouped by model, every page: a list of {"day", "model", "service_tier", token fields}."""
    out: list[dict[str, Any]] = []
    page = None
    start = datetime.fromtimestamp(since, tz=timezone.utc).strftime("%Y-%m-%dT00:00:00Z")
    while True:
        q = [("starting_at", start), ("bucket_width", "1d"), ("group_by[]", "model"),
             ("group_by[]", "service_tier"), ("limit", "31")]
        if until is not None:
            q.append(("ending_at", datetime.fromtimestamp(until, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")))
        if page:
            q.append(("page", page))
        url = base_url.rstrip("/") + "/v1/organizations/usage_report/messages?" + urllib.parse.urlencode(q)
        req = urllib.request.Request(url, headers={"x-api-key": admin_key, "anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = json.loads(resp.read().decode())
        for bucket in body.get("data", []):
            day = str(bucket.get("starting_at", ""))[:10]
            for r in bucket.get("results", []):
                out.append({"day": day, **r})
        if not body.get("has_more"):
            return out
        page = body.get("next_page")


def _usage_of_result(r: dict[str, Any]) -> Usage:
    cc = r.get("cache_creation") or {}
    return Usage(input_tokens=int(r.get("uncached_input_tokens") or 0), output_tokens=int(r.get("output_tokens") or 0),
                 cache_write_5m_tokens=int(cc.get("ephemeral_5m_input_tokens") or 0),
                 cache_write_1h_tokens=int(cc.get("ephemeral_1h_input_tokens") or 0),
                 cache_read_tokens=int(r.get("cache_read_input_tokens") or 0))


def _day(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d")


def plan_from_usage(placeholders: list[dict[str, Any]], ledger_rows: list[dict[str, Any]],
                    results: list[dict[str, Any]], settings: Settings) -> Plan:
    """Share each (day, model) bucket's unexplained spend among its placeholders. Aggregates price exactly
    only below a long-context tier boundary; above it the per-bucket price is an approximation."""
    plan = Plan()
    api: dict[tuple[str, str], float] = {}
    for r in results:
        model = r.get("model")
        if not model or model not in settings.models:
            continue
        cost = price(_usage_of_result(r), model, settings, batch=r.get("service_tier") == "batch").total_usd
        api[(r["day"], model)] = api.get((r["day"], model), 0.0) + cost
    known: dict[tuple[str, str], float] = {}
    for row in ledger_rows:
        if row.get("message_id") and row.get("cost_usd"):
            k = (_day(row["ts"]), row.get("model"))
            known[k] = known.get(k, 0.0) + float(row["cost_usd"])
    buckets: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in placeholders:
        if p.get("status") in ("unreconciled", "estimated"):
            buckets.setdefault((_day(p["ts"]), p.get("model")), []).append(p)
    for k, ps in buckets.items():
        gap = api.get(k, 0.0) - known.get(k, 0.0)
        if gap <= 1e-9:
            for p in ps:
                plan.changes.append({"old_ident": p["ident"], "row": _void_row(p), "old_status": p["status"]})
                plan.voided += 1
            continue
        weights = [max(float(p.get("cost_usd") or 0.0), 1e-9) for p in ps]
        total_w = sum(weights)
        for p, w in zip(ps, weights):
            row = dict(p)
            row.pop("id", None)
            share = gap * w / total_w
            row.update(status="estimated", error_type="estimated_from_usage_report", cost_usd=share,
                       cost_input_usd=None, cost_output_usd=None, cost_cache_write_usd=None,
                       cost_cache_read_usd=None)
            plan.changes.append({"old_ident": p["ident"], "row": row, "old_status": p["status"]})
            plan.estimated += 1
    return plan
