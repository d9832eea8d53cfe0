"""Batch jobs: offline work through Message Batches, at half price, that outlive the driver that started them.

    job = rt.batch(requests, user_id="etl")        # validated, persisted, cache hits answered, batches created
    job.id                                          # "bj-...": resume anywhere with runtime.connect().batch_job(id)
    job.progress()                                  # counts, live from the API for batches still running
    job.wait()                                      # drive it to the end (collect results, bill, cache)
    job.results()                                   # input order: a Result or a typed error each
    job.cancel()

A job moves through states, each step durable before the next begins, so a driver killed anywhere can be
replaced by another that calls ``wait()`` (``runtime.connect().batch_job(id)``) and nothing is lost or billed
twice:

    prepared   requests validated and routed, one line each in requests.jsonl (InvalidRequest: nothing kept)
    probed     cache looked up (hits answered at once: hits.jsonl, then a $0 ledger row each); repeats of a
               request inside the job become followers of its first occurrence (answered from the cache when it
               returns); the rest, the leaders, go to the API
    planned    leaders split into chunks that fit the API's limits (100,000 requests or 256 MB per batch)
    submitted  per chunk: budget reserved with a write-ahead intent per request (ledger.begin; attempts kept in
               chunk-K.json), "creating" written with a timestamp, the batch created, its id written here and
               in the ledger (note_batch)
    done       per chunk, once ended: results billed at the batch price (ledger commits are idempotent by
               message id, so a resumed driver re-committing them changes nothing), answers stored in the cache,
               followers answered, outcomes.jsonl appended, chunk marked settled

A driver killed between creating a batch and writing its id leaves a chunk "creating": the next driver looks for
a batch the ledger does not know, of the chunk's size, created since, and adopts it (``runtime.batch.orphan_batch``);
finding none, it sends the chunk again. Steps run under an exclusive lock on the job's folder, so two drivers
never act at once. Everything lives in ``data_dir/batch_jobs/<id>/``: a driver on another node needs data_dir on
shared storage (the README says the same of the ledger).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import ray

from runtime import cache_policy as policy
from runtime.batch import (MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, BatchItem, batch_entry, entry_size, orphan_batch,
                           outcome_line, outcome_value, plan_chunks, settle)
from runtime.errors import ConfigurationError, InvalidRequest, RequestLost, UpstreamError
from runtime.intents import Begin, Owner
from runtime.records import Record
from runtime.request import NormalizedRequest, validate
from runtime.result import Result
from runtime.usage import Usage

JOBS_DIR = "batch_jobs"
_PROBE_SLICE = 64
_PUT_SLICE = 64


def _jobs_root(settings: Any) -> Path:
    return Path(settings.data_dir) / JOBS_DIR


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, separators=(",", ":"), default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _append_lines(path: Path, lines: Iterable[dict]) -> None:
    with open(path, "a") as fh:
        for line in lines:
            fh.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_lines(path: Path) -> Iterator[dict]:
    try:
        fh = open(path)
    except FileNotFoundError:
        return
    with fh:
        for raw in fh:
            if raw.endswith("\n"):  # a line cut by a crash mid-write was never acknowledged: skip it
                yield json.loads(raw)


def _unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        return exc.cause
    return exc


class BatchJob:
    """A handle on one job; cheap to make, holds nothing but its id. See the module docstring."""

    def __init__(self, rt: Any, job_id: str) -> None:
        self.rt = rt
        self.id = job_id
        self.dir = _jobs_root(rt.settings) / job_id
        if not (self.dir / "job.json").exists():
            raise ConfigurationError(f"no batch job {job_id!r} under {self.dir.parent}", field="job_id")
        self._client = None
        self._items_cache: list[dict] | None = None

    def __repr__(self) -> str:
        return f"BatchJob({self.id!r})"

    # -- creating ----------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, rt: Any, requests: Iterable[dict[str, Any]], *, user_id: str | None = None,
               tenant: str | None = None, priority: str = "bulk", cache: bool = True,
               max_requests_per_batch: int = MAX_BATCH_REQUESTS, max_bytes_per_batch: int = MAX_BATCH_BYTES
               ) -> "BatchJob":
        from runtime.router import route

        s = rt.settings
        if not (1 <= max_requests_per_batch <= MAX_BATCH_REQUESTS):
            raise ConfigurationError(f"max_requests_per_batch must be in [1, {MAX_BATCH_REQUESTS}]")
        job_id = f"bj-{uuid.uuid4().hex[:16]}"
        folder = _jobs_root(s) / job_id
        folder.mkdir(parents=True)
        n = 0
        try:
            # validated and routed one at a time, straight to disk: a generator of any size is never held whole
            with open(folder / "requests.jsonl", "w") as fh:
                for i, r in enumerate(requests):
                    norm = validate(r, s, user_id=user_id, tenant=tenant, priority=priority, cache=cache,
                                    request_id=f"{job_id}-{i}")
                    chosen = route(norm.requested_model, norm.params, s)
                    fh.write(json.dumps({"i": i, "model": chosen.model, "reason": chosen.reason,
                                         "req": asdict(norm)}, separators=(",", ":")) + "\n")
                    n = i + 1
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
            raise
        _write_json(folder / "job.json", {
            "id": job_id, "created_at": time.time(), "n": n, "user_id": user_id, "tenant": tenant,
            "priority": priority, "cache": bool(cache), "owner": str(Owner("batchjob", job_id, "1")),
            "max_requests": max_requests_per_batch, "max_bytes": max_bytes_per_batch, "state": "prepared",
            "cancelled": False, "chunks": [], "hits": 0, "followers": 0, "leaders": 0,
            "counts": {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, "refused": 0, "missing": 0},
        })
        return cls(rt, job_id)

    # -- files -------------------------------------------------------------------------------------------------
    def _job(self) -> dict[str, Any]:
        return json.loads((self.dir / "job.json").read_text())

    def _save(self, job: dict[str, Any]) -> None:
        _write_json(self.dir / "job.json", job)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        with open(self.dir / "lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _items(self) -> list[dict]:
        if self._items_cache is None:
            self._items_cache = list(_read_lines(self.dir / "requests.jsonl"))
        return self._items_cache

    @staticmethod
    def _norm(item: dict) -> NormalizedRequest:
        return NormalizedRequest(**item["req"])

    def _batch_item(self, item: dict, attempt: int = 1) -> BatchItem:
        return BatchItem(self._norm(item), item["model"], item["reason"], attempt)

    def _chunk_file(self, k: int) -> Path:
        return self.dir / f"chunk-{k}.json"

    def _api(self):
        if self._client is None:
            import anthropic

            self._client = anthropic.Anthropic(base_url=self.rt._base_url(), api_key=self.rt._api_key(),
                                               max_retries=2)
        return self._client

    def _callers(self) -> list:
        return self.rt.callers

    # -- the steps -----------------------------------------------------------------------------------------------
    def step(self) -> str:
        """Advance the job as far as it can go now without waiting; returns its state. Safe to call from any
        number of drivers: steps are serialised by a lock and each is idempotent."""
        with self._locked():
            job = self._job()
            if job["state"] == "prepared":
                self._probe(job)
            if job["state"] == "probed":
                self._plan(job)
            if job["state"] == "planned":
                self._submit(job)
            if job["state"] == "submitted":
                self._collect(job)
            return job["state"]

    def _hit_record(self, item: dict, kind: str, model: str | None, saved: float) -> Record:
        req = item["req"]
        return Record(request_id=req["request_id"], attempt=0, message_id=None, ts=time.time(),
                      user_id=req["user_id"], tenant=req["tenant"], priority=req["priority"], model=model,
                      usage=Usage(), cost=None, cache=kind, saved_usd=float(saved), latency_s=0.0, attempts=0,
                      status="ok", error_type=None, batch=True, environment=self.rt.settings.environment)

    def _commit(self, records: list[Record]) -> None:
        for r in ray.get(self.rt.ledger.commit_many.remote(records)) if records else []:
            if isinstance(r, BaseException):
                raise r

    def _probe(self, job: dict[str, Any]) -> None:
        items = self._items()
        cs = self.rt.settings.cache
        hits = {h["i"]: h for h in _read_lines(self.dir / "hits.jsonl")}
        use_cache = job["cache"] and self.rt.cache is not None
        if use_cache:
            todo = [it for it in items if it["i"] not in hits and it["req"]["cache_enabled"]]
            callers = self._callers()
            for w in range(0, len(todo), _PROBE_SLICE * 8):
                wave = todo[w:w + _PROBE_SLICE * 8]
                slices = [wave[j:j + _PROBE_SLICE] for j in range(0, len(wave), _PROBE_SLICE)]
                refs = [callers[j % len(callers)].cache_probe.remote(
                    [(it["req"]["params"], it["model"], it["req"]["tenant"], True) for it in sl])
                    for j, sl in enumerate(slices)]
                found = []
                for sl, got in zip(slices, ray.get(refs)):
                    for it, hit in zip(sl, got):
                        if hit is not None:
                            found.append({"i": it["i"], "kind": hit["kind"], "message": hit["message"],
                                          "saved_usd": hit["saved_usd"]})
                if found:
                    # on disk before the ledger: every hit row in the ledger has its answer here
                    _append_lines(self.dir / "hits.jsonl", found)
                    hits.update((h["i"], h) for h in found)
        # (again) every hit's $0 row: idempotent, so a driver that died between the two writes loses none
        self._commit([self._hit_record(items[i], h["kind"], h["message"].get("model"), h["saved_usd"])
                      for i, h in hits.items()])
        leaders: list[int] = []
        followers: dict[int, int] = {}
        first: dict[str, int] = {}
        for it in items:
            i = it["i"]
            if i in hits:
                continue
            params, tenant = it["req"]["params"], it["req"]["tenant"]
            if use_cache and policy.bypass_reason(params, cs, it["req"]["cache_enabled"]) is None:
                key = policy.exact_key(params, it["model"], tenant)
                if key in first:
                    followers[i] = first[key]  # the same request again: answered with the first one's answer
                    continue
                first[key] = i
            leaders.append(i)
        _write_json(self.dir / "plan.json", {"leaders": leaders, "followers": followers})
        job.update(state="probed", hits=len(hits), followers=len(followers), leaders=len(leaders))
        self._save(job)

    def _plan_doc(self) -> dict[str, Any]:
        doc = json.loads((self.dir / "plan.json").read_text())
        doc["followers"] = {int(k): v for k, v in doc["followers"].items()}
        return doc

    def _plan(self, job: dict[str, Any]) -> None:
        items = self._items()
        leaders = self._plan_doc()["leaders"]
        sizes = [entry_size(batch_entry(self._batch_item(items[i]))) for i in leaders]
        job["chunks"] = [{"k": k, "start": a, "end": b, "state": "planned", "batch_id": None, "ts": None,
                          "counts": {}}
                         for k, (a, b) in enumerate(plan_chunks(sizes, job["max_requests"], job["max_bytes"]))]
        job["state"] = "planned"
        self._save(job)

    def _chunk_indices(self, chunk: dict[str, Any]) -> list[int]:
        return self._plan_doc()["leaders"][chunk["start"]:chunk["end"]]

    def _begin_chunk(self, job: dict[str, Any], chunk: dict[str, Any]) -> None:
        """Reserve each request's worst-case batch cost and write its intent; refusals are answered now."""
        from runtime.estimate import input_upper_bound
        from runtime.pricing import bound_cost

        s = self.rt.settings
        items = self._items()
        idx = self._chunk_indices(chunk)
        begins = ray.get([self.rt.ledger.begin.remote(Begin(
            request_id=items[i]["req"]["request_id"], owner=job["owner"], attempt=None, model=items[i]["model"],
            user_id=items[i]["req"]["user_id"], tenant=items[i]["req"]["tenant"],
            priority=items[i]["req"]["priority"],
            reserve_usd=bound_cost(items[i]["model"], input_upper_bound(items[i]["req"]["params"]).tokens,
                                   items[i]["req"]["max_tokens"], s, batch=True, worst_tier=True)))
            for i in idx])
        attempts: dict[str, int] = {}
        refused = []
        for i, b in zip(idx, begins):
            rid = items[i]["req"]["request_id"]
            if b.duplicate_of is not None:
                refused.append(outcome_line(i, InvalidRequest(f"request_id {rid!r} is already in flight",
                                                              request_id=rid, field="request_id")))
            elif not b.reservation.granted:
                refused.append(outcome_line(i, b.reservation.refusal(rid)))
            else:
                attempts[str(i)] = b.attempt
        _write_json(self._chunk_file(chunk["k"]), {"attempts": attempts})
        if refused:
            lines, _ = self._answer_followers({o["i"]: outcome_value(o) for o in refused})
            _append_lines(self.dir / "outcomes.jsonl", refused + lines)
            job["counts"]["refused"] += len(refused)
        chunk["state"] = "begun"
        self._save(job)

    def _attempts(self, chunk: dict[str, Any]) -> dict[int, int]:
        return {int(i): a for i, a in json.loads(self._chunk_file(chunk["k"]).read_text())["attempts"].items()}

    def _void(self, job: dict[str, Any], chunk: dict[str, Any], error_type: str) -> None:
        """The chunk's requests certainly were not (and will not be) billed: close their intents, free their
        budget."""
        items = self._items()
        recs = []
        for i, attempt in self._attempts(chunk).items():
            req = items[i]["req"]
            recs.append(Record(request_id=req["request_id"], attempt=attempt, message_id=None, ts=time.time(),
                               user_id=req["user_id"], tenant=req["tenant"], priority=req["priority"],
                               model=items[i]["model"], status="error", error_type=error_type, batch=True,
                               environment=self.rt.settings.environment, void_attempts=(attempt,)))
        self._commit(recs)
        ray.get([self.rt.ledger.release.remote(r.request_id, job["owner"]) for r in recs])

    def _known_batch_ids(self, job: dict[str, Any]) -> set[str]:
        known = {b["batch_id"] for b in ray.get(self.rt.ledger.batches.remote())}
        return known | {c["batch_id"] for c in job["chunks"] if c["batch_id"]}

    def _find_orphan(self, job: dict[str, Any], chunk: dict[str, Any], n: int) -> str | None:
        listed = []
        for b in self._api().messages.batches.list(limit=100):
            created = b.created_at.timestamp()
            if created < chunk["ts"] - 120:
                break  # newest first: the rest are older still
            c = b.request_counts
            listed.append({"id": b.id, "created_at": created,
                           "total": c.processing + c.succeeded + c.errored + c.canceled + c.expired})
        return orphan_batch(listed, self._known_batch_ids(job), n, chunk["ts"])

    def _submit(self, job: dict[str, Any]) -> None:
        from runtime.transport import classify

        items = self._items()
        for chunk in job["chunks"]:
            if chunk["state"] in ("created", "settled", "cancelled"):
                continue
            if chunk["state"] == "creating":
                # the last driver died while creating this chunk's batch: it may exist
                send = sorted(self._attempts(chunk))
                adopted = self._find_orphan(job, chunk, len(send))
                if adopted is not None:
                    chunk.update(state="created", batch_id=adopted)
                    self._save(job)
                    ray.get(self.rt.ledger.note_batch.remote(
                        adopted, [items[i]["req"]["request_id"] for i in send], job["owner"]))
                    if job["cancelled"]:
                        with contextlib.suppress(Exception):
                            self._api().messages.batches.cancel(adopted)
                    continue
            if job["cancelled"]:
                if chunk["state"] != "planned":
                    self._void(job, chunk, "canceled")
                self._answer_cancelled(job, chunk)
                continue
            if chunk["state"] == "planned":
                self._begin_chunk(job, chunk)
            attempts = self._attempts(chunk)
            if not attempts:  # every request of it was refused
                chunk["state"] = "settled"
                self._save(job)
                continue
            send = sorted(attempts)
            rids = [items[i]["req"]["request_id"] for i in send]
            chunk.update(state="creating", ts=time.time())
            self._save(job)
            try:
                batch = self._api().messages.batches.create(
                    requests=[batch_entry(self._batch_item(items[i], attempts[i])) for i in send])
            except Exception as exc:  # noqa: BLE001
                f = classify(exc)
                if f.sent != "maybe":
                    # certainly not created: nothing is billed; the chunk starts over on the next step
                    self._void(job, chunk, f.error_type)
                    chunk.update(state="planned", ts=None)
                    self._save(job)
                raise UpstreamError(
                    f"creating batch {chunk['k']} of job {self.id} failed: {f.status} {f.error_type}: {f.message}; "
                    f"resume with runtime.connect().batch_job({self.id!r}).wait()"
                    + (" (it may have been created: the next step looks for it)" if f.sent == "maybe" else ""),
                    status=f.status, error_type=f.error_type, attempts=[]) from None
            chunk.update(state="created", batch_id=batch.id)
            self._save(job)
            ray.get(self.rt.ledger.note_batch.remote(batch.id, rids, job["owner"]))
        job["state"] = "submitted"
        self._save(job)

    def _answer_cancelled(self, job: dict[str, Any], chunk: dict[str, Any]) -> None:
        items = self._items()
        done = {o["i"] for o in _read_lines(self.dir / "outcomes.jsonl")}
        values = {}
        for i in self._chunk_indices(chunk):
            if i not in done:
                rid = items[i]["req"]["request_id"]
                values[i] = UpstreamError("batch job cancelled before this request was sent", request_id=rid,
                                          status=None, error_type="canceled", attempts=[])
        lines = [outcome_line(i, v) for i, v in values.items()]
        _append_lines(self.dir / "outcomes.jsonl", lines + self._answer_followers(values)[0])
        job["counts"]["canceled"] += len(lines)
        chunk["state"] = "cancelled"
        self._save(job)

    def _collect(self, job: dict[str, Any]) -> None:
        import anthropic

        for chunk in job["chunks"]:
            if chunk["state"] != "created":
                continue
            try:
                batch = self._api().messages.batches.retrieve(chunk["batch_id"])
            except (anthropic.APIConnectionError, anthropic.InternalServerError):
                continue  # a blip while polling: the batch goes on regardless
            if batch.processing_status == "ended":
                self._settle_chunk(job, chunk)
        if all(c["state"] in ("settled", "cancelled") for c in job["chunks"]):
            job["state"] = "done"
            self._save(job)

    def _settle_chunk(self, job: dict[str, Any], chunk: dict[str, Any]) -> None:
        s = self.rt.settings
        items = self._items()
        attempts = self._attempts(chunk)
        by_rid = {items[i]["req"]["request_id"]: i for i in attempts}
        started = chunk["ts"] or job["created_at"]
        records, values = [], {}
        for entry in self._api().messages.batches.results(chunk["batch_id"]):
            i = by_rid.get(entry.custom_id)
            if i is None:
                continue
            record, value = settle(self._batch_item(items[i], attempts[i]), entry.result, s, started)
            records.append(record)
            values[i] = value
        for i in attempts:
            if i not in values:
                req = items[i]["req"]
                records.append(Record(request_id=req["request_id"], attempt=attempts[i], message_id=None,
                                      ts=time.time(), user_id=req["user_id"], tenant=req["tenant"],
                                      priority=req["priority"], model=items[i]["model"], status="error",
                                      error_type="missing", batch=True, environment=s.environment,
                                      void_attempts=(attempts[i],)))
                values[i] = RequestLost("the batch ended without a result for this request",
                                        request_id=req["request_id"])
        self._commit(records)  # idempotent: a resumed driver re-committing these changes nothing
        missing = [i for i, v in values.items() if isinstance(v, RequestLost)]
        ray.get([self.rt.ledger.release.remote(items[i]["req"]["request_id"], job["owner"]) for i in missing])
        # answers go to the cache as a live miss's would, then the job's repeats of them are answered from it
        answered = [(i, v) for i, v in values.items() if isinstance(v, Result)]
        if job["cache"] and self.rt.cache is not None and answered:
            callers = self._callers()
            puts = [(items[i]["req"]["params"], items[i]["model"], items[i]["req"]["tenant"],
                     v.message.model_dump(mode="json"), v.cost_usd) for i, v in answered
                    if items[i]["req"]["cache_enabled"]]
            ray.get([callers[j % len(callers)].cache_put.remote(puts[a:a + _PUT_SLICE])
                     for j, a in enumerate(range(0, len(puts), _PUT_SLICE))])
        follower_lines, follower_records = self._answer_followers(values)
        self._commit(follower_records)
        _append_lines(self.dir / "outcomes.jsonl",
                      [outcome_line(i, v) for i, v in sorted(values.items())] + follower_lines)
        counts = {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, "missing": len(missing)}
        for r in records:
            if r.billed:
                counts["succeeded"] += 1
            elif r.error_type in ("canceled", "expired"):
                counts[r.error_type] += 1
            elif r.error_type != "missing":
                counts["errored"] += 1
        chunk.update(state="settled", counts=counts)
        for k, v in counts.items():
            job["counts"][k] = job["counts"].get(k, 0) + v
        self._save(job)

    def _answer_followers(self, values: dict[int, Any]) -> tuple[list[dict], list[Record]]:
        """Repeats of the settled leaders: the leader's answer as an exact cache hit ($0, saving what the
        leader cost), or the leader's error."""
        items = self._items()
        lines, records = [], []
        for f, leader in self._plan_doc()["followers"].items():
            if leader not in values:
                continue
            lead = values[leader]
            it = items[f]
            rid = it["req"]["request_id"]
            if isinstance(lead, Result):
                res = Result(message=lead.message, model=lead.model, cache="exact", cost_usd=0.0, attempts=0,
                             latency_s=lead.latency_s, request_id=rid, saved_usd=lead.cost_usd,
                             route_reason=it["reason"], user_id=it["req"]["user_id"], tenant=it["req"]["tenant"])
                lines.append(outcome_line(f, res))
                records.append(self._hit_record(it, "exact", lead.model, lead.cost_usd))
            else:
                err = outcome_value({**outcome_line(f, lead), "request_id": rid})
                lines.append(outcome_line(f, err))
        return lines, records

    # -- what users call -----------------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """Where the job stands: requests answered from the cache, sent, and per outcome; counts of batches
        still running come live from the API."""
        job = self._job()
        counts = dict(job["counts"])
        processing = 0
        for c in job["chunks"]:
            if c["state"] == "created":
                try:
                    rc = self._api().messages.batches.retrieve(c["batch_id"]).request_counts
                except Exception:  # noqa: BLE001 - progress is best effort
                    continue
                processing += rc.processing
                for k in ("succeeded", "errored", "canceled", "expired"):
                    counts[k] = counts.get(k, 0) + getattr(rc, k)
        answered_followers = sum(1 for o in _read_lines(self.dir / "outcomes.jsonl")
                                 if o["ok"] and o.get("cache") == "exact")
        done = job["hits"] + answered_followers + sum(counts.get(k, 0) for k in
                                                     ("succeeded", "errored", "canceled", "expired", "refused",
                                                      "missing"))
        return {"id": self.id, "state": job["state"], "cancelled": job["cancelled"], "total": job["n"],
                "cached": job["hits"], "repeats": job["followers"], "sent": job["leaders"],
                "batches": [c["batch_id"] for c in job["chunks"] if c["batch_id"]], "processing": processing,
                "done": min(done, job["n"]), **counts}

    def wait(self, timeout_s: float | None = None, *, poll_s: float = 2.0, progress: bool = True) -> bool:
        """Drive the job until it is done (True), or ``timeout_s`` passes (False; it goes on, resume later)."""
        from tqdm.auto import tqdm

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = None
        try:
            while True:
                state = self.step()
                if progress:
                    p = self.progress()
                    if bar is None:
                        bar = tqdm(total=p["total"], desc=f"batch job {self.id}", unit="req")
                    bar.n = p["done"]
                    bar.refresh()
                if state == "done":
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
        finally:
            if bar is not None:
                bar.close()

    def done(self) -> bool:
        return self._job()["state"] == "done"

    def results(self, *, wait: bool = True, poll_s: float = 2.0, progress: bool = False) -> list[Any]:
        """In input order: a ``Result`` or a typed error per request (waits for the job unless ``wait=False``,
        which raises if it is not done)."""
        if not self.done():
            if not wait:
                raise RuntimeError(f"batch job {self.id} is not done yet")
            self.wait(poll_s=poll_s, progress=progress)
        items = self._items()
        out: list[Any] = [None] * len(items)
        for h in _read_lines(self.dir / "hits.jsonl"):
            i = h["i"]
            if out[i] is not None:
                continue  # the first recorded hit is the one in the ledger
            it = items[i]
            import anthropic

            out[i] = Result(message=anthropic.types.Message.model_validate(h["message"]),
                            model=h["message"].get("model"), cache=h["kind"], cost_usd=0.0, attempts=0,
                            latency_s=0.0, request_id=it["req"]["request_id"], saved_usd=h["saved_usd"],
                            route_reason=it["reason"], user_id=it["req"]["user_id"], tenant=it["req"]["tenant"])
        hits = {i for i, v in enumerate(out) if v is not None}
        for line in _read_lines(self.dir / "outcomes.jsonl"):
            if line["i"] not in hits:
                out[line["i"]] = outcome_value(line)  # a line written twice (a resumed settle): the same answer
        for i, v in enumerate(out):
            if v is None:
                out[i] = RequestLost("the batch job ended without an answer for this request",
                                     request_id=items[i]["req"]["request_id"])
        return out

    def cancel(self) -> None:
        """Stop the job: batches still running are cancelled at the API (requests it already processed keep
        their answers, and are billed), chunks not yet sent never are."""
        with self._locked():
            job = self._job()
            job["cancelled"] = True
            self._save(job)
            for c in job["chunks"]:
                if c["state"] == "created":
                    try:
                        self._api().messages.batches.cancel(c["batch_id"])
                    except Exception:  # noqa: BLE001 - already ended, or a blip: the next step still collects it
                        pass
        if job["state"] in ("prepared", "probed", "planned"):
            self.step()


def list_jobs(settings: Any) -> list[dict[str, Any]]:
    """Every job under data_dir: id, state, size, creation time (newest first)."""
    root = _jobs_root(settings)
    out = []
    for d in root.iterdir() if root.exists() else []:
        try:
            job = json.loads((d / "job.json").read_text())
        except (OSError, ValueError):
            continue
        out.append({"id": job["id"], "state": job["state"], "n": job["n"], "created_at": job["created_at"],
                    "cancelled": job["cancelled"]})
    return sorted(out, key=lambda j: -j["created_at"])
