"""Three Ray nodes (ray.cluster_utils.Cluster): callers on every node share one limiter; losing a node loses no
request."""

import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import runtime
from runtime.result import Result
from tests.runtime_fixtures import fake_post, fake_stats, fast_settings, uniform_limits, user_msg

RPM = 600


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


@ray.remote(num_cpus=0)
def _fire(n: int, tag: str) -> list[str]:
    rt = runtime.connect()
    refs = [rt.submit(user_msg(f"{tag} short question {i}", 16), user_id=f"{tag}-{i % 5}", cache=False)
            for i in range(n)]
    return [type(r).__name__ for r in ray.get(refs)]


def test_callers_on_three_nodes_share_one_limiter(cluster_rt):
    cluster, _, rt = cluster_rt
    caller_nodes = ray.get([c.ready.remote() for c in rt.callers])
    assert len(set(caller_nodes)) == 3
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


def test_losing_a_node_loses_no_request(cluster_rt):
    cluster, workers, rt = cluster_rt
    # the GCS's actor table (the state API would need the dashboard, which these tests do not start)
    actors = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
    singletons = {"limiter", "ledger", "fake_api", "cache"}
    pinned = {a["Address"]["NodeID"] for a in actors if a["Name"] in singletons}
    caller_nodes = set(ray.get([c.ready.remote() for c in rt.callers]))
    victim = next(w for w in workers if w.node_id in caller_nodes and w.node_id not in pinned)
    fake_post(rt, "/_fake/config", {"latency_ms": 400})
    refs = [rt.submit(user_msg(f"node loss question {i}", 16), cache=False) for i in range(60)]
    deadline = time.monotonic() + 60
    while fake_stats(rt)["in_flight"]["total"] < 5:  # calls are on the wire when the node goes
        assert time.monotonic() < deadline, "no calls reached the API"
        time.sleep(0.01)
    cluster.remove_node(victim)
    fake_post(rt, "/_fake/config", {"latency_ms": 0})
    out = ray.get(refs, timeout=180)
    assert len(out) == 60 and all(isinstance(r, Result) for r in out)
    assert len({r.request_id for r in out}) == 60
