"""The live state of a runtime, as ``claude-runtime status`` and the gauges show it: pure shaping of what the
actors report (limiter snapshot, budgets, cache stats, caller loads) into one plain dict, and its rendering.

``Runtime.status()`` gathers the parts; ``view`` shapes them; ``render`` prints them. Sections:

    callers   active / draining callers, requests in flight on each
    buckets   every limiter bucket: level / capacity, and the grants in flight
    budgets   each budget: settled spend / limit, reserved in flight, state
    cache     entries, hit rate, location
    leases    capacity leased to callers (filled in when the limiter and ledger lease capacity; empty otherwise)
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def bucket_levels(limiter: dict[str, Any] | None) -> dict[str, float]:
    """``{"sonnet/rpm": level / capacity, ...}`` from a limiter snapshot."""
    out: dict[str, float] = {}
    for cls, buckets in ((limiter or {}).get("classes") or {}).items():
        for name, b in buckets.items():
            if isinstance(b, dict) and b.get("capacity"):
                out[f"{cls}/{name}"] = max(0.0, float(b["level"])) / float(b["capacity"])
    return out


def period_starts(now: float) -> tuple[float, float]:
    """Unix times of the start of today and of this month (UTC: the ledger's budget periods)."""
    d = datetime.fromtimestamp(now, tz=timezone.utc)
    day = datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()
    month = datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp()
    return day, month


def global_budgets(budgets: Any, spent_today: float, spent_month: float) -> dict[str, dict[str, Any]]:
    """The global budgets from settled spend alone, for a ledger that has no budget snapshot to give."""
    out = {}
    for name, limit, spent in (("daily", budgets.daily_usd, spent_today), ("monthly", budgets.monthly_usd,
                                                                           spent_month)):
        if limit:
            ratio = spent / limit
            out[name] = {"limit_usd": limit, "settled_usd": spent, "reserved_usd": None,
                         "state": "stop" if ratio >= 1 else "downgrade" if ratio >= budgets.downgrade_at
                         else "normal"}
    return out


def pool_summary(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over the pool's callers; a driver's in-process caller (``in_process``) is listed and its requests
    counted, but it is not one of the pool's active callers (the pool neither routes to it nor scales it)."""
    pooled = [m for m in members if not m.get("in_process")]
    active = [m for m in pooled if not m.get("draining")]
    return {"active": len(active), "draining": len(pooled) - len(active),
            "in_process": len(members) - len(pooled),
            "in_flight": sum(int(m.get("in_flight") or 0) for m in members), "members": members}


def outside_members(reports: dict[str, tuple[float, dict[str, Any]]], now: float, max_age_s: float
                    ) -> list[dict[str, Any]]:
    """Status rows for in-process callers from their last reports (name -> (when, ``load()``)); one that has
    not reported for ``max_age_s`` (its driver exited) is left out."""
    return [{**load, "name": name, "in_process": True, "reachable": True, "draining": False}
            for name, (at, load) in sorted(reports.items()) if now - at <= max_age_s]


def view(*, limiter: dict[str, Any] | None, budgets: dict[str, Any], cache: dict[str, Any] | None,
         members: list[dict[str, Any]], pool: dict[str, Any] | None = None,
         leases: dict[str, Any] | None = None, fake_api: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "callers": {**pool_summary(members), **({"target": pool.get("target"), "floor": pool.get("floor"),
                                                 "ceiling": pool.get("ceiling")} if pool else {})},
        "buckets": (limiter or {}).get("classes") or {},
        "bucket_levels": bucket_levels(limiter),
        "grants_in_flight": (limiter or {}).get("in_flight") or {},
        "budgets": budgets,
        "cache": cache,
        # the lead's capacity leases report here (limiter and ledger slices held by callers)
        "leases": leases or {},
    }
    if fake_api is not None:
        out["fake_api"] = fake_api
    return out


def render(status: dict[str, Any]) -> str:
    """Tables for a terminal."""
    import io

    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=120, force_terminal=False)
    c = status.get("callers") or {}
    con.print(f"callers: {c.get('active', 0)} active, {c.get('draining', 0)} draining, "
              + (f"{c['in_process']} in-process, " if c.get("in_process") else "")
              + f"{c.get('in_flight', 0)} requests in flight"
              + (f" (pool {c['floor']}..{c['ceiling']}, target {c['target']})" if c.get("ceiling") else ""),
              soft_wrap=True)
    t = Table()
    for col in ("caller", "state", "in flight", "node", "served"):
        t.add_column(col)
    for m in c.get("members") or []:
        t.add_row(m.get("name", "?"), "in-process" if m.get("in_process") else "draining" if m.get("draining") else
                  ("unreachable" if m.get("reachable") is False else "active"), str(m.get("in_flight", "?")),
                  str(m.get("node") or "?")[:12], str(m.get("served", "")))
    con.print(t)
    t = Table(title="rate-limit buckets (level / capacity)")
    for col in ("class", "bucket", "level", "capacity", "limit", "fill"):
        t.add_column(col, justify="right")
    for cls, buckets in sorted((status.get("buckets") or {}).items()):
        for name, b in buckets.items():
            if isinstance(b, dict):
                fill = max(0.0, b["level"]) / b["capacity"] if b.get("capacity") else 0.0
                t.add_row(cls, name, f"{b['level']:.0f}", f"{b['capacity']:.0f}", str(b.get("limit", "")),
                          f"{fill:.0%}")
    con.print(t)
    t = Table(title="budgets")
    for col in ("budget", "settled $", "limit $", "used", "reserved $", "state"):
        t.add_column(col, justify="right")
    for name, b in sorted((status.get("budgets") or {}).items()):
        lim = b.get("limit_usd") or 0
        t.add_row(name, f"{b.get('settled_usd', 0):.4f}", f"{lim:.2f}",
                  f"{(b.get('settled_usd') or 0) / lim:.1%}" if lim else "-",
                  "-" if b.get("reserved_usd") is None else f"{b['reserved_usd']:.4f}", str(b.get("state", "")))
    con.print(t if status.get("budgets") else "budgets: none configured")
    cache = status.get("cache")
    if cache:
        con.print(f"cache: {cache.get('entries', 0)} entries, hit rate {cache.get('hit_rate', 0):.1%}, "
                  f"saved ${cache.get('saved_usd', 0):.4f} this life, at {cache.get('location', '?')}")
    else:
        con.print("cache: off")
    leases = status.get("leases") or {}
    if leases:
        t = Table(title="capacity leases held by callers")
        for col in ("caller", "bucket set", "requests left", "input left", "output left", "expires in s",
                    "in flight"):
            t.add_column(col, justify="right")
        for caller, held in sorted(leases.items()):
            for key, lease in sorted((held.get("capacity") or {}).items()):
                if key != "stats" and isinstance(lease, dict):
                    t.add_row(caller, key, f"{lease.get('requests_left', 0):.0f}",
                              f"{lease.get('input_left', 0):.0f}", f"{lease.get('output_left', 0):.0f}",
                              str(lease.get("expires_in_s", "")), str(lease.get("inflight", "")))
            if held.get("budget"):
                t.add_row(caller, "budget", "", "", "", "", str(held["budget"]))
        con.print(t)
    else:
        con.print("leases: none held (admission goes to the limiter and the ledger)")
    return buf.getvalue()
