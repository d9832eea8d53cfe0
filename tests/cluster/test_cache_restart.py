"""A cache built in one cluster is served after a full restart (every Ray process gone) from the same URI."""

import ray
from ray.cluster_utils import Cluster

import runtime
from tests.runtime_fixtures import fake_stats, fast_settings, user_msg

Q = "Explain in a few sentences why the sky looks blue at noon and red at sunset."


def _cluster() -> Cluster:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, namespace="claude_runtime_tests")
    return cluster


def test_the_cache_survives_a_full_restart_from_its_uri(tmp_path):
    uri = f"file://{tmp_path}/shared-cache"   # given as a URI, the way an s3:// or gs:// location is
    cluster = _cluster()
    try:
        rt = runtime.start(fast_settings(tmp_path / "first", cache={"path": uri}, callers={"num_callers": 1}))
        first = ray.get(rt.submit(user_msg(Q, 400), tenant="acme"))
        assert first.cache == "miss" and first.message.stop_reason == "end_turn"
        assert ray.get(rt.cache.stats.remote())["location"] == uri
        rt.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()

    # another cluster, another data_dir (its own ledger), the same cache URI
    cluster = _cluster()
    try:
        rt = runtime.start(fast_settings(tmp_path / "second", cache={"path": uri}, callers={"num_callers": 1}))
        assert ray.get(rt.cache.stats.remote())["entries"] == 1
        again = ray.get(rt.submit(user_msg(Q, 400), tenant="acme"))
        assert again.cache == "exact" and again.cost_usd == 0
        assert again.message.content[0].text == first.message.content[0].text
        assert again.saved_usd == first.cost_usd
        assert fake_stats(rt)["requests"] == 0   # served without a call
        other = ray.get(rt.submit(user_msg(Q, 400), tenant="other-tenant"))
        assert other.cache == "miss"   # scopes survive too: another tenant never sees it
        rt.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
