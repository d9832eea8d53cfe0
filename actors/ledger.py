"""The durable cost ledger: the singleton actor that owns spend, budgets and alerts.

Why SQLite in WAL mode: the ledger needs a single writer, durable appends (on disk before the caller is told
"committed"), a unique index for idempotent writes and ad-hoc aggregation (spend by model / user / day) that the
CLI can read while the actor writes. SQLite gives all of that from the standard library in one file. WAL
lets readers (``claude-runtime report``) run beside the writer without blocking it, and with
``synchronous=FULL`` a COMMIT returns only after the WAL is fsynced. One fsync per record would cap the ledger
at the disk's fsync rate, so commits are grouped: concurrent ``commit`` calls join a write queue that one
flusher task drains into a single transaction, and each caller's reply waits for its batch's fsync.

Ray restarts this actor without its memory. Everything that must survive (records, write-ahead intents, raised
alerts) is in the file before it is acknowledged; on start the actor replays the file into its budget book,
its alert monitor and its counters. Budget *reservations* are not persisted (an fsync per reserve would halve
throughput): after a restart, requests already in flight are settled as plain spend when they commit.

A ``begin`` that finds no room in a budget but fits beside its settled spend waits here for room (``BudgetGate``,
runtime/budget_wait.py): a coroutine parked on the event loop per waiting request, woken after each write batch
and release, or by the deadline timer. Waiters are not persisted either: after a restart Ray retries their
``begin`` calls, which queue again.

SQLite work runs on one dedicated thread (the connection's only user), never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray

from runtime.alerts import Alert, AlertMonitor
from runtime.budget import REPLACED, BudgetBook, Reservation, day_key
from runtime.budget_wait import BudgetGate
from runtime.groupsubmit import GroupSubmitter
from runtime.intents import (Begin, Begun, OpenIntent, Owner, judge_open_intents, stale,
                             unreconciled_record)
from runtime.records import ROW_COLUMNS, Record
from runtime.settings import BudgetSettings, Settings

log = logging.getLogger("claude_runtime.ledger")
alert_log = logging.getLogger("claude_runtime.alerts")

LEDGER_NAME = "ledger"
NAMESPACE = "claude_runtime"

_COLUMN_TYPES = {
    "ident": "TEXT NOT NULL", "request_id": "TEXT NOT NULL", "attempt": "INTEGER", "message_id": "TEXT",
    "ts": "REAL NOT NULL", "batch": "INTEGER", "attempts": "INTEGER",
    **{c: "INTEGER" for c in ROW_COLUMNS if c.endswith("_tokens")},
    **{c: "REAL" for c in ROW_COLUMNS if c.endswith("_usd") or c == "latency_s"},
}
# an intent's state: open (sent or about to be, no outcome yet), billed, void (certainly not billed) or
# unreconciled (turned into a placeholder row)
_INTENT_COLUMNS = {"owner": "TEXT", "reserved_usd": "REAL", "user_id": "TEXT", "tenant": "TEXT",
                   "priority": "TEXT", "state": "TEXT NOT NULL DEFAULT 'open'"}
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{c} {_COLUMN_TYPES.get(c, 'TEXT')}" for c in ROW_COLUMNS)}
);
CREATE UNIQUE INDEX IF NOT EXISTS records_ident ON records(ident);
CREATE INDEX IF NOT EXISTS records_ts ON records(ts);
CREATE INDEX IF NOT EXISTS records_request ON records(request_id, attempt);
CREATE TABLE IF NOT EXISTS intents (
    request_id TEXT NOT NULL, attempt INTEGER NOT NULL, model TEXT, ts REAL NOT NULL,
    PRIMARY KEY (request_id, attempt)
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_ts ON alerts(ts);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, ts REAL NOT NULL, owner TEXT, request_ids TEXT NOT NULL
);
"""
_INSERT_RECORD = (f"INSERT OR IGNORE INTO records ({', '.join(ROW_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in ROW_COLUMNS)})")
_BY = {"model": "model", "user": "user_id", "tenant": "tenant",
       "day": "strftime('%Y-%m-%d', ts, 'unixepoch')", "environment": "environment", "status": "status",
       "upstream": "upstream"}


@dataclass
class Written:
    """What one write item did: whether it was new, and the cost of placeholder rows it replaced (a late
    answer or a void mark supersedes an unreconciled row; that row's price leaves spend)."""

    new: bool
    superseded_usd: float = 0.0
    superseded_rows: int = 0


