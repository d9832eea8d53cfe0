"""Batch jobs: repeats answered from the cache, the rest billed once at half price, and a driver killed mid-job
replaced by another that loses nothing and bills nothing twice (judged against the local API's billing log)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import ray

import runtime
from runtime.pricing import price
from runtime.result import Result
from runtime.usage import Usage
from tests.runtime_fixtures import fast_settings, read_billing, start_local, user_msg


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    rt = start_local(fast_settings(tmp_path_factory.mktemp("batchjobs")), fake_api_overrides={"batch_seconds": 2.0})
    yield rt
    rt.shutdown()
    ray.shutdown()


def _with_repeats(tag: str, unique: int = 350, total: int = 500, seed: int = 7) -> tuple[list[dict], list[int]]:
    """``total`` requests of which ``total - unique`` (30 %) repeat an earlier one; returns them and, per
    request, the index of the first occurrence of its prompt."""
    rng = random.Random(seed)
    base = [user_msg(f"{tag}: write one line about archive record {i} for the catalogue.", 200)
            for i in range(unique)]
    order = list(range(unique)) + [rng.randrange(unique) for _ in range(total - unique)]
    rng.shuffle(order)
    first: dict[int, int] = {}
    firsts = [first.setdefault(u, pos) for pos, u in enumerate(order)]
    return [base[u] for u in order], firsts


def _job_rows(rt, job_id: str) -> list[dict]:
    return [r for r in rt.ledger_records() if r["request_id"].startswith(job_id + "-")]


def _job_bills(rt, job_id: str) -> list[dict]:
    return [b for b in read_billing(rt.settings) if b["batch"] and str(b.get("custom_id", "")).startswith(job_id + "-")]


def _assert_billed_once_at_half_price(rt, job_id: str, results: list, n_billed: int) -> None:
    bills = _job_bills(rt, job_id)
    assert len(bills) == n_billed == len({b["custom_id"] for b in bills})  # no request sent twice
    rows = _job_rows(rt, job_id)
    billed = [r for r in rows if r["message_id"]]
    assert sorted(r["message_id"] for r in billed) == sorted(b["id"] for b in bills)  # each bill once
    by_id = {b["id"]: b for b in bills}
    for r in billed:
        b = by_id[r["message_id"]]
        assert (r["input_tokens"], r["output_tokens"]) == (b["input_tokens"], b["output_tokens"])
        assert r["cost_usd"] == pytest.approx(b["cost_usd"])
        full = price(Usage(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"]), r["model"],
                     rt.settings).total_usd
        assert r["cost_usd"] == pytest.approx(full / 2) and r["batch"]
    assert sum(r.cost_usd for r in results if isinstance(r, Result)) == pytest.approx(sum(b["cost_usd"] for b in bills))
    assert not [p for p in ray.get(rt.ledger.pending_intents.remote()) if p["request_id"].startswith(job_id)]


def test_repeats_come_from_the_cache_and_the_rest_is_billed_once_at_half_price(rt):
    reqs, firsts = _with_repeats("alpha")
    # ten of the prompts were answered live before: those are hits at once
    seeded = sorted(set(firsts))[:10]
    for r in ray.get([rt.submit(reqs[i], user_id="etl", tenant="alpha") for i in seeded]):
        assert r.cache == "miss"
    seeded_prompts = {json.dumps(reqs[i], sort_keys=True) for i in seeded}
    job = rt.batch(reqs, user_id="etl", tenant="alpha", max_requests_per_batch=100)
    p = job.progress()
    assert p["total"] == 500 and p["cached"] == sum(json.dumps(r, sort_keys=True) in seeded_prompts for r in reqs)
    assert len(p["batches"]) == 4  # 340 to send, at most 100 per batch
    assert job.wait(poll_s=0.2, progress=False)
    out = job.results()
    assert len(out) == 500 and all(isinstance(r, Result) for r in out)
    assert [r.request_id for r in out] == [f"{job.id}-{i}" for i in range(500)]
    for i, r in enumerate(out):
        assert r.message.content[0].text == out[firsts[i]].message.content[0].text
    hits = [r for r in out if r.cache in ("exact", "semantic")]
    assert len(hits) == 160 and all(r.cost_usd == 0 for r in hits)  # 150 repeats + the 10 answered before
    rows = _job_rows(rt, job.id)
    assert sum(1 for r in rows if r["cache"] in ("exact", "semantic") and r["cost_usd"] is None) == 160
    _assert_billed_once_at_half_price(rt, job.id, out, 340)
    assert ray.get(rt.ledger.stats.remote())["outstanding_reservations"] == 0
    assert any(j["id"] == job.id and j["state"] == "done" for j in rt.batch_jobs())


_DRIVER = """
import json, sys
import ray, runtime
ray.init(address=sys.argv[1], log_to_driver=False)
rt = runtime.connect()
# its own tenant: the cache is scoped per tenant, so nothing from the other test can answer these
job = rt.batch(json.load(open(sys.argv[2])), user_id="etl", tenant="bravo", max_requests_per_batch=100)
print(job.id, flush=True)
job.wait(poll_s=0.05, progress=False)
print("finished", flush=True)
"""


def test_a_killed_driver_is_resumed_from_the_job_id_losing_nothing_and_billing_nothing_twice(rt, tmp_path):
    reqs, firsts = _with_repeats("bravo", seed=11)
    (tmp_path / "reqs.json").write_text(json.dumps(reqs))
    (tmp_path / "driver.py").write_text(_DRIVER)
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), address, str(tmp_path / "reqs.json")],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        job_id = proc.stdout.readline().strip()
        assert job_id.startswith("bj-"), "the driver died before creating its job"
        folder = rt.settings.data_dir / "batch_jobs" / job_id
        # kill it once it is settling results: some answers are written, the job is not done
        deadline = time.monotonic() + 120
        while not ((folder / "outcomes.jsonl").exists() and (folder / "outcomes.jsonl").stat().st_size > 0):
            assert proc.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "the driver never started settling"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads((folder / "job.json").read_text())
    assert state["state"] != "done"  # it really died mid-job

    job = runtime.connect().batch_job(job_id)
    assert job.wait(poll_s=0.1, progress=False)
    out = job.results()
    assert len(out) == 500 and all(isinstance(r, Result) for r in out)
    for i, r in enumerate(out):
        assert r.message.content[0].text == out[firsts[i]].message.content[0].text
    assert sum(r.cache == "exact" for r in out) == 150
    _assert_billed_once_at_half_price(rt, job_id, out, 350)


def test_a_batch_created_just_before_the_driver_died_is_adopted_not_sent_again(rt):
    from runtime.batchjob import BatchJob

    reqs = [user_msg(f"charlie: a line about lighthouse {i} on the coast.", 200) for i in range(12)]
    job = BatchJob.create(rt, reqs, tenant="charlie", cache=False, max_requests_per_batch=5)
    api = job._api()
    real_create = api.messages.batches.create
    created = []

    def create_then_die(**kw):
        batch = real_create(**kw)
        created.append(batch.id)
        if len(created) == 2:
            # the process dies after the API created the batch, before its id was written anywhere
            raise SystemExit("driver killed")
        return batch

    api.messages.batches.create = create_then_die
    with pytest.raises(SystemExit):
        job.step()
    chunks = json.loads((job.dir / "job.json").read_text())["chunks"]
    assert [c["state"] for c in chunks] == ["created", "creating", "planned"]

    resumed = runtime.connect().batch_job(job.id)
    assert resumed.wait(poll_s=0.1, progress=False)
    out = resumed.results()
    assert len(out) == 12 and all(isinstance(r, Result) for r in out)
    assert resumed.progress()["batches"][:2] == created  # the orphan was adopted, not sent again
    _assert_billed_once_at_half_price(rt, job.id, out, 12)
