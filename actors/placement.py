"""Placement on a Ray cluster: where the singletons go, and the check that their state outlives a reboot.

``singletons="head"`` reserves a sliver of ``placement.singleton_resource`` (by default Ray's head-node marker,
``node:__internal_head__``) in a detached placement group, one per runtime, and schedules the limiter, ledger,
cache, local API and pool manager into it. Through the group rather than a pin to a node id: if the node that
holds the resource is lost and another node offering the resource joins (a Kubernetes pod rescheduled with its
persistent volume), Ray re-creates the group there and the singletons restart on it, replaying their files.
``singletons="driver"`` pins them hard to the node that called ``runtime.start()`` (the earlier behaviour).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from runtime.errors import ConfigurationError
from runtime.placement import local_temporary_path_reason, singleton_nodes

# the slice of the singleton resource the group reserves: small enough for many runtimes on one node
_SLICE = 0.001


def group_name(namespace: str) -> str:
    return f"{namespace}:singletons"


def find_singleton_group(namespace: str) -> Any:
    """The runtime's placement group, from any driver (the table is cluster-wide)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("name") == group_name(namespace) and info.get("state") != "REMOVED":
            return PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
    return None


def singleton_placement(settings: Any, namespace: str, timeout_s: float = 60.0) -> tuple[Any, str | None, Any]:
    """(scheduling strategy for the singletons, the node they will run on, the placement group or None)."""
    p = settings.placement
    if p.singletons == "driver":
        here = ray.get_runtime_context().get_node_id()
        return NodeAffinitySchedulingStrategy(here, soft=False), here, None
    if not singleton_nodes(ray.nodes(), p.singleton_resource):
        raise ConfigurationError(
            f"no live node offers the resource {p.singleton_resource!r} that placement.singleton_resource names: "
            "start the node that should hold the runtime's state with it (ray start --resources=...), or use "
            "placement.singletons='driver'", field="placement.singleton_resource")
    from ray.util.placement_group import placement_group

    quiet_group_warning()
    pg = find_singleton_group(namespace)
    if pg is None:
        pg = placement_group([{p.singleton_resource: _SLICE}], name=group_name(namespace), lifetime="detached")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ConfigurationError(f"the singletons' placement group did not come up within {timeout_s:.0f}s (no "
                                 f"room on a node with {p.singleton_resource!r})",
                                 field="placement.singleton_resource") from None
    node = group_node(pg)
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0), node, pg


class _GroupWarning(logging.Filter):
    """Ray warns, for each restartable detached actor put in a placement group, that removing the group kills
    it for good. That is the point here (only ``shutdown`` removes the group), so the warning is dropped."""

    _TEXT = "Scheduling a restartable detached actor with a placement group"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self._TEXT)


_QUIET = _GroupWarning()


def quiet_group_warning() -> None:
    logging.getLogger("ray.actor").addFilter(_QUIET)  # a set: adding twice keeps one


def group_node(pg: Any) -> str | None:
    info = ray.util.placement_group_table(pg)
    nodes = list((info.get("bundles_to_node_id") or {}).values())
    return nodes[0] if nodes else None


def remove_singleton_group(pg: Any) -> None:
    if pg is not None:
        try:
            ray.util.remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - already gone
            pass


@ray.remote(num_cpus=0)
def _temporary_reason(path: str) -> str | None:
    return local_temporary_path_reason(path)


def check_state_paths(settings: Any) -> None:
    """Refuse a ledger on a path that will not survive a reboot of the node it lives on (checked on that node,
    before anything is created), unless ``ledger.allow_temporary_path``."""
    if settings.ledger.allow_temporary_path:
        return
    path = str(settings.ledger_path)
    p = settings.placement
    here = ray.get_runtime_context().get_node_id()
    homes = singleton_nodes(ray.nodes(), p.singleton_resource)
    if p.singletons == "head" and not homes:
        return  # singleton_placement refuses this, naming the resource
    if p.singletons == "driver" or homes == [here]:
        reason = local_temporary_path_reason(path)
    else:
        reason = ray.get(_temporary_reason.options(resources={p.singleton_resource: _SLICE}).remote(path),
                         timeout=120)
    if reason:
        raise ConfigurationError(
            f"the ledger (the durable record of money spent) would be lost: {reason}. Put ledger.path or data_dir "
            "on persistent storage (a persistent volume on a cluster), or set ledger.allow_temporary_path=True "
            "for throwaway runs", field="ledger.path", reason=reason)
