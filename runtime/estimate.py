"""A cheap local estimate of a request's input tokens, calibrated per tokenizer family from real counts.

The limiter reserves ITPM from this estimate before the call and corrects it from the response's usage, so
the estimate need not be exact, only cheap and slightly high (an under-reservation can earn a 429; an
over-reservation is returned a moment later)::

    est = TokenEstimator()
    n = est.estimate(params, "v2")            # before the call
    ...
    est.observe(n, usage.itpm_tokens + usage.cache_read_tokens, "v2")   # after it: learn the ratio

The heuristic counts characters (about 4 per token for English on the older "v1" tokenizer; "v2", from the
4.7 generation on, counts the same text as ~30 % more tokens). Calibration is a multiplicative correction per
family, learned as an exponential moving average in log space and clamped, so one odd response cannot swing it.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

# characters per token before calibration
_CHARS_PER_TOKEN = {"v1": 4.0, "v2": 4.0 / 1.3}
_PER_MESSAGE = 4         # role and separators
_BASE = 8                # request framing
_IMAGE_TOKENS = 1_600    # a ~1.15 MP image, the largest that is not downscaled
_PDF_BYTES_PER_TOKEN = 25.0
_TOOL_OVERHEAD = 0       # the hosted API adds a tool-use system prompt; calibration learns what a server adds


class TokenEstimator:
    """Per-process estimator; thread-safe enough for the caller's event loop and its helper threads."""

    def __init__(self, *, headroom: float = 1.05, alpha: float = 0.2, min_factor: float = 0.5,
                 max_factor: float = 3.0, max_step: float = 2.0) -> None:
        self.headroom = headroom          # keep estimates this much above the calibrated expectation
        self.alpha = alpha                # EMA weight of one observation
        self.min_factor = min_factor
        self.max_factor = max_factor
        self.max_step = max_step          # one observation moves the factor by at most this ratio
        self._factor: dict[str, float] = {}
        self._observations: dict[str, int] = {}
        self._lock = threading.Lock()

    def factor(self, tokenizer: str) -> float:
        return self._factor.get(tokenizer, 1.0)

    def observations(self, tokenizer: str) -> int:
        return self._observations.get(tokenizer, 0)

    def raw(self, params: dict[str, Any], tokenizer: str = "v2") -> float:
        """Uncalibrated token count of system + messages + tools."""
        cpt = _CHARS_PER_TOKEN.get(tokenizer, _CHARS_PER_TOKEN["v2"])
        counter = _Counter()
        counter.add(params.get("system"))
        messages = params.get("messages") or ()
        for m in messages:
            counter.add(m.get("content") if isinstance(m, dict) else m)
        tools = params.get("tools")
        fixed = _BASE + _PER_MESSAGE * len(messages) + counter.fixed_tokens
        if tools:
            counter.chars += len(json.dumps(tools, separators=(",", ":"), ensure_ascii=False, default=str))
            fixed += _TOOL_OVERHEAD
        return counter.chars / cpt + fixed

    def estimate(self, params: dict[str, Any], tokenizer: str = "v2") -> int:
        return max(1, math.ceil(self.raw(params, tokenizer) * self.factor(tokenizer) * self.headroom))

    def observe(self, params_estimate: int, actual_tokens: int, tokenizer: str = "v2") -> float:
        """Learn from a real count (the response's input + cache write + cache read tokens).

        The estimate passed in is the one ``estimate`` returned, whatever factor was current then: the update
        moves the factor by the ratio of what the estimate should have been to what it was.
        """
        if params_estimate <= 0 or actual_tokens <= 0:
            return self.factor(tokenizer)
        ratio = actual_tokens * self.headroom / params_estimate
        ratio = min(self.max_step, max(1.0 / self.max_step, ratio))
        with self._lock:
            f = self._factor.get(tokenizer, 1.0)
            f *= math.exp(self.alpha * math.log(ratio))
            f = min(self.max_factor, max(self.min_factor, f))
            self._factor[tokenizer] = f
            self._observations[tokenizer] = self._observations.get(tokenizer, 0) + 1
        return f

    def state(self) -> dict[str, dict[str, float]]:
        return {t: {"factor": f, "observations": self._observations.get(t, 0)} for t, f in self._factor.items()}


class _Counter:
    """Walks message content (str or content blocks) and sums characters, plus fixed costs of media."""

    __slots__ = ("chars", "fixed_tokens")

    def __init__(self) -> None:
        self.chars = 0
        self.fixed_tokens = 0

    def add(self, content: Any) -> None:
        if content is None:
            return
        if isinstance(content, str):
            self.chars += len(content)
            return
        if isinstance(content, (list, tuple)):
            for block in content:
                self.add(block)
            return
        if isinstance(content, dict):
            self._block(content)
            return
        self.chars += len(str(content))

    def _block(self, b: dict[str, Any]) -> None:
        kind = b.get("type")
        if kind == "text":
            self.chars += len(b.get("text") or "")
        elif kind == "image":
            self.fixed_tokens += _IMAGE_TOKENS
        elif kind == "document":
            src = b.get("source") or {}
            if src.get("type") == "text":
                self.chars += len(src.get("data") or "")
            elif src.get("type") == "content":
                self.add(src.get("content"))
            else:
                data = src.get("data") or ""
                self.fixed_tokens += max(_IMAGE_TOKENS, int(len(data) * 0.75 / _PDF_BYTES_PER_TOKEN))
        elif kind == "tool_use" or kind == "server_tool_use":
            self.chars += len(b.get("name") or "")
            self.chars += len(json.dumps(b.get("input") or {}, separators=(",", ":"), ensure_ascii=False,
                                         default=str))
        elif kind == "tool_result":
            self.add(b.get("content"))
        elif kind == "thinking":
            self.chars += len(b.get("thinking") or "")
        elif kind == "redacted_thinking":
            self.chars += len(b.get("data") or "") // 4
        else:
            # unknown block kinds: count their text-bearing fields rather than ignore them
            for k, v in b.items():
                if k not in ("type", "cache_control", "id", "tool_use_id") and isinstance(v, str):
                    self.chars += len(v)
