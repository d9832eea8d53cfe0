"""Write-ahead intents and exactly-once accounting across re-runs: the pure rules the ledger applies.

Before a call leaves, its caller writes an intent (request id, attempt, model, the reservation, who sent it)
to the ledger's file. Every intent ends in exactly one of: a billed row (the answer arrived), a void mark (the
call certainly was not billed: refused, never sent, or answered with an error status), or an ``unreconciled``
row priced at that attempt's reservation (it may have been billed, but no answer arrived). Reconciliation
against the API's bill later turns unreconciled rows into exact ones.

Attempts belong to the request, not to the process: when Ray re-runs a request on its restarted caller, the
ledger numbers the new attempts after every attempt it already knows, so the re-run's record can never be
mistaken for the lost call's.

Who sent an intent is an ``Owner``: the caller actor's name (stable across restarts), the caller process's
life (new after each restart) and the execution (one run of ``handle`` for one request)::

    me = Owner("caller-3", life="9f2c...", execution="e1")
    dead, conflict = judge_open_intents(open_intents_of_request, me, now, stale_after_s=900)

An open intent from the same caller name but another life was sent by a process that no longer exists (Ray
re-runs a task on the same actor after restarting it): it becomes unreconciled now. One older than
``stale_after_s`` too. Any other open intent belongs to a live, concurrent run of the same request id: a
duplicate id, refused rather than allowed to share (and replace) the first run's reservation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from runtime.pricing import CostBreakdown
from runtime.records import Record
from runtime.usage import Usage


@dataclass(frozen=True)
class Owner:
    caller: str
    life: str
    execution: str

    def __str__(self) -> str:
        return f"{self.caller}|{self.life}|{self.execution}"

    @classmethod
    def parse(cls, text: str | None) -> "Owner | None":
        if not text:
            return None
        parts = str(text).split("|")
        if len(parts) != 3:
            return None
        return cls(*parts)


@dataclass(frozen=True)
class OpenIntent:
    request_id: str
    attempt: int
    model: str | None
    ts: float
    owner: str | None
    reserved_usd: float
    user_id: str | None = None
    tenant: str | None = None
    priority: str = "normal"


@dataclass(frozen=True)
class Begin:
    """A caller's request to reserve budget for an attempt and write its intent, in one ledger call.

    ``attempt=None``: the first attempt of this execution; the ledger assigns the number (after every attempt
    it knows for the request) and first settles any intents a dead earlier run left open."""

    request_id: str
    owner: str
    attempt: int | None
    model: str
    user_id: str | None
    tenant: str | None
    priority: str
    reserve_usd: float


@dataclass(frozen=True)
class Begun:
    reservation: object           # runtime.budget.Reservation (None when refused as a duplicate)
    attempt: int                  # the attempt number the intent was written under (0 when not written)
    unreconciled: int = 0         # earlier attempts turned into unreconciled rows by this call
    duplicate_of: str | None = None  # owner of a live run of the same request id


def judge_open_intents(open_intents: list[OpenIntent], me: Owner, now: float, stale_after_s: float
                       ) -> tuple[list[OpenIntent], OpenIntent | None]:
    """(intents to turn into unreconciled rows now, a live conflicting intent or None)."""
    dead: list[OpenIntent] = []
    conflict: OpenIntent | None = None
    for it in open_intents:
        o = Owner.parse(it.owner)
        if o is not None and o.caller == me.caller and o.life == me.life and o.execution == me.execution:
            continue  # my own
        if o is None or (o.caller == me.caller and o.life != me.life) or now - it.ts > stale_after_s:
            dead.append(it)
        elif conflict is None:
            conflict = it
    return dead, conflict


def stale(open_intents: list[OpenIntent], now: float, stale_after_s: float) -> list[OpenIntent]:
    return [it for it in open_intents if now - it.ts > stale_after_s]


def unreconciled_record(it: OpenIntent, environment: str, ts: float | None = None) -> Record:
    """The row an intent without an outcome becomes: priced at its reservation (the most it can have cost),
    counted in spend and budgets until reconciliation replaces it."""
    amount = max(0.0, float(it.reserved_usd))
    return Record(
        request_id=it.request_id, attempt=int(it.attempt), message_id=None,
        ts=time.time() if ts is None else ts, user_id=it.user_id, tenant=it.tenant, priority=it.priority,
        model=it.model, usage=Usage(), cost=CostBreakdown(0.0, 0.0, 0.0, 0.0, amount),
        cache="miss", saved_usd=0.0, latency_s=0.0, attempts=int(it.attempt), status="unreconciled",
        error_type="answer_lost", environment=environment,
    )
