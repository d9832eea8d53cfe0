"""Message Batches: accepted at once, processed over ``batch_seconds``, billed at the batch rate.

Like the real service, a batch is ``in_progress`` until every request is done, then ``ended`` with its
``results_url``; request counts stay under ``processing`` until the end. Request i of n is due at
``created + batch_seconds * (i + 1) / n``; a cancel ends the batch shortly after with the requests due before
the cancel succeeded and the rest ``canceled``. Batch traffic bypasses the per-minute buckets and faults.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from runtime.fake_api.engine import Engine
from runtime.fake_api.protocol import ApiError
from runtime.fake_api.validation import validate

MAX_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CHUNK = 256  # requests processed between yields to the event loop


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1e6):06d}Z"


@dataclass
class Batch:
    id: str
    api_key: str
    requests: list[dict]
    created_wall: float
    created_mono: float
    status: str = "in_progress"
    cancel_wall: float | None = None
    cancel_mono: float | None = None
    ended_wall: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    results: list[bytes] = field(default_factory=list)
    task: asyncio.Task | None = None
    finishing: bool = False

    def to_json(self, base_url: str) -> dict[str, Any]:
        counts = self.counts or {"processing": len(self.requests), "succeeded": 0, "errored": 0, "canceled": 0,
                                 "expired": 0}
        return {
            "id": self.id, "type": "message_batch", "processing_status": self.status,
            "request_counts": counts,
            "created_at": _iso(self.created_wall), "expires_at": _iso(self.created_wall + 86_400),
            "ended_at": _iso(self.ended_wall), "cancel_initiated_at": _iso(self.cancel_wall),
            "archived_at": None,
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if self.status == "ended" else None,
        }


class BatchStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches: dict[str, Batch] = {}  # insertion order = creation order

    def create(self, api_key: str, body: Any) -> Batch:
        if not isinstance(body, dict):
            raise ApiError(400, "Input should be a valid dictionary or object")
        for k in body:
            if k != "requests":
                raise ApiError(400, f"{k}: Extra inputs are not permitted")
        reqs = body.get("requests")
        if not isinstance(reqs, list):
            raise ApiError(400, "requests: Field required")
        if not reqs:
            raise ApiError(400, "requests: List should have at least 1 item after validation, not 0")
        if len(reqs) > MAX_REQUESTS:
            raise ApiError(413, f"requests: at most {MAX_REQUESTS} requests per batch")
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            if not isinstance(r, dict) or not isinstance(r.get("params"), dict):
                raise ApiError(400, f"requests.{i}.params: Field required")
            cid = r.get("custom_id")
            if not isinstance(cid, str) or not _CUSTOM_ID.match(cid):
                raise ApiError(400, f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                raise ApiError(400, f"requests: custom_id {cid!r} is used more than once; custom_id must be unique")
            seen.add(cid)
        e = self.engine
        b = Batch(e.ids.make("msgbatch"), api_key, reqs, time.time(), e.cfg.clock())
        self.batches[b.id] = b
        e.stats.batch_requests += len(reqs)
        b.task = asyncio.get_running_loop().create_task(self._run(b, e.cfg.batch_seconds))
        return b

    def get(self, batch_id: str) -> Batch:
        b = self.batches.get(batch_id)
        if b is None:
            raise ApiError(404, f"message_batch {batch_id!r} not found")
        return b

    def cancel(self, batch_id: str) -> Batch:
        b = self.get(batch_id)
        if b.status == "in_progress":
            b.status = "canceling"
            b.cancel_wall, b.cancel_mono = time.time(), self.engine.cfg.clock()
            if b.finishing:
                return b  # results are being written; the cancel applies to what is left: nothing
            if b.task is not None:
                b.task.cancel()
            # canceling is observable for a moment, as on the real service
            b.task = asyncio.get_running_loop().create_task(self._run(b, 0.05))
        return b

    def delete(self, batch_id: str) -> str:
        b = self.get(batch_id)
        if b.status != "ended":
            raise ApiError(400, f"message_batch {batch_id!r} is still {b.status}; cancel it and wait for it to "
                                "end before deleting it")
        del self.batches[batch_id]
        return batch_id

    def list(self, limit: int = 20, after_id: str | None = None, before_id: str | None = None
             ) -> tuple[list[Batch], bool]:
        newest_first = list(reversed(self.batches.values()))
        ids = [b.id for b in newest_first]
        if after_id is not None:
            start = ids.index(after_id) + 1 if after_id in ids else len(ids)
            page = newest_first[start:start + limit]
            return page, start + limit < len(ids)
        if before_id is not None:
            end = ids.index(before_id) if before_id in ids else 0
            page = newest_first[max(0, end - limit):end]
            return page, end - limit > 0
        return newest_first[:limit], limit < len(ids)

    def results(self, batch_id: str) -> bytes:
        b = self.get(batch_id)
        if b.status != "ended":
            raise ApiError(400, f"message_batch {batch_id!r} has not ended yet; results are available once "
                                "processing_status is 'ended'")
        return b"".join(b.results)

    async def _run(self, b: Batch, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            return
        await self._finish(b)

    async def _finish(self, b: Batch) -> None:
        b.finishing = True
        e = self.engine
        n = len(b.requests)
        # with a cancel, only requests due before it were processed
        done_n = n
        if b.cancel_mono is not None:
            elapsed = b.cancel_mono - b.created_mono
            span = max(e.cfg.batch_seconds, 1e-9)
            done_n = max(0, min(n, int(elapsed / span * n)))
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        out: list[bytes] = []
        for i, r in enumerate(b.requests):
            cid = r["custom_id"]
            if i >= done_n:
                counts["canceled"] += 1
                out.append(orjson.dumps({"custom_id": cid, "result": {"type": "canceled"}}) + b"\n")
                continue
            try:
                prep = validate(r["params"], e.cfg.models, batch=True)
                plan = e.plan(prep, b.api_key)
                e.check_size(prep, plan)
                rep = e.reply(prep, plan, batch=True)
                e.response_started(plan)
            except ApiError as err:
                counts["errored"] += 1
                out.append(orjson.dumps({"custom_id": cid, "result": {"type": "errored", "error": {
                    "type": "error", "error": {"type": err.type, "message": err.message}, "request_id": None}}})
                    + b"\n")
            else:
                counts["succeeded"] += 1
                e.bill(rep, request_id=None, batch=True, extra={"batch_id": b.id, "custom_id": cid},
                       api_key=b.api_key)
                out.append(orjson.dumps({"custom_id": cid, "result": {"type": "succeeded",
                                                                      "message": rep.message()}}) + b"\n")
            if i % _CHUNK == _CHUNK - 1:
                await asyncio.sleep(0)
        b.results = out
        b.counts = counts
        b.ended_wall = time.time()
        b.status = "ended"
        b.task = None
