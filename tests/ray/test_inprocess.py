"""The driver's own caller (``Settings.callers.in_process``, actors/inprocess.py): ``rt.call`` / ``rt.acall`` run
the pipeline in this process, every billed answer is in the ledger once, errors come back typed, and the journal
of a process that died mid-call is drained and its call booked by the next one."""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.inprocess import InProcessCaller, adopt_orphans
from runtime.errors import InvalidRequest, UpstreamError
from runtime.request import validate
from runtime.result import Result
from tests.runtime_fixtures import fake_post, fake_stats, fast_settings, read_billing, start_local, user_msg, wait_for


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    settings = fast_settings(tmp_path_factory.mktemp("inproc"), callers={"num_callers": 1, "in_process": True},
                             ledger={"unreconciled_after_s": 3600})
    rt = start_local(settings)
    yield rt
    rt.shutdown()
    ray.shutdown()


@pytest.fixture(autouse=True)
def _calm_api(rt):
    fake_post(rt, "/_fake/config", {"p529": 0.0, "p500": 0.0, "latency_ms": 0.0, "p529_by_class": {}})
    yield


def test_call_runs_here_and_each_billed_answer_is_in_the_ledger_once(rt):
    actor_served = ray.get(rt.callers[0].load.remote())["served"]
    here = rt._local.caller._served
    results = [rt.call(user_msg(f"Name a prime number above {i * 10}.", 32), cache=False, user_id="u1")
               for i in range(12)]
    assert all(isinstance(r, Result) and r.cache == "bypass" and r.attempts == 1 for r in results)
    assert rt._local.caller._served == here + 12
    assert ray.get(rt.callers[0].load.remote())["served"] == actor_served  # no caller actor took part
    ids = {r.message.id for r in results}
    rows = [r for r in rt.ledger_records() if r["message_id"] in ids]
    assert sorted(r["message_id"] for r in rows) == sorted(ids)
    bill = {b["id"]: b for b in read_billing(rt.settings) if b["id"] in ids}
    assert bill.keys() == ids
    for r in rows:
        assert r["cost_usd"] == pytest.approx(bill[r["message_id"]]["cost_usd"], rel=1e-9)


def test_errors_come_back_typed_and_bad_input_never_reaches_the_api(rt):
    before = fake_stats(rt)["requests"]
    with pytest.raises(InvalidRequest) as exc:
        rt.call(user_msg("hi", temperature=0.3))
    assert exc.value.field == "temperature"
    assert fake_stats(rt)["requests"] == before
    bad = {"model": "auto", "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Use the tool", "cache_control": {"type": "forever"}}]}]}
    with pytest.raises(UpstreamError) as up:
        rt.call(bad, cache=False)
    assert up.value.status == 400 and len(up.value.attempts) == 1 and up.value.request_id


def test_acall_runs_concurrently_and_the_cache_answers_a_repeat(rt):
    q = user_msg("Explain in one line why the sky is blue.", 300)  # room to end its turn: only those are cached

    async def go():
        first = await rt.acall(q, tenant="inproc")
        many = await asyncio.gather(*(rt.acall(user_msg(f"Count to {i}.", 16), cache=False) for i in range(8)))
        again = await rt.acall(q, tenant="inproc")
        return first, many, again

    first, many, again = asyncio.run(go())
    assert first.cache == "miss" and again.cache == "exact" and again.cost_usd == 0
    assert again.message.content[0].text == first.message.content[0].text
    assert len({r.request_id for r in many}) == 8 and all(r.attempts == 1 for r in many)


@ray.remote(num_cpus=0)
class ADriver:
    """Any process that runs an in-process caller (a driver, a task's worker); killed like one."""

    def start(self, settings, upstreams, limiter, ledger) -> str:
        self.caller = InProcessCaller(settings, upstreams, limiter, ledger, None)
        return self.caller.name

    def call(self, req) -> Result:
        return self.caller.call(req)


