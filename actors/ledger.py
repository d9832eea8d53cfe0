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

SQLite work runs on one dedicated thread (the connection's only user), never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray

from runtime.alerts import Alert, AlertMonitor
from runtime.budget import BudgetBook, Reservation, day_key
from runtime.records import ROW_COLUMNS, Record
from runtime.settings import Settings

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
"""
_INSERT_RECORD = (f"INSERT OR IGNORE INTO records ({', '.join(ROW_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in ROW_COLUMNS)})")
_BY = {"model": "model", "user": "user_id", "tenant": "tenant",
       "day": "strftime('%Y-%m-%d', ts, 'unixepoch')", "environment": "environment"}


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

    def write(self, items: list[tuple[str, Any]]) -> list[bool]:
        """One durable transaction for a batch; per item, whether it was new (not a duplicate). A record
        item's payload is (Record, its row)."""
        cur = self.conn.cursor()
        new: list[bool] = []
        cur.execute("BEGIN IMMEDIATE")
        try:
            for kind, payload in items:
                if kind == "record":
                    cur.execute(_INSERT_RECORD, [payload[1][c] for c in ROW_COLUMNS])
                elif kind == "intent":
                    # the latest model for an attempt wins (a budget downgrade changes it before sending); the
                    # first time stays, so pending intents keep their order
                    cur.execute("INSERT INTO intents (request_id, attempt, model, ts) VALUES (?, ?, ?, ?) "
                                "ON CONFLICT(request_id, attempt) DO UPDATE SET model = excluded.model",
                                payload)
                else:  # alert
                    cur.execute("INSERT INTO alerts (ts, kind, body) VALUES (?, ?, ?)",
                                (payload["ts"], payload["kind"], json.dumps(payload)))
                new.append(cur.rowcount == 1)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return new

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
        self.settings = settings
        self.path = Path(settings.ledger_path)
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self.store = self._exec.submit(LedgerStore, self.path).result()
        self.book = BudgetBook(settings.budgets)
        self.monitor = AlertMonitor(settings.alerts)
        self._queue: list[tuple[str, Any, asyncio.Future | None]] = []
        self._flusher: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
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
                    "COALESCE(SUM(cache IN ('exact', 'semantic')), 0) AS hits, "
                    "COALESCE(SUM(saved_usd), 0.0) AS saved_usd, COALESCE(SUM(cost_usd), 0.0) AS total_usd "
                    "FROM records")[0]
        self._stats = {k: s[k] for k in ("rows", "billed", "errors", "hits", "saved_usd", "total_usd")}
        # budgets only look at the current day and month: replay this month's spend, summed per UTC day
        for r in self._q("SELECT user_id, tenant, CAST(ts / 86400 AS INTEGER) AS d, SUM(cost_usd) AS usd "
                         "FROM records WHERE ts >= ? AND cost_usd > 0 GROUP BY user_id, tenant, d",
                         (_month_start(now),)):
            self.book.add_spend(r["user_id"], r["tenant"], r["usd"], r["d"] * 86400 + 1)
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
                             "seconds": round(time.perf_counter() - t0, 3)}))

    # -- the write queue (group commit) --------------------------------------------------------------------
    def _enqueue(self, kind: str, payload: Any, wait: bool = True) -> asyncio.Future | None:
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append((kind, payload, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return fut

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                new = await loop.run_in_executor(self._exec, self.store.write, [(k, p) for k, p, _ in batch])
            except Exception as exc:  # the disk refused: every caller of this batch hears it, nothing applied
                log.error(json.dumps({"event": "ledger_write_failed", "error": type(exc).__name__,
                                      "items": len(batch)}))
                for _, _, fut in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                continue
            self.flushes += 1
            for (kind, payload, fut), is_new in zip(batch, new):
                if kind == "record" and is_new:
                    self._apply(payload[0])
                if fut is not None and not fut.done():
                    fut.set_result(is_new)

    def _apply(self, rec: Record) -> None:
        """Fold a newly stored record into memory: counters, budgets, alerts."""
        st = self._stats
        st["rows"] += 1
        st["billed"] += rec.billed
        st["errors"] += rec.status == "error"
        st["hits"] += rec.cache in ("exact", "semantic")
        st["saved_usd"] += rec.saved_usd
        st["total_usd"] += rec.cost_usd
        self.book.settle(rec.request_id, rec.cost_usd, user_id=rec.user_id, tenant=rec.tenant, ts=rec.ts)
        for alert in self.monitor.observe(rec):
            self._raise(alert)

    # -- alerts: structured log, metric, webhook -------------------------------------------------------------
    def _raise(self, alert: Alert) -> None:
        body = {**alert.to_dict(), "environment": self.settings.environment}
        alert_log.warning(json.dumps({"event": "alert", **body}))
        self._enqueue("alert", body, wait=False)  # durable with the next batch; nobody waits for it
        try:
            if self._counter is None:
                from ray.util.metrics import Counter
                self._counter = Counter("claude_runtime_alerts", description="alerts raised by the ledger",
                                        tag_keys=("kind",))
            self._counter.inc(1, tags={"kind": alert.kind})
        except Exception as exc:  # a metrics hiccup must never fail a commit
            log.debug("alert metric failed: %s", type(exc).__name__)
        if self.settings.alerts.webhook_url:
            task = asyncio.get_running_loop().create_task(self._post(body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _post(self, body: dict[str, Any]) -> None:
        import aiohttp
        try:
            if self._http is None or self._http.closed:
                self._http = aiohttp.ClientSession()
            timeout = aiohttp.ClientTimeout(total=self.settings.alerts.webhook_timeout_s)
            async with self._http.post(self.settings.alerts.webhook_url, json=body, timeout=timeout) as resp:
                await resp.read()
                if resp.status >= 400:
                    log.warning(json.dumps({"event": "alert_webhook_refused", "status": resp.status}))
        except Exception as exc:
            # the URL itself may carry a secret token (Slack-style webhooks): never log it
            log.warning(json.dumps({"event": "alert_webhook_failed", "error": type(exc).__name__}))

    # -- the public surface ----------------------------------------------------------------------------------
    async def reserve(self, request_id: str, user_id: str | None, tenant: str | None, priority: str,
                      max_cost_usd: float) -> Reservation:
        return self.book.reserve(request_id, user_id, tenant, priority, max_cost_usd)

    async def begin(self, request_id: str, attempt: int, model: str | None, user_id: str | None,
                    tenant: str | None, priority: str, max_cost_usd: float) -> Reservation:
        """``reserve`` and, when granted, the write-ahead ``intent`` in one call: a request's first attempt
        costs the ledger one round trip before the API call, not two."""
        res = self.book.reserve(request_id, user_id, tenant, priority, max_cost_usd)
        if res.granted:
            await self._enqueue("intent", (request_id, int(attempt), model, time.time()))
        return res

    async def release(self, request_id: str) -> None:
        self.book.release(request_id)

    async def intent(self, request_id: str, attempt: int, model: str | None) -> None:
        await self._enqueue("intent", (request_id, int(attempt), model, time.time()))

    @staticmethod
    def _item(record: Record | dict[str, Any]) -> tuple[Record, dict[str, Any]]:
        rec = Record.from_row(record) if isinstance(record, dict) else record
        return rec, rec.to_row()

    async def commit(self, record: Record | dict[str, Any]) -> bool:
        return await self._enqueue("record", self._item(record))

    async def commit_many(self, records: list[Record | dict[str, Any]]) -> list[bool]:
        futs = [self._enqueue("record", self._item(r)) for r in records]
        return list(await asyncio.gather(*futs))

    async def _read(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._exec, self.store.query, sql, params)

    async def spend(self, since: float | None = None, by: str = "model") -> dict[str, float]:
        if by not in _BY:
            raise ValueError(f"spend(by=...) must be one of {sorted(_BY)}, not {by!r}")
        rows = await self._read(f"SELECT COALESCE({_BY[by]}, '-') AS k, SUM(cost_usd) AS usd FROM records "
                                f"WHERE ts >= ? AND cost_usd IS NOT NULL GROUP BY k ORDER BY k",
                                (since if since is not None else float("-inf"),))
        return {r["k"]: r["usd"] for r in rows}

    async def records(self, since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        rows = await self._read("SELECT * FROM records WHERE ts >= ? ORDER BY ts, id LIMIT ?",
                                (since if since is not None else float("-inf"), -1 if limit is None else limit))
        for r in rows:
            r.pop("id", None)
            r["batch"] = bool(r["batch"])
        return rows

    async def pending_intents(self) -> list[dict[str, Any]]:
        # an intent is answered by a record of its request at the same or a later attempt; one with none may
        # have been billed by the API without the ledger ever hearing the outcome
        return await self._read(
            "SELECT i.request_id, i.attempt, i.model, i.ts FROM intents i WHERE NOT EXISTS ("
            "SELECT 1 FROM records r WHERE r.request_id = i.request_id AND r.attempt >= i.attempt) "
            "ORDER BY i.ts")

    async def budget_state(self, user_id: str | None, tenant: str | None) -> str:
        return self.book.state(user_id, tenant)

    async def alerts(self, since: float | None = None) -> list[dict[str, Any]]:
        rows = await self._read("SELECT body FROM alerts WHERE ts >= ? ORDER BY id",
                                (since if since is not None else float("-inf"),))
        return [json.loads(r["body"]) for r in rows]

    async def stats(self) -> dict[str, Any]:
        return {**self._stats, "outstanding_reservations": self.book.outstanding, "flushes": self.flushes,
                "path": str(self.path), "pid": os.getpid()}

    async def ping(self) -> bool:
        return True


class CommitBatcher:
    """Group commit on the caller's side: concurrent ``commit`` calls from one process share one
    ``commit_many`` call, so a busy caller costs the ledger one Ray call per batch instead of one per record.
    Each ``commit`` still returns only once its record is durable. For async callers (one event loop)::

        batcher = CommitBatcher(ledger_handle)
        new = await batcher.commit(record)
    """

    def __init__(self, ledger, max_batch: int = 512) -> None:
        self.ledger = ledger
        self.max_batch = max_batch
        self._pending: list[tuple[Record, asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def commit(self, record: Record) -> bool:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((record, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        # one call in flight: records arriving meanwhile form the next batch
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                results = await self.ledger.commit_many.remote([r for r, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), ok in zip(batch, results):
                if not fut.done():
                    fut.set_result(ok)


LedgerActor = ray.remote(num_cpus=0, max_concurrency=256, max_restarts=-1, max_task_retries=-1)(Ledger)


def get_or_create_ledger(settings: Settings, *, scheduling_strategy: Any = None):
    """The cluster's one ledger: a named detached actor that racing creators all resolve to."""
    return LedgerActor.options(
        name=LEDGER_NAME, namespace=NAMESPACE, lifetime="detached", max_restarts=-1, max_task_retries=-1,
        get_if_exists=True, scheduling_strategy=scheduling_strategy,
    ).remote(settings)
