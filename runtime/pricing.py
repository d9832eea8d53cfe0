"""Usage -> dollars, from the price tiers in ``Settings.models``.

Prices are configuration (they change with Anthropic's price list), so nothing here holds a number. An unknown
model raises ``UnknownModel`` (through ``Settings.model_info``): a model with no price must never cost $0.

The tier is chosen by the whole prompt (uncached input + cache writes + cache reads), because that is what the
API bills long-context tiers by; every token kind of that response is then priced at that tier's rates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from runtime.settings import ModelInfo, PriceTier, Settings
from runtime.usage import Usage

_PER_TOKEN = 1e-6  # prices are per million tokens
_BATCH_FACTOR = 0.5


@dataclass(frozen=True)
class CostBreakdown:
    input_usd: float
    output_usd: float
    cache_write_usd: float
    cache_read_usd: float
    total_usd: float
    batch: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostBreakdown":
        return cls(**{k: d[k] for k in ("input_usd", "output_usd", "cache_write_usd", "cache_read_usd",
                                        "total_usd")}, batch=bool(d.get("batch", False)))

    @classmethod
    def zero(cls, batch: bool = False) -> "CostBreakdown":
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, batch)


def tier_for(info: ModelInfo, prompt_tokens: int) -> PriceTier:
    """The first tier whose bound holds the prompt (the last tier is unbounded by validation)."""
    for tier in info.prices:
        if tier.up_to_input_tokens is None or prompt_tokens <= tier.up_to_input_tokens:
            return tier
    return info.prices[-1]


def price(usage: Usage, model: str, settings: Settings, *, batch: bool = False,
          price_factor: float = 1.0) -> CostBreakdown:
    """``price_factor``: the upstream's own price relative to the list (Bedrock or Vertex in some regions)."""
    info = settings.model_info(model)  # raises UnknownModel
    tier = tier_for(info, usage.prompt_tokens)
    factor = _PER_TOKEN * (_BATCH_FACTOR if batch else 1.0) * price_factor
    inp = usage.input_tokens * tier.input * factor
    out = usage.output_tokens * tier.output * factor
    # validation fills the cache rates, so they are never None here
    write = (usage.cache_write_5m_tokens * tier.cache_write_5m
             + usage.cache_write_1h_tokens * tier.cache_write_1h) * factor
    read = usage.cache_read_tokens * tier.cache_read * factor
    return CostBreakdown(inp, out, write, read, inp + out + write + read, batch)


def max_cost(model: str, est_input_tokens: int, max_tokens: int, settings: Settings, *,
             batch: bool = False) -> float:
    """Worst-case cost of one call from a calibrated estimate of its prompt (30 % headroom: the tokenizer
    generations differ by about that much). Prefer ``bound_cost`` with a real bound where there is one."""
    return bound_cost(model, int(max(0, int(est_input_tokens)) * 1.3), max_tokens, settings, batch=batch)


def bound_cost(model: str, input_tokens_bound: int, max_tokens: int, settings: Settings, *, batch: bool = False,
               worst_tier: bool = False, price_factor: float = 1.0, cacheable_tokens_bound: int | None = None,
               cache_ttl: str | None = "1h") -> float:
    """The most one call can cost when its prompt is at most ``input_tokens_bound`` tokens and its answer at
    most ``max_tokens``: the tier that many tokens would reach (or the dearest tier, when even the bound is not
    trusted), every input token at the dearest input-side rate of that tier (a 1 h cache write costs 2x input),
    every output token at the output rate. A budget reservation of this size cannot be overshot by the bill.

    When the request's ``cache_control`` markers are known: only the tokens up to the last marker can be
    written or read, at most ``cacheable_tokens_bound`` of them (None: all), each at the dearest of input, the
    writes up to ``cache_ttl`` (the markers' longest TTL; None: no marker) and read; the rest are plain input.
    The defaults give the bound above."""
    info = settings.model_info(model)
    n = max(0, int(input_tokens_bound))
    c = n if cacheable_tokens_bound is None else min(n, max(0, int(cacheable_tokens_bound)))
    tiers = list(info.prices) if worst_tier else [tier_for(info, n)]
    cost = 0.0
    for tier in tiers:
        if cache_ttl is None:
            cached_rate = tier.input
        else:
            # markers with a 1 h TTL may sit beside 5 m ones: either write can be billed
            write = max(tier.cache_write_1h, tier.cache_write_5m) if cache_ttl == "1h" else tier.cache_write_5m
            cached_rate = max(tier.input, write, tier.cache_read)
        cost = max(cost, n * tier.input + c * (cached_rate - tier.input) + max(0, int(max_tokens)) * tier.output)
    return cost * _PER_TOKEN * (_BATCH_FACTOR if batch else 1.0) * price_factor


def token_factor(batch: bool = False) -> float:
    """Dollars per token for a rate quoted per million tokens, with the batch discount when ``batch``."""
    return _PER_TOKEN * (_BATCH_FACTOR if batch else 1.0)
