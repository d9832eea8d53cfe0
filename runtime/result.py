"""What ``rt.submit`` returns: the Claude message plus what the runtime did to get it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    message: Any              # anthropic.types.Message
    model: str                # the model that answered (after routing, downgrade and fallback)
    cache: str                # "miss" | "exact" | "semantic" | "bypass"
    cost_usd: float           # what this request was billed (0 for a cache hit)
    attempts: int             # API calls made (0 for a cache hit)
    latency_s: float
    request_id: str
    saved_usd: float = 0.0    # for a cache hit, what the original call cost
    route_reason: str = ""
    user_id: str | None = None
    tenant: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)   # one entry per try: model, status
    upstream: str | None = None   # which upstream answered ("fake-api": the embedded local API, not Claude)

    @property
    def text(self) -> str:
        return "".join(getattr(b, "text", "") for b in self.message.content)
