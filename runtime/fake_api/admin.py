"""The Admin API's usage, cost and rate-limit reports, served from what the fake API billed.

``UsageBook`` keeps the billing log summed per minute and per (api key, workspace, model, service tier, context
window): tokens of each kind, and their cost at the prices the fake API bills with (batch at 50 %). It is filled
from the billing file at start (so reports survive a restart, as the real ones do) and by every billed
response. The reports cover the Anthropic platform only: Bedrock and Vertex usage is billed by AWS and Google,
and the Anthropic Admin API does not show it.

- ``usage_report``: ``GET /v1/organizations/usage_report/messages``: buckets of 1m / 1h / 1d from
  ``starting_at`` (snapped to the bucket) to ``ending_at`` (exclusive; a bucket that starts before it is
  included, so "today so far" is one bucket) or now; ``group_by[]``, the filters, ``limit`` and ``page``.
- ``cost_report``: ``GET /v1/organizations/cost_report``: USD by day, ``amount`` a decimal string in cents.
- ``rate_limits``: ``GET /v1/organizations/rate_limits``: one ``model_group`` entry per model class.

Nothing here knows HTTP: parameters come as a ``getall(name) -> list[str]`` function, errors as ``ApiError``.
"""

from __future__ import annotations

import base64
import binascii
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import orjson

from runtime.fake_api.protocol import ApiError
from runtime.fake_api.ratelimits import UNLIMITED
from runtime.pricing import tier_for
from runtime.settings import ClassLimits, ModelInfo

GetAll = Callable[[str], list[str]]

TOKEN_TYPES = ("uncached_input_tokens", "cache_creation.ephemeral_5m_input_tokens",
               "cache_creation.ephemeral_1h_input_tokens", "cache_read_input_tokens", "output_tokens")
_TOKEN_LABELS = ("Input Tokens", "Input Tokens, Cache Write 5m", "Input Tokens, Cache Write 1h",
                 "Input Tokens, Cache Hit", "Output Tokens")
USAGE_GROUPS = ("api_key_id", "workspace_id", "model", "service_tier", "context_window")
COST_GROUPS = ("workspace_id", "description")
_WIDTH_S = {"1m": 60, "1h": 3600, "1d": 86400}
# (default, maximum) buckets per page, as the API documents them
_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
_COST_LIMITS = (7, 31)
LONG_CONTEXT = 200_000
_PER_TOKEN = 1e-6
_BATCH_FACTOR = 0.5


def context_window(prompt_tokens: int) -> str:
    return "0-200k" if prompt_tokens <= LONG_CONTEXT else "200k-1M"


