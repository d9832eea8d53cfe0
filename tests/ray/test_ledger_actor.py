"""The ledger actor on real Ray with a real SQLite file: durability across restarts, idempotency, budgets
under concurrency, intents, alerts (webhook included) and the report read straight from the file."""

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray

from tests.runtime_fixtures import ray_local  # noqa: F401 - a fixture
from actors.ledger import LedgerActor, NAMESPACE, get_or_create_ledger
from runtime.intents import Begin
from runtime import report
from runtime.pricing import CostBreakdown, price
from runtime.records import Record
from runtime.settings import Settings
from runtime.usage import Usage

pytestmark = pytest.mark.ray




def make_ledger(tmp_path, **settings_kw):
    s = Settings(data_dir=tmp_path, **settings_kw)
    # a unique name per test: the module shares one Ray session
    h = LedgerActor.options(name=f"ledger-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE,
                            lifetime="detached", get_if_exists=True).remote(s)
    return h, s


@pytest.fixture
def ledgers(ray_local):
    made = []
    yield made
    for h in made:
        ray.kill(h, no_restart=True)


def billed(i, cost=0.01, request_id=None, user="u1", tenant="t1", model="claude-sonnet-5-5", ts=None, **kw):
    return Record(request_id=request_id or f"req-{i}", attempt=1, message_id=f"msg-{i}",
                  ts=ts or time.time(), user_id=user, tenant=tenant, priority="normal", model=model,
                  usage=Usage(input_tokens=100, output_tokens=10), cost=CostBreakdown(cost, 0, 0, 0, cost),
                  latency_s=0.1, **kw)


def failed(i, attempt=1):
    return Record(request_id=f"req-{i}", attempt=attempt, message_id=None, ts=time.time(), user_id="u1",
                  tenant="t1", priority="normal", model="claude-sonnet-5-5", status="error",
                  error_type="overloaded_error")


def wait_ready(h, timeout=60):
    deadline = time.time() + timeout
    while True:
        try:
            return ray.get(h.ping.remote(), timeout=10)
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def test_commit_is_idempotent_by_identity(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path)
    ledgers.append(h)
    r = billed(1, cost=0.02)
    assert ray.get(h.commit.remote(r)) is True
    assert ray.get(h.commit.remote(r)) is False                      # a retried write of the same response
    assert ray.get(h.commit.remote(r.to_row())) is False             # also as a dict
    # the same request re-run after its caller died, billed under a new message id: both are money spent
    assert ray.get(h.commit.remote(billed(2, cost=0.03, request_id="req-1"))) is True
    # failure rows are identified by (request id, attempt, status)
    assert ray.get(h.commit_many.remote([failed(9), failed(9), failed(9, attempt=2)])) == [True, False, True]
    st = ray.get(h.stats.remote())
    assert (st["rows"], st["billed"], st["errors"]) == (4, 2, 2)
    assert st["total_usd"] == pytest.approx(0.05)
    assert ray.get(h.spend.remote()) == pytest.approx({"claude-sonnet-5-5": 0.05})
    rows = ray.get(h.records.remote())
    assert len(rows) == 4 and Record.from_row(rows[0]).cost == r.cost


