"""Where the runtime's actors go on a cluster, and whether a state path outlives a reboot: pure decisions over
plain data (the node dicts ``ray.nodes()`` returns, the text of ``/proc/mounts``), so they are tested without Ray.

    nodes = ray.nodes()
    home = singleton_nodes(nodes, settings.placement.singleton_resource)      # where the singletons may go
    targets = caller_nodes(nodes, avoid=set(home), mode="workers")            # callers round-robin over these
    problem = temporary_path_reason(Path("/tmp/x/ledger.sqlite3"), open("/proc/mounts").read())
"""

from __future__ import annotations

import os
import tempfile
from pathlib import PurePosixPath
from typing import Any, Iterable

# directories that are emptied on reboot (or live in memory) on the Linux distributions Ray runs on
TEMP_ROOTS: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm", "/run/user")
# filesystems whose contents live in memory
VOLATILE_FS = frozenset({"tmpfs", "ramfs"})


def _under(path: PurePosixPath, root: str) -> bool:
    r = PurePosixPath(root)
    return path == r or r in path.parents


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in mount points as octal escapes
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mount_of(path: str | os.PathLike, mounts_text: str) -> tuple[str, str] | None:
    """The (mount point, filesystem type) that holds ``path``: the longest mount point above it."""
    p = PurePosixPath(os.fspath(path))
    best: tuple[str, str] | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        if _under(p, point) and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def temporary_path_reason(path: str | os.PathLike, mounts_text: str = "",
                          temp_dirs: Iterable[str] = ()) -> str | None:
    """Why ``path`` (absolute, resolved) is temporary, or None when nothing says so. Temporary: under a
    directory that is emptied on reboot, or on a filesystem that lives in memory."""
    p = PurePosixPath(os.fspath(path))
    for root in (*TEMP_ROOTS, *temp_dirs):
        if root and _under(p, root):
            return f"{p} is under {root}, a temporary directory (emptied on reboot)"
    mount = mount_of(p, mounts_text)
    if mount is not None and mount[1] in VOLATILE_FS:
        return f"{p} is on a {mount[1]} mount ({mount[0]}): it lives in memory and is lost on reboot"
    return None


def local_temporary_path_reason(path: str | os.PathLike) -> str | None:
    """``temporary_path_reason`` on this machine: its /proc/mounts and its temp directory."""
    try:
        with open("/proc/mounts") as f:
            mounts = f.read()
    except OSError:
        mounts = ""
    resolved = os.path.realpath(os.fspath(path))
    return temporary_path_reason(resolved, mounts, (os.path.realpath(tempfile.gettempdir()),))


def _alive(nodes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def singleton_nodes(nodes: Iterable[dict[str, Any]], resource: str) -> list[str]:
    """Ids of the live nodes that offer ``resource`` (where the singletons may be placed), sorted."""
    return sorted(n["NodeID"] for n in _alive(nodes) if (n.get("Resources") or {}).get(resource, 0) > 0)


def caller_nodes(nodes: Iterable[dict[str, Any]], avoid: set[str], mode: str = "workers") -> list[str]:
    """The live nodes callers are spread over, sorted: the ones not in ``avoid`` (the singletons' node) when
    ``mode`` is "workers" and there are any, else every live node."""
    live = sorted(n["NodeID"] for n in _alive(nodes))
    if mode == "workers":
        others = [n for n in live if n not in avoid]
        if others:
            return others
    return live
