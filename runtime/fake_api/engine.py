"""The fake API's state and per-request logic, free of HTTP: auth, admission, faults, replies, billing, stats.

One engine lives on one event loop and is only touched from it, so nothing here locks.
"""

from __future__ import annotations

import hmac
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

from runtime.fake_api.admin import UsageBook
from runtime.fake_api.billing import BillingLog
from runtime.fake_api.config import ADMIN_KEY_PREFIX, FakeApiConfig, parse_limits
from runtime.fake_api.generate import generate
from runtime.fake_api.prompt_cache import CachePlan, PromptCache
from runtime.fake_api.protocol import ApiError, IdMaker, key_id
from runtime.fake_api.ratelimits import RateLimits
from runtime.fake_api.tokenizer import count_prompt
from runtime.fake_api.validation import Prepared


class Stats:
    def __init__(self) -> None:
        # requests being processed right now: not cleared by a reset, they are still running
        self.in_flight = 0
        self.in_flight_by_route: dict[str, int] = {}
        self.clear()

    def enter(self, route: str) -> None:
        self.in_flight += 1
        by = self.in_flight_by_route
        by[route] = by.get(route, 0) + 1

    def leave(self, route: str) -> None:
        self.in_flight -= 1
        by = self.in_flight_by_route
        n = by[route] - 1
        if n:
            by[route] = n
        else:
            del by[route]

    def clear(self) -> None:
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.by_class: dict[str, dict[str, Any]] = {}
        self.billed = 0
        self.billed_by_platform: dict[str, int] = {}
        self.count_tokens = 0
        self.batch_requests = 0

    def record(self, status: int, cls: str | None, usage: dict[str, int] | None = None) -> None:
        s = str(status)
        self.requests += 1
        self.by_status[s] = self.by_status.get(s, 0) + 1
        if cls is None:
            return
        c = self.by_class.get(cls)
        if c is None:
            c = self.by_class[cls] = {"requests": 0, "by_status": {}, "input_tokens": 0, "output_tokens": 0,
                                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        c["requests"] += 1
        bs = c["by_status"]
        bs[s] = bs.get(s, 0) + 1
        if usage is not None:
            c["input_tokens"] += usage["input_tokens"]
            c["output_tokens"] += usage["output_tokens"]
            c["cache_creation_input_tokens"] += usage["cache_creation_input_tokens"]
            c["cache_read_input_tokens"] += usage["cache_read_input_tokens"]

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "by_class": {k: {**v, "by_status": dict(v["by_status"])} for k, v in self.by_class.items()},
            "billed": self.billed,
            "billed_by_platform": dict(self.billed_by_platform),
            "count_tokens": self.count_tokens,
            "batch_requests": self.batch_requests,
            "in_flight": {"total": self.in_flight, "by_route": dict(self.in_flight_by_route)},
        }


@dataclass
class Reply:
    """A generated response, before it is serialised as JSON or SSE."""

    prep: Prepared
    msg_id: str
    text: str
    usage: dict[str, Any]
    stop_reason: str
    stop_sequence: str | None

    def message(self) -> dict[str, Any]:
        return {
            "id": self.msg_id, "type": "message", "role": "assistant", "model": self.prep.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence, "usage": self.usage,
        }


_CONFIGURABLE = ("p529", "p500", "latency_ms", "output_tokens", "batch_seconds", "cache_min_tokens",
                 "output_tokens_per_s")


