"""Shared test setup: offline model loading, tier markers by folder, and no stray Ray clusters.

Tiers: tests/unit (pure logic, no Ray, no servers), tests/api (starts local servers: the fake API, the CLI),
tests/ray (single-node local Ray), tests/cluster (ray.cluster_utils.Cluster).
Run one tier with `pytest -m pure|api|ray|cluster`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# never attach to a cluster someone left running: tests start their own
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402

_TIERS = {"unit": "pure", "api": "api", "ray": "ray", "cluster": "cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        for folder, marker in _TIERS.items():
            if folder in parts:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(autouse=True, scope="module")
def _no_stray_ray():
    """Each module starts from no Ray and leaves none behind."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave at once with pytest's own status once everything is reported and cleaned up. A full run loads
    torch, LanceDB and Ray's core worker into this one process; their native threads have crashed the
    interpreter's final teardown (a segfault after the summary line, seen once in 836 tests), which would turn a
    green run red. Nothing of the tests' is left to do at that point."""
    import sys

    if _EXIT_STATUS and os.environ.get("CLAUDE_RUNTIME_TESTS_NORMAL_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
