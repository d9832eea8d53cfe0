"""Three Ray nodes (ray.cluster_utils.Cluster): the singletons on the head and the callers on the workers, one
shared limiter, a caller pool that grows under load and drains before it shrinks, a ledger refused on a
temporary path, and a worker lost mid-run that loses no request."""

import time
from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import runtime
from runtime.errors import ConfigurationError
from runtime.result import Result
from runtime.settings import Settings
from tests.runtime_fixtures import (fake_post, fake_stats, fast_settings, read_billing, uniform_limits, user_msg,
                                    wait_for)

RPM = 600
SINGLETONS = {"limiter", "ledger", "fake_api", "cache", "caller_pool"}


@pytest.fixture(scope="module")
def cluster_rt(tmp_path_factory):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, namespace="claude_runtime_tests")
    settings = fast_settings(tmp_path_factory.mktemp("cluster"), limits=uniform_limits(RPM, 10**8, 10**7),
                             cache={"enabled": False}, callers={"num_callers": 3})
    rt = runtime.start(settings)
    yield cluster, workers, rt
    rt.shutdown()
    ray.shutdown()
    cluster.shutdown()


def live_actors(namespace: str) -> dict[str, str]:
    """name -> node id of a runtime's live actors (the GCS's table: these tests run no dashboard)."""
    table = ray._private.state.actors()
    out = {}
    for name in [*SINGLETONS, *(f"caller-{i}" for i in range(8))]:
        try:
            aid = ray.get_actor(name, namespace=namespace)._actor_id.hex()
        except ValueError:
            continue
        info = table.get(aid)
        if info is not None and info["State"] == "ALIVE":
            out[name] = info["Address"]["NodeID"]
    return out


@ray.remote(num_cpus=0)
def _fire(n: int, tag: str) -> list[str]:
    rt = runtime.connect()
    refs = [rt.submit(user_msg(f"{tag} short question {i}", 16), user_id=f"{tag}-{i % 5}", cache=False)
            for i in range(n)]
    return [type(r).__name__ for r in ray.get(refs)]


def test_singletons_sit_on_the_head_and_callers_on_the_workers(cluster_rt):
    cluster, workers, rt = cluster_rt
    placed = live_actors(rt.namespace)
    head = cluster.head_node.node_id
    assert {placed[name] for name in SINGLETONS - {"cache"}} == {head}  # the cache is off in this module
    callers = {n: node for n, node in placed.items() if n.startswith("caller-")}
    assert sorted(callers) == ["caller-0", "caller-1", "caller-2"]
    assert head not in callers.values()
    assert set(callers.values()) == {w.node_id for w in workers}


def test_callers_on_the_workers_share_one_limiter(cluster_rt):
    cluster, _, rt = cluster_rt
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    n_total = 700  # more than one minute's burst, so the shared bucket must pace the rest
    t0 = time.monotonic()
    per_node = n_total // len(nodes)
    outs = ray.get([
        _fire.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            per_node + (n_total - per_node * len(nodes) if i == 0 else 0), f"n{i}")
        for i, node in enumerate(nodes)])
    elapsed = time.monotonic() - t0
    names = [x for out in outs for x in out]
    assert names.count("Result") == n_total
    stats = fake_stats(rt)
    assert stats["by_status"].get("429", 0) == 0
    # the bucket holds ~RPM; the rest came at RPM/60 per second
    assert elapsed >= 0.8 * (n_total - RPM) / (RPM / 60)


def test_a_ledger_on_a_temporary_path_is_refused_before_anything_starts(cluster_rt, tmp_path):
    with pytest.raises(ConfigurationError) as exc:
        runtime.start(Settings(data_dir=tmp_path, fake_api=True, cache={"enabled": False}), name="tmpcheck")
    assert exc.value.field == "ledger.path" and "allow_temporary_path" in str(exc.value)
    assert live_actors("claude_runtime-tmpcheck") == {}
    groups = [g for g in ray.util.placement_group_table().values()
              if g.get("name", "").startswith("claude_runtime-tmpcheck") and g["state"] != "REMOVED"]
    assert groups == []


