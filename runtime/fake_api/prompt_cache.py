"""Prompt caching the way the API does it: ``cache_control`` on a block marks the prefix up to and including it.

The prompt is read in cache order (tools, system, messages). At each breakpoint the prefix hash is checked
against stored entries, also up to ``LOOKBACK`` blocks before it (so a breakpoint that moves forward along a
conversation still reads the previous turn's prefix). The longest fresh hit is read; each breakpoint after it
is written, its segment's tokens counted under that breakpoint's TTL (5 m or 1 h). A read refreshes the
entry's TTL. Prefixes shorter than the model's minimum (``ModelInfo.min_cache_tokens``) are not cached (the
API ignores them silently). Entries are scoped per API key + model. A string content and its one text block
are the same prompt (they hash alike).

Planning does not change state: ``commit`` does, when the response begins (not when the request is admitted):
the API makes an entry available only once the first response has started, so concurrent first requests
with the same new prefix each write it. That is the cost single-flight in the runtime exists to avoid, so the
fake must not hide it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from runtime.fake_api.tokenizer import iter_prompt_blocks, prompt_block_tokens

LOOKBACK = 20
TTL_S = {"5m": 300.0, "1h": 3600.0}
_MAX_ENTRIES = 200_000


@dataclass
class CachePlan:
    total: int                      # whole prompt's tokens
    read: int = 0                   # cache_read_input_tokens
    write_5m: int = 0
    write_1h: int = 0
    read_key: bytes | None = None
    writes: list[tuple[bytes, float]] = field(default_factory=list)  # (prefix digest, ttl seconds)

    @property
    def write(self) -> int:
        return self.write_5m + self.write_1h

    @property
    def uncached(self) -> int:
        return self.total - self.read - self.write


def _canon(block: Any) -> bytes:
    if isinstance(block, str):
        block = {"type": "text", "text": block}
    elif isinstance(block, dict) and "cache_control" in block:
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return orjson.dumps(block, option=orjson.OPT_SORT_KEYS)


def _ttl_of(cc: Any) -> str:
    if isinstance(cc, dict) and cc.get("ttl") == "1h":
        return "1h"
    return "5m"


class PromptCache:
    def __init__(self, clock: Callable[[], float], min_tokens: int | None = None) -> None:
        self._clock = clock
        # None: each model's own minimum (passed to ``plan``); a number overrides it for every model
        self.min_tokens = min_tokens
        self._entries: dict[bytes, tuple[float, float]] = {}  # digest -> (expires_at, ttl_s)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def plan(self, scope: str, body: dict, family: str, min_tokens: int = 1024) -> CachePlan:
        """What this request reads and writes; ``min_tokens``: the model's minimum cacheable prefix."""
        if self.min_tokens is not None:
            min_tokens = self.min_tokens
        h = hashlib.blake2b(scope.encode(), digest_size=16)
        digests: list[bytes] = []        # prefix digest after each block
        cum: list[int] = []              # prefix tokens after each block
        breakpoints: list[tuple[int, str]] = []  # (block index, ttl name)
        total = 0
        last_content = -1
        for kind, block in iter_prompt_blocks(body):
            total += prompt_block_tokens(kind, block, family)
            if kind == "turn":
                h.update(b"\x00turn:" + str(block).encode())
            else:
                h.update(b"\x00" + kind.encode() + b":" + _canon(block))
            digests.append(h.copy().digest())
            cum.append(total)
            if kind != "turn":
                last_content = len(cum) - 1
                if isinstance(block, dict) and block.get("cache_control"):
                    breakpoints.append((len(cum) - 1, _ttl_of(block["cache_control"])))
        # a top-level cache_control caches the whole prompt up to its last block (automatic caching)
        top = body.get("cache_control")
        if top and last_content >= 0 and (not breakpoints or breakpoints[-1][0] != last_content):
            breakpoints.append((last_content, _ttl_of(top)))
        plan = CachePlan(total=total)
        if not breakpoints:
            return plan
        now = self._clock()
        entries = self._entries
        best = -1
        for bp, _ttl in breakpoints:
            for i in range(bp, max(-1, bp - LOOKBACK - 1), -1):
                if i <= best:
                    break
                e = entries.get(digests[i])
                if e is not None and e[0] > now:
                    best = i
                    break
        done = 0
        if best >= 0:
            plan.read = cum[best]
            plan.read_key = digests[best]
            done = cum[best]
        for bp, ttl in breakpoints:
            if bp <= best or cum[bp] < min_tokens:
                continue
            seg = cum[bp] - done
            if ttl == "1h":
                plan.write_1h += seg
            else:
                plan.write_5m += seg
            plan.writes.append((digests[bp], TTL_S[ttl]))
            done = cum[bp]
        return plan

    def commit(self, plan: CachePlan) -> None:
        now = self._clock()
        entries = self._entries
        if plan.read_key is not None:
            e = entries.get(plan.read_key)
            if e is not None:
                entries[plan.read_key] = (now + e[1], e[1])
        for key, ttl in plan.writes:
            entries[key] = (now + ttl, ttl)
        if len(entries) > _MAX_ENTRIES:
            for k in [k for k, e in entries.items() if e[0] <= now]:
                del entries[k]