def test_kill_mid_run_replays_with_no_duplicates_and_same_totals(tmp_path, ledgers):
    h, s = make_ledger(tmp_path, budgets={"daily_usd": 100.0})
    ledgers.append(h)
    n = 600
    models = ("claude-sonnet-5-5", "claude-haiku-5-5")
    recs = [billed(i, cost=0.001 * (1 + i % 7), user=f"u{i % 3}", model=models[i % 2]) for i in range(n)]
    expected_total = sum(r.cost_usd for r in recs)
    pid = ray.get(h.stats.remote())["pid"]
    refs = []
    for i in range(0, n, 20):
        refs.append(h.commit_many.remote(recs[i:i + 20]))
        refs += [h.commit.remote(recs[j]) for j in range(i, i + 20, 5)]  # some doubled writes race the first
        if i == 300:
            ray.kill(h, no_restart=False)  # Ray restarts it; in-flight calls are retried against the new one
    ray.get(refs, timeout=120)
    wait_ready(h)
    st = ray.get(h.stats.remote())
    assert st["pid"] != pid  # it really was restarted
    assert st["rows"] == n and st["billed"] == n
    assert st["total_usd"] == pytest.approx(expected_total)
    rows = ray.get(h.records.remote())
    assert len({(r["request_id"], r["message_id"]) for r in rows}) == n == len(rows)
    # every retried write after the restart is a duplicate
    assert ray.get(h.commit_many.remote(recs)) == [False] * n
    by_user = ray.get(h.spend.remote(by="user"))
    # a second restart rebuilds the same totals from the file alone
    ray.kill(h, no_restart=False)
    wait_ready(h)
    st2 = ray.get(h.stats.remote())
    assert st2["rows"] == n and st2["total_usd"] == pytest.approx(expected_total)
    assert ray.get(h.spend.remote(by="user")) == pytest.approx(by_user)
    assert sum(by_user.values()) == pytest.approx(expected_total)
    # and the budget book was replayed too: the day's spend is there
    assert ray.get(h.budget_state.remote("u0", None)) == "normal"
    assert ray.get(h.reserve.remote("x", "u0", None, "normal", 100.0 - expected_total + 0.01)).granted is False


def test_64_concurrent_reserves_never_overshoot_a_dollar(tmp_path, ledgers):
    import random

    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    rng = random.Random(7)
    amounts = [rng.uniform(0.01, 0.1) for _ in range(64)]
    res = ray.get([h.reserve.remote(f"r{i}", f"u{i % 4}", None, "normal", a) for i, a in enumerate(amounts)])
    granted = [a for a, r in zip(amounts, res) if r.granted]
    refused = [r for r in res if not r.granted]
    assert sum(granted) <= 1.0 + 1e-9
    assert refused and all(r.state == "stop" and r.budget == "daily" for r in refused)
    assert sum(granted) + min(a for a, r in zip(amounts, res) if not r.granted) > 1.0  # it filled up
    assert any(r.state == "downgrade" for r in res if r.granted)
    assert ray.get(h.budget_state.remote("u0", None)) in ("downgrade", "stop")
    # settle the granted ones at half their reservation: room comes back
    for i, (a, r) in enumerate(zip(amounts, res)):
        if r.granted:
            ray.get(h.commit.remote(billed(i, cost=a / 2, request_id=f"r{i}")))
    assert ray.get(h.stats.remote())["outstanding_reservations"] == 0
    assert ray.get(h.spend.remote(by="day")) == pytest.approx({time.strftime("%Y-%m-%d", time.gmtime()):
                                                             sum(granted) / 2})
    r = ray.get(h.reserve.remote("late", "u1", None, "normal", 0.4))
    assert r.granted
    ray.get(h.release.remote("late"))
    assert ray.get(h.stats.remote())["outstanding_reservations"] == 0


def owner(caller="caller-0", life="l1", execution="e1"):
    return f"{caller}|{life}|{execution}"


def begin(rid, attempt=None, reserve=0.05, who=None, model="claude-sonnet-5-5", priority="normal", wait_s=None):
    return Begin(request_id=rid, owner=who or owner(), attempt=attempt, model=model, user_id="u1", tenant="t1",
                 priority=priority, reserve_usd=reserve,
                 deadline_at=time.time() + wait_s if wait_s is not None else None)