class LedgerStore:
    """The SQLite file. Not thread-safe by design: the actor calls it from one thread only."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=10000")
        self.conn.executescript(SCHEMA)
        # files written by an earlier version lack the intent columns: add them in place
        have = {r["name"] for r in self.conn.execute("PRAGMA table_info(intents)")}
        for col, decl in _INTENT_COLUMNS.items():
            if col not in have:
                self.conn.execute(f"ALTER TABLE intents ADD COLUMN {col} {decl}")
        self.conn.execute("CREATE INDEX IF NOT EXISTS intents_open ON intents(state, ts)")
        have = {r["name"] for r in self.conn.execute("PRAGMA table_info(records)")}
        for col in ROW_COLUMNS:
            if col not in have:
                self.conn.execute(f"ALTER TABLE records ADD COLUMN {col} {_COLUMN_TYPES.get(col, 'TEXT')}")

    def write(self, items: list[tuple[str, Any]]) -> list[Written]:
        """One durable transaction for a batch; per item, what it did. A record item's payload is
        (Record, its row); an intent's is a dict of the intent columns; an alert's its body."""
        cur = self.conn.cursor()
        out: list[Written] = []
        cur.execute("BEGIN IMMEDIATE")
        try:
            for kind, payload in items:
                if kind == "record":
                    out.append(self._record(cur, payload[0], payload[1]))
                elif kind == "intent":
                    # the latest model and reservation for an attempt win (a budget downgrade changes them
                    # before sending); the first time stays, so pending intents keep their order
                    cur.execute(
                        "INSERT INTO intents (request_id, attempt, model, ts, owner, reserved_usd, user_id, tenant, "
                        "priority, state) VALUES (:request_id, :attempt, :model, :ts, :owner, :reserved_usd, "
                        ":user_id, :tenant, :priority, 'open') ON CONFLICT(request_id, attempt) DO UPDATE SET "
                        "model = excluded.model, owner = excluded.owner, reserved_usd = excluded.reserved_usd",
                        payload)
                    out.append(Written(True))
                elif kind == "reconcile":
                    out.append(self._reconcile(cur, payload))
                elif kind == "batch":
                    cur.execute("INSERT OR IGNORE INTO batches (batch_id, ts, owner, request_ids) VALUES (?, ?, ?, ?)",
                                (payload["batch_id"], payload["ts"], payload["owner"],
                                 json.dumps(payload["request_ids"])))
                    out.append(Written(cur.rowcount == 1))
                else:  # alert
                    cur.execute("INSERT INTO alerts (ts, kind, body) VALUES (?, ?, ?)",
                                (payload["ts"], payload["kind"], json.dumps(payload)))
                    out.append(Written(True))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return out

    @staticmethod
    def _drop_placeholder(cur: sqlite3.Cursor, request_id: str, attempt: int, only_unreconciled: bool
                          ) -> tuple[float, int]:
        ident = f"u|{request_id}|{int(attempt)}"
        sql = "SELECT COALESCE(cost_usd, 0.0) AS usd FROM records WHERE ident = ?"
        if only_unreconciled:
            sql += " AND status = 'unreconciled'"
        row = cur.execute(sql, (ident,)).fetchone()
        if row is None:
            return 0.0, 0
        cur.execute("DELETE FROM records WHERE ident = ?", (ident,))
        return float(row["usd"]), 1

    def _record(self, cur: sqlite3.Cursor, rec: Record, row: dict[str, Any]) -> Written:
        cur.execute(_INSERT_RECORD, [row[c] for c in ROW_COLUMNS])
        w = Written(cur.rowcount == 1)
        rid = rec.request_id
        if w.new and rec.billed and rec.attempt > 0:
            # the answer of an attempt that was booked as unreconciled (timed out, or its caller was presumed
            # dead) arrived after all: the real row replaces the placeholder
            usd, n = self._drop_placeholder(cur, rid, rec.attempt, only_unreconciled=False)
            w.superseded_usd += usd
            w.superseded_rows += n
            cur.execute("UPDATE intents SET state = 'billed' WHERE request_id = ? AND attempt = ?",
                        (rid, rec.attempt))
        elif w.new and rec.status == "unreconciled":
            cur.execute("UPDATE intents SET state = 'unreconciled' WHERE request_id = ? AND attempt = ? "
                        "AND state = 'open'", (rid, rec.attempt))
        for a in rec.void_attempts:
            usd, n = self._drop_placeholder(cur, rid, a, only_unreconciled=True)
            w.superseded_usd += usd
            w.superseded_rows += n
            cur.execute("UPDATE intents SET state = 'void' WHERE request_id = ? AND attempt = ? "
                        "AND state IN ('open', 'unreconciled')", (rid, int(a)))
        return w

    @staticmethod
    def _reconcile(cur: sqlite3.Cursor, change: dict[str, Any]) -> Written:
        """Replace one placeholder row by what reconciliation learned (or insert a recovered billed row)."""
        old_ident, row = change.get("old_ident"), change["row"]
        old_usd = 0.0
        if old_ident is not None:
            prev = cur.execute("SELECT COALESCE(cost_usd, 0.0) AS usd FROM records WHERE ident = ? AND status IN "
                               "('unreconciled', 'estimated')", (old_ident,)).fetchone()
            if prev is None:
                return Written(False)  # settled meanwhile (its answer arrived): nothing to do
            old_usd = float(prev["usd"])
            cur.execute("DELETE FROM records WHERE ident = ?", (old_ident,))
        if row is None:  # the placeholder was a double of a row already in the ledger: only delete it
            return Written(False, old_usd, 1 if old_ident is not None else 0)
        # not inserted: the bill's message is already in the ledger under its own row, so the placeholder was
        # a double and only its deletion counts
        cur.execute(_INSERT_RECORD, [row[c] for c in ROW_COLUMNS])
        return Written(cur.rowcount == 1, old_usd, 1 if old_ident is not None else 0)

    def max_attempt(self, request_id: str) -> int:
        row = self.conn.execute(
            "SELECT MAX(a) AS a FROM (SELECT MAX(attempt) AS a FROM intents WHERE request_id = ? "
            "UNION ALL SELECT MAX(attempt) AS a FROM records WHERE request_id = ?)",
            (request_id, request_id)).fetchone()
        return int(row["a"] or 0)

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, params).fetchall()]

    def close(self) -> None:
        self.conn.close()


def _month_start(ts: float) -> float:
    d = datetime.fromtimestamp(ts, tz=timezone.utc)
    return datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp()


class Ledger:
    """The actor's body (``LedgerActor`` is this class made a Ray actor). Every method is async so the actor
    runs on one event loop and concurrent commits can share a transaction."""

    def __init__(self, settings: Settings) -> None:
        # the ledger posts alerts (so it keeps the webhook) but never calls the API: it never holds the key
        self.settings = settings.without_secrets(keep_webhook=True)
        self.path = Path(settings.ledger_path)
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self.store = self._exec.submit(LedgerStore, self.path).result()
        self.book = BudgetBook(settings.budgets)
        # requests that must wait for budget room park here (one coroutine each) until a settle frees it
        self.gate = BudgetGate(self.book)
        self.monitor = AlertMonitor(settings.alerts)
        # concurrent writes share one transaction: whatever arrives while a transaction is on disk goes in the
        # next one (group commit); each writer is answered once its own item is durable
        self._writes: GroupSubmitter[tuple[str, Any], Written] = GroupSubmitter(
            self._write_batch, max_batch=4_096, max_inflight=1, name="ledger-writes",
            on_error=lambda exc, items: log.error(json.dumps({"event": "ledger_write_failed",
                                                              "error": type(exc).__name__,
                                                              "items": len(items)})))
        # intents without an outcome, by request id then attempt (mirrors the file's state='open' rows)
        self._open: dict[str, dict[int, OpenIntent]] = {}
        # who holds (or waits for) each request's budget reservation is the book's ``holder``: a duplicate
        # request id can neither release another's room nor take its place in the queue
        self._beginning: dict[str, str] = {}  # request id -> owner, while its first begin is in progress
        self._background: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._budget_leases: dict[str, float] = {}
        self._lease_seq = 0
        self._closed_recently: dict[str, set[int]] = {}
        self._http = None
        self._counter = None
        self.flushes = 0
        self._replay()

    # -- start-up -------------------------------------------------------------------------------------------
    def _q(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return self._exec.submit(self.store.query, sql, params).result()

    def _replay(self) -> None:
        t0 = time.perf_counter()
        now = time.time()
        s = self._q("SELECT COUNT(*) AS rows, COALESCE(SUM(message_id IS NOT NULL), 0) AS billed, "
                    "COALESCE(SUM(status = 'error'), 0) AS errors, "
                    "COALESCE(SUM(status = 'unreconciled'), 0) AS unreconciled, "
                    "COALESCE(SUM(cache IN ('exact', 'semantic')), 0) AS hits, "
                    "COALESCE(SUM(saved_usd), 0.0) AS saved_usd, COALESCE(SUM(cost_usd), 0.0) AS total_usd "
                    "FROM records")[0]
        self._stats = {k: s[k] for k in ("rows", "billed", "errors", "unreconciled", "hits", "saved_usd",
                                         "total_usd")}
        self._stats["reservation_exceeded"] = 0
        # budgets only look at the current day and month: replay this month's spend, summed per UTC day
        for r in self._q("SELECT user_id, tenant, CAST(ts / 86400 AS INTEGER) AS d, SUM(cost_usd) AS usd "
                         "FROM records WHERE ts >= ? AND cost_usd > 0 GROUP BY user_id, tenant, d",
                         (_month_start(now),)):
            self.book.add_spend(r["user_id"], r["tenant"], r["usd"], r["d"] * 86400 + 1)
        # intents still open: their calls may be in flight. Their reservations come back (held until the
        # answer, a void mark or the sweep settles them), so a restart does not free budget that is in use.
        for r in self._q("SELECT * FROM intents WHERE state = 'open' ORDER BY ts"):
            it = _intent_of(r)
            self._open.setdefault(it.request_id, {})[it.attempt] = it
        for rid, by_attempt in self._open.items():
            last = by_attempt[max(by_attempt)]
            if last.reserved_usd > 0:
                self.book.restore(rid, last.user_id, last.tenant, last.reserved_usd, owner=last.owner,
                                  priority=last.priority)
        # alerts: the day's spend, what was already raised, and the error window (which decides the episode)
        today = day_key(now)
        fired = {r["kind"]: r["ts"] for r in self._q("SELECT kind, MAX(ts) AS ts FROM alerts GROUP BY kind")}
        for kind, ts in fired.items():
            if kind != "error_rate":
                self.monitor.mark_fired(kind, ts)
        day_start = (int(now) // 86400) * 86400
        day_usd = self._q("SELECT COALESCE(SUM(cost_usd), 0.0) AS usd FROM records WHERE ts >= ?",
                          (day_start,))[0]["usd"]
        self.monitor.seed_day(today, day_usd, fired="daily_spend" in fired and day_key(fired["daily_spend"])
                              == today)
        for row in self._q("SELECT * FROM records WHERE ts >= ? ORDER BY ts",
                           (now - self.settings.alerts.error_window_s,)):
            self.monitor.observe(Record.from_row(row), replay=True, count_spend=False)
        log.info(json.dumps({"event": "ledger_replayed", "rows": self._stats["rows"],
                             "open_intents": sum(len(v) for v in self._open.values()),
                             "seconds": round(time.perf_counter() - t0, 3)}))

    # -- the write queue (group commit) --------------------------------------------------------------------
    async def _write_batch(self, items: list[tuple[str, Any]]) -> list[Written | BaseException]:
        loop = asyncio.get_running_loop()
        try:
            written: list[Written | BaseException] = list(
                await loop.run_in_executor(self._exec, self.store.write, items))
        except Exception as exc:
            if len(items) == 1:
                return [exc]
            # one bad item must not fail its neighbours: write them one by one to find it
            log.warning(json.dumps({"event": "ledger_batch_retry_singly", "error": type(exc).__name__,
                                    "items": len(items)}))
            written = []
            for it in items:
                try:
                    written.extend(await loop.run_in_executor(self._exec, self.store.write, [it]))
                except Exception as one:  # noqa: BLE001 - this item's writer hears it
                    written.append(one)
        self.flushes += 1
        for (kind, payload), w in zip(items, written):
            if isinstance(w, BaseException):
                continue
            if kind == "record":
                self._apply(payload[0], w)
            elif kind == "reconcile":
                self._apply_reconcile(payload, w)
        # settled spend and released reservations make room: waiting requests get it now
        self.gate.changed()
        return written

    async def _write(self, kind: str, payload: Any) -> Written:
        self._ensure_sweeper()
        return await self._writes.submit((kind, payload))

    def _apply(self, rec: Record, w: Written) -> None:
        """Fold a newly stored record into memory: counters, budgets, alerts, open intents."""
        # the reservation this record settles is its attempt's: held by whoever wrote that intent. A record with
        # no intent behind it (a refused duplicate's failure row) must not settle the running request's room.
        opened = (self._open.get(rec.request_id) or {}).get(rec.attempt)
        owner = opened.owner if opened is not None else None
        self._close_intents(rec)
        st = self._stats
        if w.superseded_rows:
            st["rows"] -= w.superseded_rows
            st["unreconciled"] -= w.superseded_rows
            st["total_usd"] -= w.superseded_usd
            self.book.adjust_spend(rec.user_id, rec.tenant, -w.superseded_usd, rec.ts)
        if not w.new:
            return
        st["rows"] += 1
        st["billed"] += rec.billed
        st["errors"] += rec.status == "error"
        st["unreconciled"] += rec.status == "unreconciled"
        st["hits"] += rec.cache in ("exact", "semantic")
        st["saved_usd"] += rec.saved_usd
        st["total_usd"] += rec.cost_usd
        if rec.attempt > 0 or rec.cost_usd > 0:
            self.book.settle(rec.request_id, rec.cost_usd, user_id=rec.user_id, tenant=rec.tenant, ts=rec.ts,
                             owner=owner, output_tokens=rec.usage.output_tokens if rec.billed else None)
        for alert in self.monitor.observe(rec):
            self._raise(alert)

    def _close_intents(self, rec: Record) -> None:
        by_attempt = self._open.get(rec.request_id)
        if not by_attempt:
            return
        done = set(rec.void_attempts)
        if rec.attempt > 0 and (rec.billed or rec.status == "unreconciled"):
            done.add(rec.attempt)
        for a in done:
            by_attempt.pop(a, None)
        if done:
            closed = self._closed_recently.setdefault(rec.request_id, set())
            closed.update(done)
            if len(self._closed_recently) > 100_000:  # a bounded memory of what was closed
                for rid in list(self._closed_recently)[:50_000]:
                    del self._closed_recently[rid]
        if not by_attempt:
            self._open.pop(rec.request_id, None)

    def _apply_reconcile(self, change: dict[str, Any], w: Written) -> None:
        st = self._stats
        row = change["row"]
        if w.superseded_rows:
            st["rows"] -= w.superseded_rows
            st["total_usd"] -= w.superseded_usd
            st["unreconciled"] -= change.get("old_status") == "unreconciled"
            who = row if row is not None else change.get("old") or {}
            self.book.adjust_spend(who.get("user_id"), who.get("tenant"), -w.superseded_usd,
                                   who.get("ts") or time.time())
        if w.new and row is not None:
            st["rows"] += 1
            st["billed"] += row["message_id"] is not None
            usd = float(row["cost_usd"] or 0.0)
            st["total_usd"] += usd
            self.book.adjust_spend(row["user_id"], row["tenant"], usd, row["ts"])

    # -- alerts: structured log, metric, webhook -------------------------------------------------------------
    def _raise(self, alert: Alert) -> None:
        body = {**alert.to_dict(), "environment": self.settings.environment}
        alert_log.warning(json.dumps({"event": "alert", **body}))
        self._writes.submit_nowait(("alert", body))  # durable with the next batch; nobody waits for it
        try:
            if self._counter is None:
                from ray.util.metrics import Counter
                self._counter = Counter("claude_runtime_alerts", description="alerts raised by the ledger",
                                        tag_keys=("kind",))
            self._counter.inc(1, tags={"kind": alert.kind})
        except Exception as exc:  # a metrics hiccup must never fail a commit
            log.debug("alert metric failed: %s", type(exc).__name__)
        if self.settings.alerts.webhook_url is not None:
            task = asyncio.get_running_loop().create_task(self._post(body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _post(self, body: dict[str, Any]) -> None:
        import aiohttp
        try:
            if self._http is None or self._http.closed:
                self._http = aiohttp.ClientSession()
            timeout = aiohttp.ClientTimeout(total=self.settings.alerts.webhook_timeout_s)
            url = self.settings.alerts.webhook_url.get_secret_value()
            async with self._http.post(url, json=body, timeout=timeout) as resp:
                await resp.read()
                if resp.status >= 400:
                    log.warning(json.dumps({"event": "alert_webhook_refused", "status": resp.status}))
        except Exception as exc:
            # the URL itself may carry a secret token (Slack-style webhooks): never log it
            log.warning(json.dumps({"event": "alert_webhook_failed", "error": type(exc).__name__}))

    # -- reservations and intents ------------------------------------------------------------------------------
    async def reserve(self, request_id: str, user_id: str | None, tenant: str | None, priority: str,
                      max_cost_usd: float) -> Reservation:
        res = self.book.reserve(request_id, user_id, tenant, priority, max_cost_usd)
        self.gate.changed()
        return res

    async def begin(self, b: Begin) -> Begun:
        """Reserve the attempt's worst-case cost and, when granted, write its intent durably, in one call.

        The first begin of an execution (``attempt=None``) also settles what an earlier run of the same
        request left open (see runtime/intents.py): a dead run's intents become unreconciled rows, and a live
        concurrent run (one holding or waiting for the request's reservation) makes this one a refused
        duplicate. Attempt numbers continue after every known one.

        With ``b.deadline_at``, a reservation that fits beside the settled spend but not beside what is in
        flight waits here (parked, not blocking the actor) until settles make room, it can no longer fit, or
        the deadline passes; the answer is then granted or refused with the figures."""
        me = Owner.parse(b.owner)
        if me is None:
            raise ValueError(f"begin needs an owner 'caller|life|execution', not {b.owner!r}")
        rid = b.request_id
        attempt = b.attempt
        unreconciled = 0
        if attempt is None:
            other = self._beginning.get(rid)
            if other is not None and other != b.owner:
                return Begun(None, 0, duplicate_of=other)
            now = time.time()
            known = list(self._open.get(rid, {}).values())
            holder = self.book.holder(rid)
            if holder is not None and holder.owner is not None and all(it.owner != holder.owner for it in known):
                # a reservation granted but not yet under an intent, or a request still waiting in the budget
                # queue: judged like an intent of its owner written just now (live unless its process is gone)
                known.append(OpenIntent(rid, 0, None, now, holder.owner, holder.amount_usd))
            dead, conflict = judge_open_intents(known, me, now, self.settings.ledger.unreconciled_after_s)
            if conflict is not None:
                return Begun(None, 0, duplicate_of=conflict.owner)
            dead = [it for it in dead if it.attempt > 0]  # a dead waiter's ticket is replaced by this admit
            mine = [a for a, it in self._open.get(rid, {}).items() if it.owner == b.owner]
            if mine:
                # the same execution asking again (Ray retried this call across a ledger restart): answer
                # with the intent it already has rather than open a second one that nothing will close
                attempt = max(mine)
                dead = []
            self._beginning[rid] = b.owner
            try:
                if attempt is None and dead:
                    env = self.settings.environment
                    await asyncio.gather(*(self._write("record", self._item(unreconciled_record(it, env)))
                                           for it in dead))
                    unreconciled = len(dead)
                if attempt is None:
                    known_attempts = max(self._open.get(rid, {}) or [0])
                    stored = await asyncio.get_running_loop().run_in_executor(self._exec, self.store.max_attempt,
                                                                              rid)
                    attempt = max(known_attempts, stored) + 1
            finally:
                self._beginning.pop(rid, None)
        else:
            holder = self.book.holder(rid)
            if holder is not None and holder.owner is not None and holder.owner != b.owner:
                return Begun(None, 0, duplicate_of=holder.owner)
        res = await self.gate.admit(rid, b.user_id, b.tenant, b.priority, b.reserve_usd, owner=b.owner,
                                    model=b.model, route=b.route, max_tokens=b.max_tokens, deadline=b.deadline_at)
        if not res.granted:
            return Begun(res, 0, unreconciled)
        held = self.book.holder(rid)
        if held is None or held.queued or held.owner != b.owner:
            # granted after a wait, but a re-run of the request (its caller died meanwhile) took the
            # reservation over before this coroutine resumed: the re-run goes on, this one has nobody to answer
            return Begun(dataclasses.replace(res, granted=False, state="stop", reason=REPLACED), 0, unreconciled)
        try:
            await self._intent(rid, attempt, b.model, b.owner, b.reserve_usd, b.user_id, b.tenant, b.priority)
        except BaseException:
            # no intent, no call: the room goes back rather than wait for a sweep that has nothing to sweep
            if self.book.release(rid, owner=b.owner):
                self.gate.changed()
            raise
        return Begun(res, attempt, unreconciled)

    async def _intent(self, request_id: str, attempt: int, model: str | None, owner: str | None,
                      reserved_usd: float, user_id: str | None, tenant: str | None, priority: str) -> None:
        it = OpenIntent(request_id, int(attempt), model, time.time(), owner, float(reserved_usd), user_id,
                        tenant, priority)
        prev = self._open.setdefault(request_id, {}).get(it.attempt)
        if prev is not None:  # an upsert keeps the first time
            it = dataclasses.replace(it, ts=prev.ts)
        self._open[request_id][it.attempt] = it
        await self._write("intent", {"request_id": it.request_id, "attempt": it.attempt, "model": it.model,
                                     "ts": it.ts, "owner": it.owner, "reserved_usd": it.reserved_usd,
                                     "user_id": it.user_id, "tenant": it.tenant, "priority": it.priority})

    async def intent(self, request_id: str, attempt: int, model: str | None, owner: str | None = None,
                     reserved_usd: float | None = None) -> None:
        """The write-ahead intent of a later attempt, under the reservation the request already holds."""
        held = self.book.held(request_id)
        prev = (self._open.get(request_id) or {})
        last = prev[max(prev)] if prev else None
        amount = reserved_usd if reserved_usd is not None else (held.amount if held is not None else
                                                                (last.reserved_usd if last else 0.0))
        user = held.user_id if held is not None else (last.user_id if last else None)
        tenant = held.tenant if held is not None else (last.tenant if last else None)
        priority = last.priority if last else "normal"
        await self._intent(request_id, attempt, model, owner, amount, user, tenant, priority)

    async def release(self, request_id: str, owner: str | None = None) -> bool:
        """Give back a reservation that will not be billed; only its holder may (a refused duplicate of the
        same id must not free the running request's budget)."""
        held = self.book.holder(request_id)
        if held is None or held.queued or (owner is not None and held.owner is not None and held.owner != owner):
            return False
        self.book.release(request_id)
        self.gate.changed()
        return True

    # -- the sweep: intents nobody will answer ---------------------------------------------------------------
    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ledger.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the next round retries
                log.exception("ledger sweep failed")

    async def sweep(self, now: float | None = None) -> int:
        """Turn intents open for longer than ``ledger.unreconciled_after_s`` into unreconciled rows."""
        t = time.time() if now is None else now
        old = [it for by_attempt in list(self._open.values())
               for it in stale(list(by_attempt.values()), t, self.settings.ledger.unreconciled_after_s)]
        if old:
            env = self.settings.environment
            await asyncio.gather(*(self._write("record", self._item(unreconciled_record(it, env))) for it in old))
            log.warning(json.dumps({"event": "intents_unreconciled", "count": len(old)}))
        return len(old)

    # -- records -----------------------------------------------------------------------------------------------
    @staticmethod
    def _item(record: Record | dict[str, Any]) -> tuple[Record, dict[str, Any]]:
        rec = Record.from_row(record) if isinstance(record, dict) else record
        return rec, rec.to_row()

    async def commit(self, record: Record | dict[str, Any]) -> bool:
        return (await self._write("record", self._item(record))).new

    async def commit_many(self, records: list[Record | dict[str, Any]]) -> list[bool | BaseException]:
        """Per record: whether it was new, or the exception that refused it (the others still commit)."""
        items = []
        for r in records:
            try:
                items.append(self._item(r))
            except Exception as exc:  # noqa: BLE001 - a malformed record fails alone
                items.append(exc)
        futs = [self._write("record", it) if not isinstance(it, BaseException) else _failed(it) for it in items]
        out = await asyncio.gather(*futs, return_exceptions=True)
        return [o.new if isinstance(o, Written) else o for o in out]

    async def check_cost(self, request_id: str, reserved_usd: float, billed_usd: float) -> None:
        """A bill above its reservation means the reservation was not an upper bound: count and log it."""
        if billed_usd > reserved_usd + 1e-9:
            self._stats["reservation_exceeded"] += 1
            log.error(json.dumps({"event": "reservation_exceeded", "request_id": request_id,
                                  "reserved_usd": reserved_usd, "billed_usd": billed_usd}))

    async def note_batch(self, batch_id: str, request_ids: list[str], owner: str | None = None) -> bool:
        """Record a created Message Batch durably, with the requests it carries (found again after a crash)."""
        return (await self._write("batch", {"batch_id": str(batch_id), "ts": time.time(), "owner": owner,
                                            "request_ids": [str(r) for r in request_ids]})).new

    async def batches(self) -> list[dict[str, Any]]:
        rows = await self._read("SELECT * FROM batches ORDER BY ts")
        for r in rows:
            r["request_ids"] = json.loads(r["request_ids"])
        return rows

    # -- reconciliation --------------------------------------------------------------------------------------
    async def placeholders(self, since: float | None = None) -> list[dict[str, Any]]:
        """Unreconciled (and estimated) rows: what may have been billed without an answer."""
        return await self._read("SELECT * FROM records WHERE status IN ('unreconciled', 'estimated') AND ts >= ? "
                                "ORDER BY ts", (since if since is not None else float("-inf"),))

    async def message_ids(self, since: float | None = None) -> list[str]:
        rows = await self._read("SELECT message_id FROM records WHERE message_id IS NOT NULL AND ts >= ?",
                                (since if since is not None else float("-inf"),))
        return [r["message_id"] for r in rows]

    async def apply_reconcile(self, changes: list[dict[str, Any]]) -> dict[str, int]:
        """Apply reconciliation changes from runtime/reconcile.py: each replaces a placeholder row (by its old
        ident) or inserts a recovered row, in one durable batch."""
        written = await asyncio.gather(*(self._write("reconcile", c) for c in changes))
        return {"applied": sum(1 for w in written if w.new or w.superseded_rows),
                "skipped": sum(1 for w in written if not (w.new or w.superseded_rows))}

    # -- reads -----------------------------------------------------------------------------------------------
    async def _read(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._exec, self.store.query, sql, params)

    async def spend(self, since: float | None = None, by: str = "model") -> dict[str, float]:
        if by not in _BY:
            raise ValueError(f"spend(by=...) must be one of {sorted(_BY)}, not {by!r}")
        rows = await self._read(f"SELECT COALESCE({_BY[by]}, '-') AS k, SUM(cost_usd) AS usd FROM records "
                                f"WHERE ts >= ? AND cost_usd IS NOT NULL GROUP BY k ORDER BY k",
                                (since if since is not None else float("-inf"),))
        return {r["k"]: r["usd"] for r in rows}

    async def request_spend(self, prefix: str, since: float | None = None) -> dict[str, float]:
        """Spend and row count of the requests whose id starts with ``prefix`` (a front-door key's, or one
        request's), from ``since``: a range scan on the request-id index, not a table scan."""
        if not prefix:
            raise ValueError("request_spend needs a non-empty prefix")
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = await self._read("SELECT COALESCE(SUM(cost_usd), 0.0) AS usd, COUNT(*) AS n FROM records "
                                "WHERE request_id >= ? AND request_id < ? AND ts >= ?",
                                (prefix, upper, since if since is not None else float("-inf")))
        return {"usd": float(rows[0]["usd"]), "rows": int(rows[0]["n"])}

    async def prompt_cache(self, since: float | None = None) -> dict[str, Any]:
        """Prompt-cache reads, writes and dollars saved against uncached input over billed rows since
        ``since`` (runtime/prompt_cache.savings_summary)."""
        from runtime.prompt_cache import savings_summary

        rows = await self._read("SELECT model, message_id, batch, upstream, input_tokens, output_tokens, "
                                "cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens FROM records "
                                "WHERE ts >= ? AND message_id IS NOT NULL",
                                (since if since is not None else float("-inf"),))
        return savings_summary(rows, self.settings)

    async def records(self, since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        rows = await self._read("SELECT * FROM records WHERE ts >= ? ORDER BY ts, id LIMIT ?",
                                (since if since is not None else float("-inf"), -1 if limit is None else limit))
        for r in rows:
            r.pop("id", None)
            r["batch"] = bool(r["batch"])
        return rows

    async def pending_intents(self) -> list[dict[str, Any]]:
        """Intents with no outcome yet: calls in flight, or lost ones the sweep has not reached."""
        out = [dict(request_id=it.request_id, attempt=it.attempt, model=it.model, ts=it.ts, owner=it.owner,
                    reserved_usd=it.reserved_usd) for by in self._open.values() for it in by.values()]
        return sorted(out, key=lambda d: (d["ts"], d["request_id"], d["attempt"]))

    async def budget_state(self, user_id: str | None, tenant: str | None) -> str:
        return self.book.state(user_id, tenant)

    async def budgets(self) -> dict[str, Any]:
        """Per budget: limit, settled spend, worst cases reserved in flight, their expected cost, requests
        waiting for room (count and worst-case USD) and the threshold state; then the learned cost ratios
        (``BudgetBook.snapshot``)."""
        return self.book.snapshot()

    async def alerts(self, since: float | None = None) -> list[dict[str, Any]]:
        rows = await self._read("SELECT body FROM alerts WHERE ts >= ? ORDER BY id",
                                (since if since is not None else float("-inf"),))
        return [json.loads(r["body"]) for r in rows]

    async def stats(self) -> dict[str, Any]:
        return {**self._stats, "outstanding_reservations": self.book.outstanding,
                "queued_reservations": self.book.waiting, "budget_queue": dict(self.gate.stats),
                "flushes": self.flushes,
                "open_intents": sum(len(v) for v in self._open.values()), "path": str(self.path),
                "pid": os.getpid()}

    async def ping(self) -> bool:
        return True

    # -- what callers journal locally (actors/journal.py) -------------------------------------------------------
    async def apply_journal(self, entries: list[dict[str, Any]]) -> int:
        """A caller's journal, in order: intents, then records (with the budget-lease part each consumes).
        Idempotent: entries sent again after a crash change nothing."""
        writes = []
        consumed: list[tuple[str, float]] = []
        for e in entries:
            if e["k"] == "intent":
                it = OpenIntent(e["request_id"], int(e["attempt"]), e.get("model"), float(e["ts"]), e.get("owner"),
                                float(e.get("reserved_usd") or 0.0), e.get("user_id"), e.get("tenant"),
                                e.get("priority") or "normal")
                if self._already_closed(it):
                    continue
                self._open.setdefault(it.request_id, {})[it.attempt] = it
                writes.append(self._write("intent", {k: getattr(it, k) for k in (
                    "request_id", "attempt", "model", "ts", "owner", "reserved_usd", "user_id", "tenant",
                    "priority")}))
            else:
                rec = Record.from_row(e["row"])
                rec.void_attempts = tuple(e.get("void") or ())
                writes.append(self._write("record", self._item(rec)))
                if e.get("lease"):
                    consumed.append((e["lease"], float(e.get("reserved") or 0.0)))
        await asyncio.gather(*writes)
        for lease_id, amount in consumed:
            self.book.consume_lease(lease_id, amount)
        if consumed:
            self.gate.changed()
        return len(entries)

    def _already_closed(self, it: OpenIntent) -> bool:
        # a journal sent twice must not reopen an intent the first copy's record closed
        return it.request_id in self._closed_recently and it.attempt in self._closed_recently[it.request_id]

    async def caller_restarted(self, caller: str, life: str) -> dict[str, int]:
        """A caller process came back (a new life of the same actor name): the open intents of its earlier
        lives were sent by a process that is gone. They become unreconciled rows now; the answer maps each
        such request to its highest attempt, so a re-run numbers its attempts after them."""
        dead = [it for by in list(self._open.values()) for it in by.values()
                if (o := Owner.parse(it.owner)) is not None and o.caller == caller and o.life != life]
        env = self.settings.environment
        await asyncio.gather(*(self._write("record", self._item(unreconciled_record(it, env))) for it in dead))
        out: dict[str, int] = {}
        for it in dead:
            out[it.request_id] = max(out.get(it.request_id, 0), it.attempt)
        return out

    async def budget_lease(self, owner: str, wanted_usd: float) -> tuple[str | None, float]:
        """A slice of the account-wide budgets for a caller to reserve on by itself (see BudgetBook.lease)."""
        self._lease_seq += 1
        lease_id = f"budget-lease-{os.getpid()}-{self._lease_seq}"
        size = self.book.lease(lease_id, wanted_usd, owner=owner)
        if size <= 0:
            return None, 0.0
        self._budget_leases[lease_id] = time.time()
        return lease_id, size

    async def budget_lease_consume(self, lease_id: str, amount_usd: float) -> None:
        """Part of a lease's hold that ended without a record (a request released before it was billed)."""
        self.book.consume_lease(lease_id, amount_usd)
        if self.book.held(lease_id) is None:
            self._budget_leases.pop(lease_id, None)
        self.gate.changed()

    async def budget_lease_return(self, lease_id: str, keep_usd: float) -> None:
        """The caller is done with a lease except ``keep_usd``, reserved by its calls still running (their
        records will consume that part)."""
        held = self.book.held(lease_id)
        if held is None:
            return
        self.book.consume_lease(lease_id, max(0.0, held.amount - keep_usd))
        if keep_usd <= 0:
            self.book.release(lease_id)
            self._budget_leases.pop(lease_id, None)
        self.gate.changed()

    async def reconfigure(self, settings: Settings) -> None:
        """New budgets and alert thresholds, live (``runtime.start(..., reconfigure=True)``); what is spent and
        reserved stays."""
        self.settings = settings.without_secrets(keep_webhook=True)
        self.book.cfg = settings.budgets
        self.monitor.cfg = settings.alerts


def _intent_of(row: dict[str, Any]) -> OpenIntent:
    return OpenIntent(row["request_id"], int(row["attempt"]), row.get("model"), float(row["ts"]), row.get("owner"),
                      float(row.get("reserved_usd") or 0.0), row.get("user_id"), row.get("tenant"),
                      row.get("priority") or "normal")


async def _failed(exc: BaseException):
    raise exc


class LedgerClient:
    """The caller side: concurrent commits of one process share one ``commit_many`` call, and each commit
    returns only once its record is durable. A billed record is retried across a ledger restart (Ray retries
    the call by itself) and across a failed write (disk full, say), so a paid answer is not dropped::

        client = LedgerClient(ledger_handle)
        new = await client.commit(record)
    """

    def __init__(self, ledger, max_batch: int = 512) -> None:
        self.ledger = ledger
        self._group: GroupSubmitter[Record, bool] = GroupSubmitter(
            self._send, max_batch=max_batch, max_inflight=1, name="ledger-commits")

    async def _send(self, records: list[Record]) -> list[bool | BaseException]:
        return await self.ledger.commit_many.remote(records)

    async def commit(self, record: Record, *, tries: int = 1) -> bool:
        for n in range(tries):
            try:
                return await self._group.submit(record)
            except (ray.exceptions.RayError, OSError, sqlite3.Error):
                if n == tries - 1:
                    raise
                await asyncio.sleep(0.2 * 2 ** n)
        raise AssertionError("unreachable")

    async def begin(self, b: Begin) -> Begun:
        return await self.ledger.begin.remote(b)

    async def intent(self, request_id: str, attempt: int, model: str, owner: str, reserved_usd: float) -> None:
        await self.ledger.intent.remote(request_id, attempt, model, owner, reserved_usd)

    async def release(self, request_id: str, owner: str) -> None:
        await self.ledger.release.remote(request_id, owner)

    async def check_cost(self, request_id: str, reserved_usd: float, billed_usd: float) -> None:
        self.ledger.check_cost.remote(request_id, reserved_usd, billed_usd)


def max_concurrency(budgets: BudgetSettings) -> int:
    """Calls the ledger runs at once. Every request waiting for budget room is a ``begin`` parked on the
    actor's event loop and holds one of these slots until its turn; if waiters could fill them all, the
    commits and releases that make room would queue behind them and nothing would move until deadlines
    expired. So: room for every waiter the book lets in (``max_queued``) plus headroom for everything else.
    A slot of an async actor is only a counter, not a thread."""
    return budgets.max_queued + _CALL_HEADROOM


_CALL_HEADROOM = 1024
LedgerActor = ray.remote(num_cpus=0, max_concurrency=max_concurrency(BudgetSettings()), max_restarts=-1,
                         max_task_retries=-1)(Ledger)


def get_or_create_ledger(settings: Settings, *, scheduling_strategy: Any = None, namespace: str = NAMESPACE):
    """The cluster's one ledger: a named detached actor that racing creators all resolve to."""
    return LedgerActor.options(
        name=LEDGER_NAME, namespace=namespace, lifetime="detached", max_restarts=-1, max_task_retries=-1,
        get_if_exists=True, scheduling_strategy=scheduling_strategy,
        max_concurrency=max_concurrency(settings.budgets),
    ).remote(settings)