def test_a_process_killed_mid_call_leaves_a_journal_the_next_one_books(rt):
    from pathlib import Path

    from actors.caller import journal_path

    ups = rt._local.caller._upstreams
    other = ADriver.remote()
    name = ray.get(other.start.remote(rt.settings, ups, rt.limiter, rt.ledger))
    journal = Path(journal_path(rt.settings, name))
    assert journal.with_suffix(".lock").exists()
    # a live process's journal is never taken
    assert name not in adopt_orphans(rt.settings, rt.ledger)

    fake_post(rt, "/_fake/config", {"latency_ms": 1500})
    req = validate(user_msg("Define a monad in one line.", 32), rt.settings, cache=False, request_id="orphan-1")
    ref = other.call.remote(req)
    wait_for(lambda: fake_stats(rt)["in_flight"]["total"] >= 1, "the call on the wire")
    assert journal.exists()
    ray.kill(other, no_restart=True)
    wait_for(lambda: not ray.wait([ref], timeout=0)[1], "the killed call's ref to fail")
    fake_post(rt, "/_fake/config", {"latency_ms": 0})

    # the ref fails when Ray declares the actor dead, which can be before its process has exited and the kernel
    # has dropped its lock
    adopted = wait_for(lambda: adopt_orphans(rt.settings, rt.ledger), "the dead process's journal to be free")
    assert adopted == [name], adopted
    assert not journal.exists()
    rows = [r for r in rt.ledger_records() if r["request_id"] == "orphan-1"]
    assert [(r["attempt"], r["status"]) for r in rows] == [(1, "unreconciled")], rows
    # the API finished the call and billed it: reconciliation turns the placeholder into the bill's row
    billed = wait_for(lambda: [b for b in read_billing(rt.settings) if b.get("runtime_request_id") == "orphan-1"],
                      "the bill of the killed call", timeout_s=30)
    summary = rt.reconcile()
    assert summary["matched"] >= 1, summary
    rows = [r for r in rt.ledger_records() if r["request_id"] == "orphan-1"]
    assert [r["status"] for r in rows] != ["unreconciled"], rows
    assert sum(r["cost_usd"] or 0 for r in rows) == pytest.approx(billed[0]["cost_usd"], rel=1e-9)


def test_starting_again_in_this_process_reuses_its_caller(rt):
    from actors.inprocess import local_caller

    same = local_caller(rt.namespace, rt.settings, rt._local.caller._upstreams, rt.limiter, rt.ledger, rt.cache)
    assert same is rt._local
    assert rt.call(user_msg("Say hi.", 8), cache=False).attempts == 1


def test_status_lists_the_in_process_caller_with_its_requests_and_leases(rt):
    from runtime.status import render

    rt.call(user_msg("Say hello.", 8), cache=False)   # holds capacity leases from here on

    def mine():
        state = rt.status()
        rows = [m for m in state["callers"]["members"] if m.get("in_process") and m["name"] == rt._local.name]
        return (state, rows[0]) if rows and rows[0].get("served") else None

    state, row = wait_for(mine, "the in-process caller in status", timeout_s=30)
    assert row["leases"] and row["in_flight"] == 0 and row["node"]
    # listed and counted apart: the pool's own callers are what its floor and target speak of
    assert state["callers"]["in_process"] == 1
    assert state["callers"]["active"] == len([m for m in state["callers"]["members"] if not m.get("in_process")])
    assert rt._local.name in state["leases"]
    assert "in-process" in render(state)


def test_acall_from_the_runtimes_own_loop_sends_the_request_once(rt):
    # a coroutine already on the in-process caller's loop (a callback of the user's, a test) awaits rt.acall: it
    # runs right there, and only there
    before = fake_stats(rt)["requests"]
    q = user_msg("Name one ocean.", 16)
    result = rt._local._submit(rt.acall(q, cache=False)).result(timeout=60)
    wait_for(lambda: rt._local.in_flight() == 0, "the caller to have nothing running")
    assert fake_stats(rt)["requests"] == before + 1
    rows = [r for r in rt.ledger_records() if r["request_id"] == result.request_id]
    assert [(r["attempt"], r["message_id"]) for r in rows] == [(1, result.message.id)]


def test_close_drains_the_journal_and_removes_its_files(rt):
    # last in this module: it closes the module's in-process caller
    from pathlib import Path

    from actors.caller import journal_path

    local = rt._local
    journal = Path(journal_path(rt.settings, local.name))
    res = rt.call(user_msg("One word for happy.", 8), cache=False)
    assert journal.exists()
    local.close()
    assert not journal.exists() and not journal.with_suffix(".lock").exists()
    rows = ray.get(rt.ledger.records.remote(None, None))
    assert [r["message_id"] for r in rows if r["request_id"] == res.request_id] == [res.message.id]