def wait_until(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def queued(h):
    return ray.get(h.stats.remote(), timeout=30)["queued_reservations"]


def test_intents_without_outcome_are_pending_across_restart(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path)
    ledgers.append(h)
    # one call at a time: the pending list is ordered by when each intent was written
    for rid, attempt, model in [("a", 1, "claude-sonnet-5-5"), ("b", 1, "claude-opus-5-5"),
                                ("b", 1, "claude-opus-5-5"), ("c", 2, "claude-haiku-5-5")]:
        ray.get(h.intent.remote(rid, attempt, model, owner(execution=rid), 0.01))
    ray.get(h.commit.remote(billed(1, request_id="a")))
    ray.get(h.commit.remote(billed(2, request_id="c")))  # attempt 1's answer: attempt 2's call is unanswered
    ray.kill(h, no_restart=False)
    wait_ready(h)
    pending = ray.get(h.pending_intents.remote())
    assert [(p["request_id"], p["attempt"]) for p in pending] == [("b", 1), ("c", 2)]
    # and their reservations came back with them, so a restart frees no budget that may be in use
    assert ray.get(h.stats.remote())["outstanding_reservations"] == 2


def test_begin_reserves_and_writes_the_intent_only_when_granted(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    ok = ray.get(h.begin.remote(begin("g", reserve=0.6)))
    refused = ray.get(h.begin.remote(begin("r", reserve=0.6, who=owner(execution="e2"))))
    assert ok.reservation.granted and ok.attempt == 1
    assert not refused.reservation.granted and refused.reservation.state == "stop" and refused.attempt == 0
    assert [(p["request_id"], p["attempt"]) for p in ray.get(h.pending_intents.remote())] == [("g", 1)]
    # a downgrade re-records the attempt's model before the call leaves
    ray.get(h.begin.remote(begin("g", attempt=1, reserve=0.1, model="claude-haiku-5-5")))
    assert [p["model"] for p in ray.get(h.pending_intents.remote())] == ["claude-haiku-5-5"]


def test_a_rerun_after_its_caller_died_books_the_lost_call_and_numbers_attempts_after_it(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path)
    ledgers.append(h)
    first = ray.get(h.begin.remote(begin("x", reserve=0.04, who=owner(life="old"))))
    ray.get(h.intent.remote("x", 2, "claude-haiku-5-5", owner(life="old"), 0.01))  # a fallback attempt
    # the caller process died mid-call; Ray re-runs the request on the restarted caller (a new life)
    again = ray.get(h.begin.remote(begin("x", reserve=0.04, who=owner(life="new", execution="e9"))))
    assert first.attempt == 1 and again.attempt == 3 and again.unreconciled == 2
    rows = {(r["attempt"], r["status"]): r for r in ray.get(h.records.remote())}
    assert set(rows) == {(1, "unreconciled"), (2, "unreconciled")}
    assert rows[(1, "unreconciled")]["cost_usd"] == pytest.approx(0.04)
    assert rows[(2, "unreconciled")]["cost_usd"] == pytest.approx(0.01)
    # the re-run's own answer is a third row, not a replacement of the lost call's
    ray.get(h.commit.remote(Record(request_id="x", attempt=3, message_id="m-x3", ts=time.time(), user_id="u1",
                                   tenant="t1", priority="normal", model="claude-sonnet-5-5",
                                   usage=Usage(10, 10), cost=CostBreakdown(0.002, 0, 0, 0, 0.002))))
    st = ray.get(h.stats.remote())
    assert st["rows"] == 3 and st["unreconciled"] == 2 and st["total_usd"] == pytest.approx(0.052)
    assert ray.get(h.pending_intents.remote()) == []


def test_a_concurrent_duplicate_request_id_is_refused_and_cannot_release_the_first(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    a = ray.get(h.begin.remote(begin("dup", reserve=0.5, who=owner("caller-0", "l1", "e1"))))
    b = ray.get(h.begin.remote(begin("dup", reserve=0.5, who=owner("caller-1", "l7", "e2"))))
    assert a.reservation.granted and b.reservation is None and b.duplicate_of == owner("caller-0", "l1", "e1")
    assert ray.get(h.release.remote("dup", owner("caller-1", "l7", "e2"))) is False
    assert ray.get(h.stats.remote())["outstanding_reservations"] == 1


def test_a_late_answer_replaces_its_unreconciled_row_and_a_void_mark_removes_one(tmp_path, ledgers):
    h, s = make_ledger(tmp_path, ledger={"unreconciled_after_s": 0.01, "sweep_interval_s": 3600})
    ledgers.append(h)
    ray.get(h.begin.remote(begin("slow", reserve=0.3)))
    ray.get(h.begin.remote(begin("never", reserve=0.2, who=owner(execution="e2"))))
    ray.get(h.ping.remote())
    assert ray.get(h.sweep.remote(time.time() + 1)) == 2  # both look lost
    st = ray.get(h.stats.remote())
    assert st["unreconciled"] == 2 and st["total_usd"] == pytest.approx(0.5)
    # the slow call's answer arrives after all; the other attempt turns out never to have been sent
    ray.get(h.commit.remote(Record(request_id="slow", attempt=1, message_id="m-slow", ts=time.time(),
                                   user_id="u1", tenant="t1", priority="normal", model="claude-sonnet-5-5",
                                   usage=Usage(10, 10), cost=CostBreakdown(0.01, 0, 0, 0, 0.01))))
    ray.get(h.commit.remote(Record(request_id="never", attempt=1, message_id=None, ts=time.time(), user_id="u1",
                                   tenant="t1", priority="normal", model="claude-sonnet-5-5", status="error",
                                   error_type="RateLimitedPastDeadline", void_attempts=(1,))))
    st = ray.get(h.stats.remote())
    assert st["unreconciled"] == 0 and st["total_usd"] == pytest.approx(0.01)
    statuses = sorted((r["request_id"], r["status"]) for r in ray.get(h.records.remote()))
    assert statuses == [("never", "error"), ("slow", "ok")]


class _Hook(BaseHTTPRequestHandler):
    received: "queue.Queue[dict]" = queue.Queue()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.put(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_alerts_reach_log_store_and_webhook_and_survive_restart(tmp_path, ledgers):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook?token=secret"
        h, s = make_ledger(tmp_path, alerts={"request_usd": 0.10, "day_usd": 0.5, "webhook_url": url},
                           environment="test")
        ledgers.append(h)
        assert ray.get(h.commit.remote(billed(1, cost=0.4))) is True  # request_cost
        got = _Hook.received.get(timeout=15)
        assert got["kind"] == "request_cost" and got["environment"] == "test" and got["value"] == pytest.approx(0.4)
        ray.get(h.commit.remote(billed(2, cost=0.05)))  # day at 0.45
        ray.get(h.commit.remote(billed(3, cost=0.06)))  # day at 0.51: daily_spend, once
        got = _Hook.received.get(timeout=15)
        assert got["kind"] == "daily_spend" and got["value"] == pytest.approx(0.51)
        deadline = time.time() + 10
        while len(ray.get(h.alerts.remote())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert [a["kind"] for a in ray.get(h.alerts.remote())] == ["request_cost", "daily_spend"]
        ray.kill(h, no_restart=False)
        wait_ready(h)
        # after the restart the day's episode is remembered: more spend raises nothing new
        ray.get(h.commit.remote(billed(4, cost=0.05)))
        # an alert is written with the batch after the record that raised it: one more commit is the barrier
        ray.get(h.commit.remote(billed(5, cost=0.0)))
        assert [a["kind"] for a in ray.get(h.alerts.remote())] == ["request_cost", "daily_spend"]
        assert _Hook.received.empty()
    finally:
        server.shutdown()


def test_singleton_and_report_from_the_file(tmp_path, ledgers):
    s = Settings(data_dir=tmp_path)
    a, b = get_or_create_ledger(s), get_or_create_ledger(s)
    ledgers.append(a)
    assert a._actor_id == b._actor_id
    now = time.time()
    recs = [billed(i, cost=0.0, model="claude-haiku-5-5", ts=now - 86_400 * (i % 3)) for i in range(9)]
    recs = [Record(**{**r.__dict__, "cost": price(Usage(1000 * (i + 1), 100), r.model, s)})
            for i, r in enumerate(recs)]
    hit = Record(request_id="hit-1", attempt=1, message_id=None, ts=now, user_id="u1", tenant=None,
                 priority="normal", model="claude-haiku-5-5", cost=CostBreakdown.zero(), cache="exact",
                 saved_usd=0.5)
    ray.get(a.commit_many.remote(recs + [hit, failed(99)]))
    summary = report.main(s.ledger_path, 7 * 86_400, tmp_path / "report.png")
    assert summary["requests"] == 11 and summary["cache_hits"] == 1 and summary["errors"] == 1
    assert summary["total_usd"] == pytest.approx(sum(r.cost_usd for r in recs))
    assert summary["saved_usd"] == pytest.approx(0.5)
    assert len(summary["days"]) == 3
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert report.main(s.ledger_path, 3600, tmp_path / "r2.png")["requests"] == 5  # 3 today + hit + error


async def test_commit_batcher_shares_calls_and_keeps_identity(tmp_path, ledgers):
    import asyncio

    from actors.ledger import LedgerClient

    h, _ = make_ledger(tmp_path)
    ledgers.append(h)
    await h.ping.remote()
    batcher = LedgerClient(h, max_batch=50)
    recs = [billed(i, cost=0.001) for i in range(200)]
    results = await asyncio.gather(*(batcher.commit(r) for r in recs + recs[:20]))
    assert sorted(results[:200]) == [True] * 200 and results[200:] == [False] * 20
    st = await h.stats.remote()
    assert st["rows"] == 200 and st["total_usd"] == pytest.approx(0.2)
    assert st["flushes"] < 100  # calls were shared, not one transaction per record


# -- the budget queue: begins that wait for room --------------------------------------------------------------
def test_a_begin_with_a_deadline_waits_for_room_and_gets_it_when_a_commit_settles(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    assert ray.get(h.begin.remote(begin("a", reserve=0.7))).reservation.granted
    # without a deadline (the batch path) nothing waits: refused at once, with the figures
    now = ray.get(h.begin.remote(begin("c", reserve=0.5, who=owner(execution="e3"))))
    assert not now.reservation.granted and now.reservation.reason == "no_room"
    assert now.reservation.reserved_usd == pytest.approx(0.7)
    ref = h.begin.remote(begin("b", reserve=0.5, who=owner(execution="e2"), wait_s=60))
    wait_until(lambda: queued(h) == 1)
    assert ray.wait([ref], timeout=0)[0] == []  # parked, and the actor still answers everything else
    snap = ray.get(h.budgets.remote())["budgets"]["daily"]
    assert snap["queued"] == 1 and snap["queued_usd"] == pytest.approx(0.5) and snap["reserved_usd"] == 0.7
    ray.get(h.commit.remote(billed(1, cost=0.3, request_id="a")))  # a's answer: 0.3 settled, 0.4 freed
    got = ray.get(ref, timeout=30)
    assert got.reservation.granted and got.attempt == 1
    assert [(p["request_id"], p["attempt"]) for p in ray.get(h.pending_intents.remote())] == [("b", 1)]
    snap = ray.get(h.budgets.remote())
    assert snap["budgets"]["daily"]["settled_usd"] == pytest.approx(0.3)
    assert snap["budgets"]["daily"]["reserved_usd"] == pytest.approx(0.5) and snap["budgets"]["daily"]["queued"] == 0
    assert ray.get(h.stats.remote())["budget_queue"]["granted_after_wait"] == 1


def test_a_waiting_begin_is_refused_at_its_deadline_or_when_it_can_no_longer_fit(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    assert ray.get(h.begin.remote(begin("a", reserve=0.9))).reservation.granted
    t0 = time.time()
    late = ray.get(h.begin.remote(begin("late", reserve=0.3, who=owner(execution="e2"), wait_s=0.5)), timeout=30)
    assert time.time() - t0 >= 0.5
    r = late.reservation
    assert not r.granted and r.reason == "expired" and late.attempt == 0
    assert (r.budget, r.reserved_usd, r.amount_usd, r.limit_usd) == ("daily", 0.9, 0.3, 1.0)
    ref = h.begin.remote(begin("never", reserve=0.3, who=owner(execution="e3"), wait_s=60))
    wait_until(lambda: queued(h) == 1)
    ray.get(h.commit.remote(billed(1, cost=0.8, request_id="a")))  # settled 0.8 + 0.3 can never fit
    never = ray.get(ref, timeout=30).reservation
    assert never.reason == "cannot_fit" and never.settled_usd == pytest.approx(0.8)
    assert [p["request_id"] for p in ray.get(h.pending_intents.remote())] == []  # no intent for either
    assert queued(h) == 0


def test_a_duplicate_id_cannot_take_a_waiting_requests_place_nor_settle_its_room(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    first = owner("caller-0", "l1", "e1")
    assert ray.get(h.begin.remote(begin("fill", reserve=0.8, who=owner(execution="f")))).reservation.granted
    ref = h.begin.remote(begin("dup", reserve=0.5, who=first, wait_s=60))
    wait_until(lambda: queued(h) == 1)
    dup = ray.get(h.begin.remote(begin("dup", reserve=0.5, who=owner("caller-1", "l7", "e2"), wait_s=60)))
    assert dup.reservation is None and dup.duplicate_of == first and queued(h) == 1
    ray.get(h.release.remote("fill", owner(execution="f")))
    assert ray.get(ref, timeout=30).reservation.granted
    # the refused duplicate's failure row (no intent behind it: attempt 0) leaves the first's room alone
    ray.get(h.commit.remote(Record(request_id="dup", attempt=0, message_id=None, ts=time.time(), user_id="u1",
                                   tenant="t1", priority="normal", model="claude-sonnet-5-5", status="error",
                                   error_type="InvalidRequest")))
    assert ray.get(h.stats.remote())["outstanding_reservations"] == 1
    assert ray.get(h.budgets.remote())["budgets"]["daily"]["reserved_usd"] == pytest.approx(0.5)
    # and a later attempt's begin by the duplicate is refused too
    later = ray.get(h.begin.remote(begin("dup", attempt=2, reserve=0.1, who=owner("caller-1", "l7", "e2"))))
    assert later.duplicate_of == first


def test_a_rerun_replaces_its_dead_runs_waiting_begin(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    assert ray.get(h.begin.remote(begin("fill", reserve=0.8, who=owner("caller-9", "x", "f")))).reservation.granted
    old = h.begin.remote(begin("r", reserve=0.5, who=owner("caller-0", "old", "e1"), wait_s=60))
    wait_until(lambda: queued(h) == 1)
    # caller-0 died and Ray re-runs the request on its restarted process (a new life): not a duplicate
    new = h.begin.remote(begin("r", reserve=0.5, who=owner("caller-0", "new", "e9"), wait_s=60))
    gone = ray.get(old, timeout=30).reservation
    assert not gone.granted and gone.reason == "replaced"
    assert queued(h) == 1
    ray.get(h.release.remote("fill"))
    got = ray.get(new, timeout=30)
    assert got.reservation.granted and got.attempt == 1 and got.unreconciled == 0


def test_the_same_owner_begins_again_after_a_ledger_restart_and_gets_its_intent_back(tmp_path, ledgers):
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    me = owner("caller-0", "l1", "e1")
    first = ray.get(h.begin.remote(begin("x", reserve=0.4, who=me, wait_s=60)))
    assert first.reservation.granted and first.attempt == 1
    ray.kill(h, no_restart=False)
    wait_ready(h)
    again = ray.get(h.begin.remote(begin("x", reserve=0.4, who=me, wait_s=60)))
    assert again.reservation.granted and again.attempt == 1 and again.unreconciled == 0
    st = ray.get(h.stats.remote())
    assert st["outstanding_reservations"] == 1 and st["open_intents"] == 1 and st["unreconciled"] == 0
    assert ray.get(h.budgets.remote())["budgets"]["daily"]["reserved_usd"] == pytest.approx(0.4)


def test_hundreds_of_waiting_begins_do_not_starve_the_commits_that_free_their_room(tmp_path, ledgers):
    # more parked begins than the actor's old 256 concurrent calls: the commit that makes room still gets in
    h, _ = make_ledger(tmp_path, budgets={"daily_usd": 1.0})
    ledgers.append(h)
    assert ray.get(h.begin.remote(begin("fill", reserve=1.0))).reservation.granted
    refs = [h.begin.remote(begin(f"w{i}", reserve=0.002, who=owner(execution=f"w{i}"), wait_s=120))
            for i in range(300)]
    wait_until(lambda: queued(h) == 300, timeout=120)
    ray.get(h.commit.remote(billed(1, cost=0.2, request_id="fill")), timeout=30)
    got = ray.get(refs, timeout=120)
    assert all(g.reservation.granted for g in got)
    snap = ray.get(h.budgets.remote())["budgets"]["daily"]
    assert snap["reserved_usd"] == pytest.approx(0.6) and snap["settled_usd"] == pytest.approx(0.2)