class UsageBook:
    """Billed usage per minute and group: ``{minute: {(api_key_id, workspace_id, model, tier, ctx): sums}}``
    where sums are 5 token counts then their 5 costs in USD, in ``TOKEN_TYPES`` order."""

    def __init__(self, models: Mapping[str, ModelInfo]) -> None:
        self.models = models
        self.minutes: dict[int, dict[tuple, list[float]]] = {}

    def add(self, rec: Mapping[str, Any]) -> float:
        """Count one billing line; returns its cost in USD (also for Bedrock / Vertex lines, which the
        Anthropic reports leave out: list prices are the same on every platform)."""
        tokens = (int(rec.get("input_tokens") or 0), int(rec.get("cache_write_5m") or 0),
                  int(rec.get("cache_write_1h") or 0), int(rec.get("cache_read_input_tokens") or 0),
                  int(rec.get("output_tokens") or 0))
        prompt = tokens[0] + tokens[1] + tokens[2] + tokens[3]
        batch = bool(rec.get("batch"))
        model = rec.get("model")
        info = self.models.get(model) if isinstance(model, str) else None
        if info is not None:
            t = tier_for(info, prompt)
            f = _PER_TOKEN * (_BATCH_FACTOR if batch else 1.0)
            costs = (tokens[0] * t.input * f, tokens[1] * (t.cache_write_5m or 0.0) * f,
                     tokens[2] * (t.cache_write_1h or 0.0) * f, tokens[3] * (t.cache_read or 0.0) * f,
                     tokens[4] * t.output * f)
        else:  # a model no longer configured: its tokens still show, at no price the server could know
            costs = (0.0,) * 5
        if rec.get("platform", "anthropic") != "anthropic":
            return sum(costs)
        key = (rec.get("api_key_id"), rec.get("workspace_id"), model, "batch" if batch else "standard",
               context_window(prompt))
        minute = int(float(rec.get("ts") or 0.0) // 60)
        groups = self.minutes.get(minute)
        if groups is None:
            groups = self.minutes[minute] = {}
        sums = groups.get(key)
        if sums is None:
            groups[key] = [*tokens, *costs]
        else:
            for i, v in enumerate((*tokens, *costs)):
                sums[i] += v
        return sum(costs)

    def load(self, path: Path | None) -> None:
        """Sum an existing billing log (complete lines only)."""
        if path is None or not Path(path).exists():
            return
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    try:
                        self.add(orjson.loads(line))
                    except (orjson.JSONDecodeError, TypeError, ValueError):
                        continue

    def rows(self, start_s: int, end_s: int) -> Iterable[tuple[int, tuple, list[float]]]:
        """(minute start in epoch seconds, group key, sums) for minutes starting in [start_s, end_s)."""
        for minute, groups in self.minutes.items():
            if start_s <= minute * 60 < end_s:
                for key, sums in groups.items():
                    yield minute * 60, key, sums


# -- parameters ----------------------------------------------------------------------------------------------
def _one(getall: GetAll, name: str) -> str | None:
    vals = getall(name)
    return vals[-1] if vals else None


def _many(getall: GetAll, name: str) -> list[str]:
    """``name[]=a&name[]=b``, ``name=a&name=b`` or ``name=a,b``."""
    out: list[str] = []
    for v in getall(name + "[]") + getall(name):
        out.extend(p for p in v.split(",") if p)
    return out


def parse_time(raw: str, field: str) -> float:
    try:
        dt = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"{field}: Input should be a valid datetime (RFC 3339)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _snap(epoch_s: float, width_s: int) -> int:
    return int(epoch_s // width_s) * width_s


def _page_token(epoch_s: int) -> str:
    return "page_" + base64.b64encode(iso(epoch_s).encode()).decode()


def _page_start(token: str) -> float:
    if not token.startswith("page_"):
        raise ApiError(400, "page: invalid page token")
    try:
        return parse_time(base64.b64decode(token[5:], validate=True).decode(), "page")
    except (binascii.Error, UnicodeDecodeError, ApiError):
        raise ApiError(400, "page: invalid page token") from None


def _limit(getall: GetAll, default: int, maximum: int) -> int:
    raw = _one(getall, "limit")
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise ApiError(400, "limit: Input should be a valid integer") from None
    if not 1 <= n <= maximum:
        raise ApiError(400, f"limit: Input should be between 1 and {maximum}")
    return n


def _groups(getall: GetAll, allowed: tuple[str, ...]) -> list[str]:
    groups = _many(getall, "group_by")
    for g in groups:
        if g not in allowed:
            raise ApiError(400, "group_by: Input should be " + ", ".join(f"'{a}'" for a in allowed))
    return groups


def _buckets(getall: GetAll, width: str, default: int, maximum: int, now: float
             ) -> tuple[list[int], int, str | None]:
    """(bucket starts of this page, bucket width in seconds, next page token or None)."""
    raw = _one(getall, "starting_at")
    if raw is None:
        raise ApiError(400, "starting_at: Field required")
    w = _WIDTH_S[width]
    start = _snap(parse_time(raw, "starting_at"), w)
    page = _one(getall, "page")
    if page:
        start = max(start, _snap(_page_start(page), w))
    end_raw = _one(getall, "ending_at")
    end = parse_time(end_raw, "ending_at") if end_raw is not None else now
    limit = _limit(getall, default, maximum)
    starts: list[int] = []
    b = start
    while b < end and len(starts) < limit:
        starts.append(b)
        b += w
    return starts, w, (_page_token(b) if b < end else None)


def _width(getall: GetAll, allowed: tuple[str, ...]) -> str:
    width = _one(getall, "bucket_width") or "1d"
    if width not in allowed:
        raise ApiError(400, "bucket_width: Input should be " + ", ".join(f"'{a}'" for a in allowed))
    return width


# -- reports -------------------------------------------------------------------------------------------------
def usage_report(book: UsageBook, getall: GetAll, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    width = _width(getall, ("1m", "1h", "1d"))
    default, maximum = _LIMITS[width]
    groups = _groups(getall, USAGE_GROUPS)
    filters = {i: set(_many(getall, name)) for i, name in enumerate(
        ("api_key_ids", "workspace_ids", "models", "service_tiers", "context_window"))}
    filters = {i: f for i, f in filters.items() if f}
    starts, w, next_page = _buckets(getall, width, default, maximum, now)
    keep = [USAGE_GROUPS.index(g) for g in groups]
    accs: list[dict[tuple, list[float]]] = [{} for _ in starts]
    for minute_s, key, sums in book.rows(starts[0], starts[-1] + w) if starts else ():
        if any(key[i] not in f for i, f in filters.items()):
            continue
        acc = accs[(minute_s - starts[0]) // w]
        gk = tuple(key[i] for i in keep)
        a = acc.get(gk)
        if a is None:
            acc[gk] = list(sums[:5])
        else:
            for i in range(5):
                a[i] += sums[i]
    data = []
    for b, acc in zip(starts, accs):
        results = []
        for gk, s in acc.items():
            row: dict[str, Any] = {
                "uncached_input_tokens": int(s[0]),
                "cache_creation": {"ephemeral_1h_input_tokens": int(s[2]), "ephemeral_5m_input_tokens": int(s[1])},
                "cache_read_input_tokens": int(s[3]),
                "output_tokens": int(s[4]),
                "server_tool_use": {"web_search_requests": 0},
                "api_key_id": None, "workspace_id": None, "model": None, "service_tier": None,
                "context_window": None, "inference_geo": None,
            }
            for g, v in zip(groups, gk):
                row[g] = v
            results.append(row)
        data.append({"starting_at": iso(b), "ending_at": iso(b + w), "results": results})
    return {"data": data, "has_more": next_page is not None, "next_page": next_page}


def _cents(usd: float) -> str:
    s = f"{usd * 100:.10f}".rstrip("0").rstrip(".")
    return s or "0"


def cost_report(book: UsageBook, getall: GetAll, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    width = _width(getall, ("1d",))
    groups = _groups(getall, COST_GROUPS)
    by_ws = "workspace_id" in groups
    by_desc = "description" in groups
    starts, w, next_page = _buckets(getall, width, *_COST_LIMITS, now)
    accs: list[dict[tuple, float]] = [{} for _ in starts]
    for minute_s, key, sums in book.rows(starts[0], starts[-1] + w) if starts else ():
        acc = accs[(minute_s - starts[0]) // w]
        _, ws, model, tier, ctx = key
        for t in range(5):
            usd = sums[5 + t]
            if not usd and not sums[t]:
                continue
            gk = (ws if by_ws else None,) + ((model, tier, ctx, t) if by_desc else ())
            acc[gk] = acc.get(gk, 0.0) + usd
    data = []
    for b, acc in zip(starts, accs):
        results = []
        for gk, usd in acc.items():
            row: dict[str, Any] = {
                "currency": "USD", "amount": _cents(usd), "workspace_id": gk[0], "description": None,
                "cost_type": None, "context_window": None, "model": None, "service_tier": None,
                "token_type": None, "inference_geo": None,
            }
            if by_desc:
                model, tier, ctx, t = gk[1:]
                row.update(description=f"{model} Usage - {_TOKEN_LABELS[t]}" + (", Batch" if tier == "batch" else ""),
                           cost_type="tokens", context_window=ctx, model=model, service_tier=tier,
                           token_type=TOKEN_TYPES[t])
            results.append(row)
        data.append({"starting_at": iso(b), "ending_at": iso(b + w), "results": results})
    return {"data": data, "has_more": next_page is not None, "next_page": next_page}


def rate_limits(models: Mapping[str, ModelInfo], limits: Mapping[str, ClassLimits] | None,
                getall: GetAll) -> dict[str, Any]:
    """One ``model_group`` entry per model class with its configured RPM / ITPM / OTPM (unlimited classes
    report the same very large value as the response headers)."""
    classes: dict[str, list[str]] = {}
    for mid, info in models.items():
        classes.setdefault(info.model_class, []).append(mid)
    entries = []
    for cls in sorted(classes):
        lim = (limits or {}).get(cls)
        rpm, itpm, otpm = (lim.rpm, lim.itpm, lim.otpm) if lim is not None else (UNLIMITED,) * 3
        entries.append({
            "type": "rate_limit", "id": f"rl_fake_{cls}",
            "group": {"type": "model_group", "id": f"rlg_fake_{cls}", "display_name": f"Claude {cls.title()}"},
            "group_type": "model_group",
            "models": sorted(classes[cls]),
            "limits": [{"type": "requests_per_minute", "value": rpm},
                       {"type": "input_tokens_per_minute_cache_aware", "value": itpm},
                       {"type": "output_tokens_per_minute", "value": otpm}],
        })
    gt = _one(getall, "group_type")
    if gt is not None:
        entries = [e for e in entries if e["group"]["type"] == gt]
    model = _one(getall, "model")
    if model is not None:
        entries = [e for e in entries if model in e["models"]]
        if not entries:
            raise ApiError(404, f"model: {model} not found or has no rate limits for this organization")
    offset = 0
    page = _one(getall, "page")
    if page:
        try:
            offset = int(base64.b64decode(page.removeprefix("page_"), validate=True).decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ApiError(400, "page: invalid page token") from None
    raw_limit = _one(getall, "limit")
    if raw_limit is None:
        return {"data": entries[offset:], "next_page": None}
    n = _limit(getall, 1000, 1000)
    chunk = entries[offset:offset + n]
    more = offset + n < len(entries)
    return {"data": chunk, "next_page": "page_" + base64.b64encode(str(offset + n).encode()).decode() if more
            else None}