def test_the_pool_grows_under_load_and_drains_before_it_shrinks(cluster_rt, tmp_path_factory):
    cluster, workers, _ = cluster_rt
    settings = fast_settings(tmp_path_factory.mktemp("pool"), cache={"enabled": False},
                             callers={"num_callers": 1, "max_callers": 3, "target_in_flight": 4,
                                      "scale_interval_s": 0.2, "scale_down_after_s": 1.0, "drain_grace_s": 1.0})
    rt = runtime.start(settings, name="pool")
    ns = rt.namespace
    try:
        def members() -> list[str]:
            return [n for n, _h in ray.get(rt.pool.members.remote())]

        assert members() == ["caller-0"]
        # 1. grows: 12 slow requests in flight want 3 callers
        fake_post(rt, "/_fake/config", {"latency_ms": 6000})
        first = [rt.submit(user_msg(f"pool question {i}", 16), cache=False) for i in range(12)]
        wait_for(lambda: members() == ["caller-0", "caller-1", "caller-2"], "the pool to grow to 3")
        placed = live_actors(ns)
        assert cluster.head_node.node_id not in {placed[n] for n in ("caller-1", "caller-2")}
        # handles follow the pool: new requests reach the new callers
        wait_for(lambda: len(rt.callers) == 3, "the handle to see 3 callers")
        # longer than the first batch's 6 s: caller-2 must still hold some of these when the first batch ends and
        # the pool drains it, however quickly the pool grew (at 4 s a fast start let them finish first)
        fake_post(rt, "/_fake/config", {"latency_ms": 8000})
        second = [rt.submit(user_msg(f"pool follow-up {i}", 16), cache=False) for i in range(6)]
        # 2. shrinks: demand falls below 3 x 4 as the first batch ends; the highest caller is drained while
        # it still holds requests of the second batch, and stays until they are done
        snap = wait_for(lambda: next((m for m in ray.get(rt.pool.snapshot.remote())["callers"]["members"]
                                      if m["name"] == "caller-2" and m["draining"] and m["in_flight"] > 0), None),
                        "caller-2 to drain with requests in flight", timeout_s=30, every_s=0.02)
        assert snap["in_flight"] > 0
        handle_2 = ray.get_actor("caller-2", namespace=ns)
        wait_for(lambda: handle_2._actor_id not in {h._actor_id for h in rt.callers},
                 "the handle to stop routing to caller-2")
        fake_post(rt, "/_fake/config", {"latency_ms": 0})
        out = ray.get(first + second, timeout=120)
        assert len(out) == 18 and all(isinstance(r, Result) for r in out)
        assert len({r.request_id for r in out}) == 18
        # 3. back to the floor: drained callers are stopped once empty
        wait_for(lambda: members() == ["caller-0"] and "caller-2" not in live_actors(ns)
                 and "caller-1" not in live_actors(ns), "the pool to shrink to its floor", timeout_s=60)
        served = Counter(r["request_id"] for r in rt.ledger_records() if r["status"] == "ok")
        assert all(served[r.request_id] == 1 for r in out)
        events = [e[1] for e in ray.get(rt.pool.history.remote())["events"]]
        assert "spawn" in events and "drain" in events
    finally:
        rt.shutdown()
    assert live_actors(ns) == {}


def test_losing_a_worker_mid_run_loses_nothing(cluster_rt):
    cluster, workers, rt = cluster_rt
    placed = live_actors(rt.namespace)
    caller_nodes = {node for name, node in placed.items() if name.startswith("caller-")}
    victim = next(w for w in workers if w.node_id in caller_nodes)
    fake_post(rt, "/_fake/config", {"latency_ms": 400})
    refs = [rt.submit(user_msg(f"node loss question {i}", 16), cache=False) for i in range(60)]
    wait_for(lambda: fake_stats(rt)["in_flight"]["total"] >= 5, "calls on the wire when the node goes")
    cluster.remove_node(victim)
    fake_post(rt, "/_fake/config", {"latency_ms": 0})
    out = ray.get(refs, timeout=180)
    assert len(out) == 60 and all(isinstance(r, Result) for r in out)
    assert len({r.request_id for r in out}) == 60
    # every billed response is in the ledger, by message id or as an unreconciled row of the dead caller
    wait_for(lambda: fake_stats(rt)["in_flight"]["total"] == 0, "the API to go quiet")
    ours = {r.request_id for r in out}
    bill = [b for b in read_billing(rt.settings) if b.get("runtime_request_id") in ours]
    rows = [r for r in rt.ledger_records() if r["request_id"] in ours]
    by_message = Counter(r["message_id"] for r in rows if r["message_id"])
    assert all(n == 1 for n in by_message.values())
    placeholders = {(r["request_id"], r["attempt"]) for r in rows if r["status"] == "unreconciled"}
    missing = [b for b in bill if b["id"] not in by_message
               and (b["runtime_request_id"], b["runtime_attempt"]) not in placeholders]
    assert missing == []
    rt.reconcile()
    rows = [r for r in rt.ledger_records() if r["request_id"] in ours]
    assert sum(r["cost_usd"] or 0.0 for r in rows) == pytest.approx(sum(b["cost_usd"] for b in bill), rel=1e-9)
    # the pool still has its three callers, none on the lost node, and handles route only to live ones
    live = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    members = wait_for(lambda: (lambda m: m if len(m) == 3 else None)(ray.get(rt.pool.members.remote())),
                       "the pool to have its three callers")
    assert {ray.get(h.ready.remote(), timeout=60) for _n, h in members} <= live
    again = ray.get([rt.submit(user_msg(f"after the loss {i}", 16), cache=False) for i in range(9)], timeout=60)
    assert all(isinstance(r, Result) for r in again)