def _attempt(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


class Engine:
    def __init__(self, cfg: FakeApiConfig) -> None:
        self.cfg = cfg
        self.ids = IdMaker()
        self.limits = RateLimits(cfg.limits, cfg.limit_period_s, cfg.clock)
        self.cache = PromptCache(cfg.clock, cfg.cache_min_tokens)
        self.rng = random.Random(cfg.seed)
        # the admin reports start from what an existing billing log already holds
        self.book = UsageBook(cfg.models)
        self.book.load(cfg.billing_path)
        self.billing = BillingLog(cfg.billing_path)
        self.stats = Stats()

    # -- access ------------------------------------------------------------------------------------------
    @staticmethod
    def _key(headers: Mapping[str, str]) -> str:
        key = headers.get("x-api-key")
        if not key:
            auth = headers.get("authorization")
            if auth and auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
        if not key:
            raise ApiError(401, "x-api-key header is required")
        return key

    def authenticate(self, headers: Mapping[str, str]) -> str:
        """The caller's key from ``x-api-key`` or ``Authorization: Bearer``; 401 if missing or wrong. An Admin
        API key cannot send messages (the real API refuses it too)."""
        key = self._key(headers)
        want = self.cfg.api_key
        if want is not None and not hmac.compare_digest(key.encode(), want.encode()):
            raise ApiError(401, "invalid x-api-key")
        if key.startswith(ADMIN_KEY_PREFIX):
            raise ApiError(401, "invalid x-api-key: an Admin API key cannot be used for this endpoint")
        return key

    def authenticate_admin(self, headers: Mapping[str, str]) -> str:
        """An Admin API key (``sk-ant-admin...``, or exactly ``cfg.admin_api_key`` when set); 401 otherwise."""
        key = self._key(headers)
        want = self.cfg.admin_api_key
        if want is not None:
            if not hmac.compare_digest(key.encode(), want.encode()):
                raise ApiError(401, "invalid x-api-key")
        elif not key.startswith(ADMIN_KEY_PREFIX):
            raise ApiError(401, "invalid x-api-key: this endpoint requires an Admin API key")
        return key

    # -- faults --------------------------------------------------------------------------------------------
    def roll_fault(self, cls: str) -> ApiError | None:
        """One draw of the seeded RNG per admitted request, whatever the probabilities, so a given seed gives
        the same fault sequence even when probabilities change at run time."""
        u = self.rng.random()
        cfg = self.cfg
        p529 = cfg.p529_by_class.get(cls, cfg.p529)
        if u < p529:
            return ApiError(529, "Overloaded", model_class=cls)
        p500 = cfg.p500_by_class.get(cls, cfg.p500)
        if u < p529 + p500:
            return ApiError(500, "Internal server error", model_class=cls)
        return None

    # -- the work ------------------------------------------------------------------------------------------
    def plan(self, prep: Prepared, api_key: str, raw: bytes | None = None) -> CachePlan:
        """Token accounting of the prompt; the cache is consulted only when the request asks for it."""
        body = prep.body
        if raw is not None and b"cache_control" not in raw:
            return CachePlan(total=count_prompt(body, prep.family))
        return self.cache.plan(f"{api_key}\x00{prep.model}", body, prep.family, prep.info.min_cache_tokens)

    def response_started(self, plan: CachePlan) -> None:
        """The response has begun: only now do its cache writes become readable (and its read refresh the
        entry), as on the real API, where concurrent first requests with a new prefix each pay the write."""
        self.cache.commit(plan)

    def check_size(self, prep: Prepared, plan: CachePlan) -> None:
        limit = prep.info.max_input_tokens
        if plan.total > limit:
            raise ApiError(413, f"prompt is too long: {plan.total} tokens > {limit} maximum",
                           model_class=prep.model_class)

    def reply(self, prep: Prepared, plan: CachePlan, *, batch: bool = False) -> Reply:
        """The answer and its usage; the cache changes later, in ``response_started``."""
        text, out, stop, stop_seq = generate(prep.body, prep.max_tokens, prep.family, self.cfg.output_tokens)
        usage = {
            "input_tokens": plan.uncached,
            "output_tokens": out,
            "cache_creation_input_tokens": plan.write,
            "cache_read_input_tokens": plan.read,
            "cache_creation": {"ephemeral_5m_input_tokens": plan.write_5m,
                               "ephemeral_1h_input_tokens": plan.write_1h},
            "service_tier": "batch" if batch else "standard",
        }
        return Reply(prep, self.ids.make("msg"), text, usage, stop, stop_seq)

    def bill(self, r: Reply, *, request_id: str | None, headers: Mapping[str, str] | None = None,
             batch: bool = False, extra: dict[str, Any] | None = None, api_key: str | None = None,
             platform: str = "anthropic", platform_model: str | None = None) -> None:
        """Write the billing line of one response. The key itself is never written: ``api_key_id`` is a short
        hash of it, stable across restarts, so reports can group by key."""
        u = r.usage
        cc = u["cache_creation"]
        rec = {
            "id": r.msg_id, "request_id": request_id, "ts": time.time(), "model": r.prep.model,
            "model_class": r.prep.model_class, "user_id": r.prep.user_id,
            "input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
            "cache_creation_input_tokens": u["cache_creation_input_tokens"],
            "cache_read_input_tokens": u["cache_read_input_tokens"],
            "cache_write_5m": cc["ephemeral_5m_input_tokens"], "cache_write_1h": cc["ephemeral_1h_input_tokens"],
            "batch": batch, "service_tier": "batch" if batch else "standard",
            "platform": platform, "platform_model": platform_model,
            "api_key_id": key_id(api_key) if api_key else None,
            "client_request_id": headers.get("idempotency-key") if headers is not None else None,
            "runtime_request_id": headers.get("x-claude-runtime-request-id") if headers is not None else None,
            "runtime_attempt": _attempt(headers.get("x-claude-runtime-attempt")) if headers is not None else None,
        }
        if extra:
            rec.update(extra)
        rec["cost_usd"] = round(self.book.add(rec), 12)
        self.billing.write(rec)
        st = self.stats
        st.billed += 1
        st.billed_by_platform[platform] = st.billed_by_platform.get(platform, 0) + 1

    # -- control -------------------------------------------------------------------------------------------
    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        for k, v in changes.items():
            if k in _CONFIGURABLE:
                if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                    raise ValueError(f"{k} must be a number")
                if k in ("p529", "p500") and not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"{k} must be in [0, 1]")
                if k == "output_tokens_per_s" and v is not None and not v > 0:
                    raise ValueError("output_tokens_per_s must be > 0, or null for instant answers")
                if k == "cache_min_tokens" and v is not None and not v > 0:
                    raise ValueError("cache_min_tokens must be > 0, or null for each model's own minimum")
                setattr(cfg, k, v)
                if k == "cache_min_tokens":
                    self.cache.min_tokens = None if v is None else int(v)
            elif k in ("p529_by_class", "p500_by_class"):
                if not isinstance(v, dict):
                    raise ValueError(f"{k} must be an object of model class -> probability")
                setattr(cfg, k, {str(c): float(p) for c, p in v.items()})
            elif k == "limits":
                cfg.limits = parse_limits(v)
                self.limits.configure(cfg.limits)
            elif k == "platform_models":
                if not isinstance(v, dict) or not all(isinstance(a, str) and isinstance(b, str)
                                                      for a, b in v.items()):
                    raise ValueError("platform_models must be an object of platform model id -> model id")
                cfg.platform_models = dict(v)
            else:
                raise ValueError(f"unknown setting {k!r}")
        return self.describe()

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "p529": cfg.p529, "p500": cfg.p500, "p529_by_class": cfg.p529_by_class,
            "p500_by_class": cfg.p500_by_class, "latency_ms": cfg.latency_ms, "seed": cfg.seed,
            "output_tokens": cfg.output_tokens, "batch_seconds": cfg.batch_seconds,
            "cache_min_tokens": cfg.cache_min_tokens, "output_tokens_per_s": cfg.output_tokens_per_s,
            "platform_models": dict(cfg.platform_models),
            "limits": None if cfg.limits is None else {c: l.model_dump() for c, l in cfg.limits.items()},
            "models": sorted(cfg.models),
        }

    def reset(self) -> None:
        """Clean slate for tests: stats, buckets, prompt cache, and the fault RNG back at its seed."""
        self.stats.clear()
        self.limits.reset()
        self.cache.clear()
        self.rng.seed(self.cfg.seed)

    def close(self) -> None:
        self.billing.close()
