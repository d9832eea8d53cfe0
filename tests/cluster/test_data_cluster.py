"""A Ray Data pipeline across nodes (ray.cluster_utils.Cluster): workers on two nodes share the runtime."""

import sys

import pytest
import ray
from ray import cloudpickle
from ray.cluster_utils import Cluster

import runtime
from runtime.data import build_processor
from tests.runtime_fixtures import fake_stats, fast_settings, uniform_limits

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster_rt(tmp_path_factory):
    # two CPUs a node: a read task takes a whole one, and the callers' slivers must not leave none free
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    # the dataset's workers may only run where a "rows" slot is: one on each worker node
    for _ in range(2):
        cluster.add_node(num_cpus=2, resources={"rows": 1})
    ray.init(address=cluster.address, namespace="claude_runtime_tests")
    settings = fast_settings(tmp_path_factory.mktemp("datacluster"), limits=uniform_limits(600, 10**8, 10**7),
                             cache={"enabled": False}, callers={"num_callers": 3})
    rt = runtime.start(settings)
    yield cluster, rt
    rt.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_a_dataset_runs_on_workers_across_nodes(cluster_rt):
    cluster, rt = cluster_rt
    proc = build_processor(lambda row: {"model": "claude-haiku-5-5", "max_tokens": 24,
                                        "messages": [{"role": "user", "content": f"One word for {row['id']}."}]},
                           user_id="cluster-data", concurrency=2, batch_size=10, max_in_flight=8,
                           resources={"rows": 1})
    rows = proc(ray.data.range(60, override_num_blocks=6)).take_all()
    assert sorted(r["id"] for r in rows) == list(range(60))
    assert all(r["error_type"] is None and r["response_text"] for r in rows)
    assert fake_stats(rt)["by_status"].get("429", 0) == 0
    workers = [a for a in ray._private.state.actors().values() if "_RuntimeWorker" in a.get("ActorClassName", "")]
    nodes = {a["Address"]["NodeID"] for a in workers}
    worker_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("rows")}
    assert len(workers) == 2 and nodes == worker_nodes and len(nodes) == 2
