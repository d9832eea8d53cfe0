"""Upstreams: the ways a request can reach Claude (Anthropic keys and workspaces, Bedrock, Vertex), as data.

    ups = resolve(settings, fake_url=None)          # [UpstreamSettings, ...] with their limit groups
    groups, weights = limit_groups(settings, ups)   # the limiter's buckets: one set per (group, model class)
    pick(candidates, group, rng)                    # the upstream within a granted group, by weight

Failover is the fallback state machine's (runtime/fallback.py): on 429 / 529 / 5xx / timeouts the same model is
tried on the next upstream before the chain steps down to a cheaper model.

The api_key / base_url shorthand and the embedded local API are single upstreams in the default limit group
(``runtime.admission.DEFAULT_GROUP``), so a one-key setup keeps its buckets named by class alone. Limits can
come from the source: ``limits_from_rate_limits_api`` reads the Admin API's rate-limits listing.
"""

from __future__ import annotations

import json
import random
import urllib.request
from typing import Any, Sequence

from runtime.admission import DEFAULT_GROUP
from runtime.errors import ConfigurationError
from runtime.settings import ClassLimits, ModelInfo, Settings, UpstreamSettings

FAKE_UPSTREAM = "fake-api"
FAKE_API_KEY = "fake-local-key"  # the embedded API accepts any non-empty key; a real key never has this shape


def resolve(settings: Settings, *, fake_url: str | None = None) -> list[UpstreamSettings]:
    """The upstreams requests go to. The embedded local API, when enabled, is the only one."""
    if settings.uses_fake_api:
        if fake_url is None:
            raise ConfigurationError("the embedded local API is enabled but not running")
        from pydantic import SecretStr

        return [UpstreamSettings(name=FAKE_UPSTREAM, base_url=fake_url, api_key=SecretStr(FAKE_API_KEY),
                                 limit_group=DEFAULT_GROUP)]
    ups = settings.configured_upstreams()
    if not settings.upstreams and ups:
        ups = [ups[0].model_copy(update={"limit_group": DEFAULT_GROUP})]
    names = [u.name for u in ups]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"upstream names must be unique: {names}", field="upstreams")
    for u in ups:
        _check(u)
    return ups


def _check(u: UpstreamSettings) -> None:
    if u.kind == "bedrock" and not u.aws_region:
        raise ConfigurationError(f"upstream {u.name!r}: bedrock needs aws_region", field="upstreams")
    if u.kind == "vertex" and not (u.project_id and u.region):
        raise ConfigurationError(f"upstream {u.name!r}: vertex needs project_id and region", field="upstreams")


def limit_groups(settings: Settings, ups: Sequence[UpstreamSettings]
                 ) -> tuple[dict[str, dict[str, ClassLimits]], dict[str, float]]:
    """The limiter's bucket sets: per limit group its limits (the first upstream of a group names them) and
    its weight (the sum of its upstreams' weights)."""
    groups: dict[str, dict[str, ClassLimits]] = {}
    weights: dict[str, float] = {}
    for u in ups:
        g = u.group
        weights[g] = weights.get(g, 0.0) + u.weight
        if g == DEFAULT_GROUP or g in groups:
            continue
        groups[g] = dict(u.limits) if u.limits else dict(settings.limits)
    return groups, weights


def pick(candidates: Sequence[UpstreamSettings], group: str, rng: random.Random | None = None
         ) -> UpstreamSettings:
    """One upstream of ``group`` among ``candidates``, drawn by weight (keys of one workspace share its
    buckets, so which of them carries a request is only a matter of spreading)."""
    same = [u for u in candidates if u.group == group] or list(candidates)
    if len(same) == 1:
        return same[0]
    r = (rng or random).random() * sum(u.weight for u in same)
    for u in same:
        r -= u.weight
        if r <= 0:
            return u
    return same[-1]


def limits_from_rate_limits_api(body: dict[str, Any], models: dict[str, ModelInfo]) -> dict[str, ClassLimits]:
    """The organisation's configured limits (Admin API ``GET /v1/organizations/rate_limits``) per model class.
    A class takes the lowest limit listed for any of its models' groups (the safe reading when a class spans
    several groups)."""
    out: dict[str, dict[str, int]] = {}
    names = {"requests_per_minute": "rpm", "input_tokens_per_minute": "itpm",
             "input_tokens_per_minute_cache_aware": "itpm", "output_tokens_per_minute": "otpm"}
    for entry in body.get("data", []):
        if (entry.get("group_type") or (entry.get("group") or {}).get("type")) != "model_group":
            continue
        classes = {models[m].model_class for m in entry.get("models", []) if m in models}
        vals = {names[lim["type"]]: int(lim["value"]) for lim in entry.get("limits", [])
                if lim.get("type") in names and isinstance(lim.get("value"), (int, float))}
        for cls in classes:
            cur = out.setdefault(cls, {})
            for k, v in vals.items():
                cur[k] = min(cur.get(k, v), v)
    return {cls: ClassLimits(**v) for cls, v in out.items() if {"rpm", "itpm", "otpm"} <= set(v)}


def fetch_rate_limits(u: UpstreamSettings, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Every page of the organisation's rate-limit listing, with this upstream's admin key."""
    if u.admin_api_key is None:
        raise ConfigurationError(f"upstream {u.name!r} has no admin_api_key")
    base = (u.base_url or "https://api.anthropic.com").rstrip("/")
    data: list[dict[str, Any]] = []
    page = None
    while True:
        url = f"{base}/v1/organizations/rate_limits?limit=100" + (f"&page={page}" if page else "")
        req = urllib.request.Request(url, headers={"x-api-key": u.admin_api_key.get_secret_value(),
                                                   "anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = json.loads(resp.read().decode())
        data.extend(body.get("data", []))
        page = body.get("next_page")
        if not page:
            return {"data": data}
