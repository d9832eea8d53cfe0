"""Placement decisions (runtime/placement.py) and the state-path settings."""

import pytest

from runtime.errors import ConfigurationError
from runtime.placement import caller_nodes, mount_of, singleton_nodes, temporary_path_reason
from runtime.settings import Settings

MOUNTS = """overlay / overlay rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
/dev/sdb1 /data ext4 rw,relatime 0 0
tmpfs /data/scratch tmpfs rw 0 0
/dev/sdc1 /mnt/my\\040volume xfs rw 0 0
"""


@pytest.mark.parametrize("path, temporary", [
    ("/tmp/x/ledger.sqlite3", True), ("/tmp", True), ("/var/tmp/l.db", True), ("/dev/shm/l.db", True),
    ("/data/scratch/l.db", True),          # a tmpfs mounted inside a persistent disk
    ("/data/runtime/l.db", False), ("/home/u/.claude_runtime/ledger.sqlite3", False),
    ("/tmpfoo/l.db", False),               # a sibling that merely starts with "tmp"
    ("/mnt/my volume/l.db", False),
])
def test_temporary_paths(path, temporary):
    assert (temporary_path_reason(path, MOUNTS) is not None) is temporary


def test_the_reason_names_the_cause():
    assert "tmpfs" in temporary_path_reason("/data/scratch/l.db", MOUNTS)
    assert "/tmp" in temporary_path_reason("/tmp/l.db", MOUNTS)
    assert temporary_path_reason("/work/x", MOUNTS, temp_dirs=("/work",)) is not None


def test_mount_lookup_takes_the_longest_prefix_and_unescapes():
    assert mount_of("/data/scratch/a", MOUNTS) == ("/data/scratch", "tmpfs")
    assert mount_of("/data/other", MOUNTS) == ("/data", "ext4")
    assert mount_of("/mnt/my volume/a", MOUNTS) == ("/mnt/my volume", "xfs")


NODES = [
    {"NodeID": "head", "Alive": True, "Resources": {"CPU": 1, "node:__internal_head__": 1.0}},
    {"NodeID": "w2", "Alive": True, "Resources": {"CPU": 4, "claude_runtime": 1}},
    {"NodeID": "w1", "Alive": True, "Resources": {"CPU": 4}},
    {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 4, "node:__internal_head__": 1.0}},
]


def test_singletons_go_where_the_resource_is():
    assert singleton_nodes(NODES, "node:__internal_head__") == ["head"]
    assert singleton_nodes(NODES, "claude_runtime") == ["w2"]
    assert singleton_nodes(NODES, "nowhere") == []


def test_callers_avoid_the_singletons_node_unless_it_is_the_only_one():
    assert caller_nodes(NODES, {"head"}) == ["w1", "w2"]
    assert caller_nodes(NODES, {"head"}, mode="spread") == ["head", "w1", "w2"]
    assert caller_nodes(NODES[:1], {"head"}) == ["head"]


def test_cache_path_may_be_an_object_store_uri():
    for uri in ("s3://bucket/cache", "gs://b/c", "az://container/c", "file:///srv/cache"):
        s = Settings(cache={"path": uri})
        assert s.cache_path == uri and isinstance(s.cache_path, str)
    assert str(Settings(cache={"path": "/srv/cache"}).cache_path) == "/srv/cache"


def test_ledger_path_must_be_a_filesystem_path():
    with pytest.raises(ConfigurationError) as exc:
        Settings(ledger={"path": "s3://bucket/ledger.sqlite3"})
    assert exc.value.field == "ledger.path"
    assert Settings().ledger.allow_temporary_path is False


def test_pool_bounds_are_checked():
    with pytest.raises(ConfigurationError):
        Settings(callers={"num_callers": 4, "max_callers": 2})
    s = Settings(callers={"num_callers": 2})
    assert s.callers.ceiling == 2
    assert Settings(callers={"num_callers": 2, "max_callers": 8}).callers.ceiling == 8
