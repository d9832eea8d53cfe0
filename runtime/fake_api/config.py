"""What the local API is told to be: its models, limits, faults and pace."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runtime.settings import ClassLimits, ModelInfo, default_limits, default_models

# Admin API keys start with this; they may read the admin reports and may not send messages
ADMIN_KEY_PREFIX = "sk-ant-admin"


@dataclass
class FakeApiConfig:
    """Configuration of one fake API server. Plain dataclass: cheap to copy, easy to override in tests.

    ``limits=None`` means unlimited (headers then report very large limits). ``api_key=None`` accepts any
    non-empty key. ``output_tokens=None`` makes the reply length a deterministic function of the prompt in
    [16, 128] tokens, always capped by ``max_tokens``. ``output_tokens_per_s=None`` answers at once; a rate
    makes a response of N output tokens take N / rate seconds (a stream spreads its deltas over that time).
    ``platform_models`` maps Bedrock / Vertex model ids to registry ids, before the default id rules
    (``platforms.resolve_model``). ``admin_api_key=None`` accepts any key starting with ``sk-ant-admin`` on
    the Admin API routes.
    """

    models: dict[str, ModelInfo] = field(default_factory=default_models)
    limits: dict[str, ClassLimits] | None = field(default_factory=default_limits)
    api_key: str | None = None
    p529: float = 0.0
    p500: float = 0.0
    # per model class overrides of the fault probabilities, e.g. {"sonnet": 1.0} for a 529 storm on one class
    p529_by_class: dict[str, float] = field(default_factory=dict)
    p500_by_class: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0
    seed: int = 0
    billing_path: Path | None = None
    output_tokens: int | None = None
    output_tokens_per_s: float | None = None
    platform_models: dict[str, str] = field(default_factory=dict)
    admin_api_key: str | None = None
    batch_seconds: float = 2.0
    # the real API ignores cache_control on prefixes shorter than the model's minimum
    # (ModelInfo.min_cache_tokens); a number here overrides it for every model (tests)
    cache_min_tokens: int | None = None
    # period of the rate-limit buckets; the real API meters per minute
    limit_period_s: float = 60.0
    host: str = "127.0.0.1"
    port: int = 0
    # monotonic clock for buckets, prompt-cache TTLs and batch progress; tests may inject a manual one
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "FakeApiConfig":
        """Models and limits from ``runtime.Settings``, faults/pace from ``settings.fake_api``; keyword
        overrides win (None overrides are ignored so CLI defaults do not erase settings)."""
        fa = settings.fake_api
        kw: dict[str, Any] = dict(
            models=dict(settings.models),
            limits=dict(settings.limits),
            p529=fa.p529,
            p500=fa.p500,
            latency_ms=fa.latency_ms,
            seed=fa.seed,
            billing_path=settings.billing_path,
            host=fa.host,
            port=fa.port,
            # not (yet) a field of FakeApiSettings everywhere: taken when the settings have it
            output_tokens_per_s=getattr(fa, "output_tokens_per_s", None),
        )
        for k, v in overrides.items():
            if k not in _FIELD_NAMES:
                raise TypeError(f"FakeApiConfig has no field {k!r}")
            if v is None and k in kw and k not in ("limits", "billing_path"):
                continue
            kw[k] = v
        if kw.get("billing_path") is not None:
            kw["billing_path"] = Path(kw["billing_path"])
        return cls(**kw)

    def with_uniform_limits(self, rpm: int, itpm: int, otpm: int) -> "FakeApiConfig":
        """The same RPM / ITPM / OTPM for every model class (the CLI's --rpm/--itpm/--otpm)."""
        classes = sorted({m.model_class for m in self.models.values()} | set(self.limits or {}))
        lim = ClassLimits(rpm=rpm, itpm=itpm, otpm=otpm)
        return dataclasses.replace(self, limits={c: lim for c in classes})

    def copy(self, **changes: Any) -> "FakeApiConfig":
        fresh: dict[str, Any] = dict(
            models=dict(self.models), limits=None if self.limits is None else dict(self.limits),
            p529_by_class=dict(self.p529_by_class), p500_by_class=dict(self.p500_by_class),
            platform_models=dict(self.platform_models))
        fresh.update(changes)
        return dataclasses.replace(self, **fresh)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(FakeApiConfig))


def parse_limits(raw: Any) -> dict[str, ClassLimits] | None:
    """Limits from JSON (``/_fake/config``): ``{"sonnet": {"rpm":..,"itpm":..,"otpm":..}}`` or null."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("limits must be an object of model class -> {rpm, itpm, otpm}, or null")
    return {str(k): v if isinstance(v, ClassLimits) else ClassLimits(**v) for k, v in raw.items()}
