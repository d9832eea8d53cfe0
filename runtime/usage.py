"""Token usage of one response, as the API reports it; the unit every layer exchanges."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0            # uncached input
    output_tokens: int = 0           # thinking included: billed as output
    cache_write_5m_tokens: int = 0   # cache_creation.ephemeral_5m_input_tokens
    cache_write_1h_tokens: int = 0   # cache_creation.ephemeral_1h_input_tokens
    cache_read_tokens: int = 0       # cache_read_input_tokens

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def prompt_tokens(self) -> int:
        """The whole prompt's size (what long-context price tiers are chosen by)."""
        return self.input_tokens + self.cache_write_tokens + self.cache_read_tokens

    @property
    def itpm_tokens(self) -> int:
        """What counts toward input tokens per minute: cache reads do not (current models)."""
        return self.input_tokens + self.cache_write_tokens

    @classmethod
    def from_api(cls, usage: Any) -> "Usage":
        """From an SDK ``Usage`` object or its dict; a missing cache_creation breakdown counts as 5 m writes."""
        get = usage.get if isinstance(usage, dict) else (lambda k, d=None: getattr(usage, k, d))
        creation = get("cache_creation")
        total_write = int(get("cache_creation_input_tokens") or 0)
        if creation is not None:
            cget = creation.get if isinstance(creation, dict) else (lambda k, d=None: getattr(creation, k, d))
            w5 = int(cget("ephemeral_5m_input_tokens") or 0)
            w1 = int(cget("ephemeral_1h_input_tokens") or 0)
            if w5 + w1 != total_write:  # trust the total; attribute the rest to 5 m writes
                w5 = max(0, total_write - w1)
        else:
            w5, w1 = total_write, 0
        return cls(
            input_tokens=int(get("input_tokens") or 0),
            output_tokens=int(get("output_tokens") or 0),
            cache_write_5m_tokens=w5,
            cache_write_1h_tokens=w1,
            cache_read_tokens=int(get("cache_read_input_tokens") or 0),
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))
