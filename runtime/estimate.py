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
import re
import threading
from dataclasses import dataclass
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
        # text outside ASCII is mostly CJK or another script the BPE splits finely: about a token per character
        # rather than per four (counting it by characters alone undercounts CJK about 4x)
        return (counter.chars - counter.non_ascii) / cpt + counter.non_ascii + fixed

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

    __slots__ = ("chars", "fixed_tokens", "non_ascii")

    def __init__(self) -> None:
        self.chars = 0
        self.fixed_tokens = 0
        self.non_ascii = 0

    def _text(self, text: str) -> None:
        self.chars += len(text)
        if not text.isascii():
            self.non_ascii += sum(1 for ch in text if ord(ch) > 127)

    def add(self, content: Any) -> None:
        if content is None:
            return
        if isinstance(content, str):
            self._text(content)
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
            self._text(_s(b.get("text")))
        elif kind == "image":
            self.fixed_tokens += _IMAGE_TOKENS
        elif kind == "document":
            src = b.get("source") or {}
            src = src if isinstance(src, dict) else {}
            if src.get("type") == "text":
                self._text(_s(src.get("data")))
            elif src.get("type") == "content":
                self.add(src.get("content"))
            else:
                data = _s(src.get("data"))
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


def _s(v: Any) -> str:
    return v if isinstance(v, str) else ""


# -- an upper bound for budget reservations ----------------------------------------------------------------------

# generous per-structure overheads: the API's own framing per message and per request, and the tool-use
# system prompt the hosted API adds whenever tools are present (a few hundred tokens)
_UB_PER_MESSAGE = 8
_UB_BASE = 16
_UB_TOOLS = 600
# the API downsizes images to about 1.15 megapixels (~1,600 tokens at w*h/750): no image costs more
_UB_IMAGE = 1_800
_LETTERS = re.compile(r"[A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")


def text_upper_bound(text: str) -> int:
    """Tokens ``text`` cannot exceed on a byte-level BPE that keeps common words whole: a letter run costs at
    most one token per three letters, digits one per three, any other ASCII symbol one, and a character outside
    ASCII at most one per UTF-8 byte."""
    if not text:
        return 0
    n = 0
    for m in _LETTERS.finditer(text):
        n += -(-len(m.group()) // 3)
    for m in _DIGITS.finditer(text):
        n += -(-len(m.group()) // 3)
    ascii_other = 0
    non_ascii_bytes = 0
    for ch in text:
        o = ord(ch)
        if o > 127:
            non_ascii_bytes += len(ch.encode("utf-8", "surrogatepass"))
        elif not (ch.isalnum() or ch.isspace()):
            ascii_other += 1
    return n + ascii_other + non_ascii_bytes


@dataclass(frozen=True)
class Bound:
    tokens: int   # the request's input cannot exceed this
    sure: bool    # False: the text or media is of a kind where only the API's own count is trustworthy


def input_upper_bound(params: dict[str, Any]) -> Bound:
    """An upper bound on a request's input tokens, and whether the local estimate can be trusted at all.

    Unsure: any image or binary document (their cost depends on pixels and pages), more than 1 % of text
    outside ASCII (other scripts), or text that is not prose (identifier or base64 soup, digit tables), where
    tokenizers split far finer than on words. The pipeline asks ``messages.count_tokens`` for those."""
    walker = _BoundWalker()
    walker.add(params.get("system"))
    messages = params.get("messages") or ()
    for m in messages:
        walker.add(m.get("content") if isinstance(m, dict) else m)
    tools = params.get("tools")
    fixed = _UB_BASE + _UB_PER_MESSAGE * len(messages)
    if tools:
        walker.text(json.dumps(tools, separators=(",", ":"), ensure_ascii=False, default=str))
        fixed += _UB_TOOLS
    chars = max(1, walker.chars)
    sure = (not walker.media and walker.non_ascii / chars <= 0.01 and walker.long_runs / chars <= 0.05
            and walker.digits_punct / chars <= 0.3)
    return Bound(walker.tokens + walker.media_tokens + fixed, sure)


class _BoundWalker:
    __slots__ = ("tokens", "chars", "non_ascii", "long_runs", "digits_punct", "media", "media_tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.chars = 0
        self.non_ascii = 0
        self.long_runs = 0      # characters in letter runs of 16+ (not words)
        self.digits_punct = 0
        self.media = False
        self.media_tokens = 0

    def text(self, text: str) -> None:
        if not text:
            return
        self.tokens += text_upper_bound(text)
        self.chars += len(text)
        if not text.isascii():
            self.non_ascii += sum(1 for ch in text if ord(ch) > 127)
        self.long_runs += sum(len(m.group()) for m in _LETTERS.finditer(text) if len(m.group()) >= 16)
        self.digits_punct += sum(1 for ch in text if ch.isascii() and not (ch.isalpha() or ch.isspace()))

    def add(self, content: Any) -> None:
        if content is None:
            return
        if isinstance(content, str):
            self.text(content)
        elif isinstance(content, (list, tuple)):
            for b in content:
                self.add(b)
        elif isinstance(content, dict):
            self._block(content)
        else:
            self.text(str(content))

    def _block(self, b: dict[str, Any]) -> None:
        kind = b.get("type")
        if kind == "text":
            self.text(_s(b.get("text")))
        elif kind == "image":
            self.media = True
            self.media_tokens += _UB_IMAGE
        elif kind == "document":
            src = b.get("source") if isinstance(b.get("source"), dict) else {}
            if src.get("type") == "text":
                self.text(_s(src.get("data")))
            elif src.get("type") == "content":
                self.add(src.get("content"))
            else:
                self.media = True
                data = _s(src.get("data"))
                # a page costs its text plus a page image; the page count is read from the PDF itself
                pages = max(1, _pdf_pages(data))
                self.media_tokens += pages * _UB_IMAGE + len(data)
        elif kind in ("tool_use", "server_tool_use"):
            self.text(_s(b.get("name")))
            self.text(json.dumps(b.get("input") or {}, separators=(",", ":"), ensure_ascii=False, default=str))
        elif kind == "tool_result":
            self.tokens += _UB_PER_MESSAGE
            self.add(b.get("content"))
        elif kind == "thinking":
            self.text(_s(b.get("thinking")))
        elif kind == "redacted_thinking":
            self.text(_s(b.get("data")))
        else:
            body = {k: v for k, v in b.items() if k != "cache_control"}
            self.text(json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str))


def _pdf_pages(b64: str) -> int:
    import base64
    import binascii

    try:
        raw = base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError):
        return 1
    return len(re.findall(rb"/Type\s*/Page(?!s)", raw))
