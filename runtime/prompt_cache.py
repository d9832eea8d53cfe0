"""Automatic prompt caching: where ``cache_control`` goes, which prefixes are warm, one write per prefix, and
the admission and budget numbers that follow from it. Pure: no Ray, no I/O; time is always passed in.

One request, as the pipeline uses it::

    p = plan(params, model, settings, estimator, prompt_cache=req_override)     # placement, prefix hash
    if p.prefix_hash:
        d = tracker.begin(p.prefix_hash, model, now, prefix_tokens=p.prefix_tokens, deadline=...)
        # WAIT: sleep until d.until (or until the host wakes you), then begin(...) again with the same
        #       waiting_since; LEAD / PASS: a write may happen; WARM: expect a read
        if p.added and d.ttl != p.ttl:
            p = p.with_ttl(d.ttl)
    r = reservation(p, d, est_input_tokens, max_tokens, model, settings)
    # r.itpm_tokens -> limiter (expected charge), r.bound_usd -> budget (a true upper bound)
    ... call the API with p.params ...
    wrote, read = outcome(usage)
    tracker.finish(p.prefix_hash, model, wrote, read, now, ttl=p.ttl, token=d.token)   # or abandon() on error
    savings(usage, model, settings)   # dollars saved against uncached input (negative: a write not repaid)

Placement. The API caches prompts in the order tools, system, messages, and a ``cache_control`` marker caches
the prefix that ends at the marked block. The stable boundaries of a request are the end of the tools, the
end of the system prompt and the end of the earlier turns (everything before the last user turn). ``plan``
marks each boundary whose prefix reaches the model's minimum cacheable length, longest first, as long as the
API's limit of 4 markers (the user's own included) allows: more markers cost nothing (a write is billed per
token written, whatever the number of markers) and let prefixes shared across conversations (the system
prompt) be read even where the conversation's own prefix is new. A boundary the user already marked is left
as it is. The API requires markers with the longer TTL to come before shorter ones; added markers are given
a TTL that keeps that order with the user's markers, or are left out.

The tracked prefix of a plan (``prefix_hash``) is its longest marked boundary that reaches the minimum. Its
hash covers the model, an optional scope and the canonical bytes of the prefix (markers removed, a string
content equal to its one text block) plus, for the earlier-turns boundary, ``tool_choice`` and ``thinking``,
whose changes make the API miss cached turns.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence

from runtime.pricing import tier_for, token_factor
from runtime.settings import PriceTier, Settings
from runtime.usage import Usage

TTL = Literal["5m", "1h"]
# what the API's TTL names mean; the names are the API's, so their lengths are part of the protocol
TTL_SECONDS: dict[str, float] = {"5m": 300.0, "1h": 3600.0}
_TTL_RANK = {"5m": 1, "1h": 2}

BoundaryKind = Literal["tools", "system", "turns"]
_SECTION = {"tools": 0, "system": 1, "turns": 2}
_TAIL = (3,)  # sort position of a marker after every boundary (in the last user turn, or top-level)
_UNMARKABLE = frozenset({"thinking", "redacted_thinking"})


class _Estimator(Protocol):
    def estimate(self, params: dict[str, Any], tokenizer: str = "v2") -> int: ...


TokenCounter = Callable[[dict[str, Any]], int] | _Estimator


# ----------------------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Boundary:
    """One stable boundary of a request: the prefix that ends there, and who marks it after planning."""

    kind: BoundaryKind
    hash: str            # prefix hash up to and including this boundary (model, scope, canonical bytes)
    tokens: int          # counted tokens of that prefix
    marker: Literal["user", "auto"] | None
    ttl: TTL | None      # TTL of the marker at this boundary, None when unmarked


@dataclass(frozen=True)
class _Spot:
    kind: BoundaryKind
    pos: tuple[int, ...]          # sort position in cache order
    index: tuple[int, ...]        # where the block lives: (tool i) / (system i) / (message i, block j)
    markable: bool


@dataclass(frozen=True)
class _Layout:
    source: dict[str, Any]
    boundaries: tuple[Boundary, ...]          # user markers only; marker/ttl for auto filled by _apply
    spots: tuple[_Spot, ...]
    user_markers: tuple[tuple[tuple[int, ...], str], ...]   # (sort position, ttl)
    user_bound_tokens: int | None             # tokens up to the user's last marker; None: the whole prompt
    min_tokens: int
    max_breakpoints: int


@dataclass(frozen=True)
class Plan:
    """What ``plan`` decided. ``params`` never aliases a changed part of the input: blocks that received a
    marker are new dicts, everything else is shared with the input, so treat both as read-only."""

    params: dict[str, Any]
    prefix_hash: str | None        # the tracked prefix (longest marked boundary at or above the minimum)
    prefix_tokens: int             # its counted tokens (0 when there is none)
    ttl: TTL | None                # the TTL of its marker (the user's or ours)
    added: bool                    # whether plan added any marker
    breakpoints_added: int = 0
    boundaries: tuple[Boundary, ...] = ()
    # counted tokens up to the last marker of any kind: only these can be written or read. None: a marker
    # sits in the last user turn or at the top level, so the whole prompt may be written
    cacheable_tokens: int | None = 0
    max_ttl: TTL | None = None     # the dearest TTL among all markers (prices the budget bound)
    reason: str = ""               # why nothing was added ("off", "below-minimum", "no-prefix", ...)
    # where the cacheable part ends, by section: "none" (no marker at all), "tools", "system", "turns" (the
    # earlier turns), or None (a marker in the last user turn or at the top level, or not looked at: the whole
    # prompt). ``prefix_params`` gives that part as a params-like dict, for a structural token bound
    cacheable_upto: Literal["none", "tools", "system", "turns"] | None = "none"
    _layout: _Layout | None = field(default=None, repr=False, compare=False)

    def with_ttl(self, ttl: TTL) -> "Plan":
        """The same placement with the added markers at ``ttl`` (where the API's TTL order allows it)."""
        if self._layout is None or not self.added:
            return self
        return _apply(self._layout, ttl)


def plan(params: dict[str, Any], model: str, settings: Settings, count_tokens: TokenCounter, *,
         prompt_cache: bool | None = None, ttl: TTL = "5m", scope: str = "") -> Plan:
    """Add ``cache_control`` at the stable boundaries of ``params`` (the messages.create dict, model aside).

    ``count_tokens`` is a ``TokenEstimator`` (called with the model's tokenizer family) or any callable that
    counts the input tokens of a params-like dict (``tools``, ``system``, ``messages``). ``prompt_cache``
    overrides ``settings.prompt_caching`` for this request (None: follow it). ``scope`` goes into the hash
    (e.g. an upstream or API key id: the API keeps caches per organisation). Never mutates ``params``; raises
    ``UnknownModel`` for a model without configuration.
    """
    enabled = settings.prompt_caching == "auto" if prompt_cache is None else bool(prompt_cache)
    if not enabled or not isinstance(params, dict):
        # the user's own markers were not looked at: the budget bound must assume the worst of them
        return Plan(params=params, prefix_hash=None, prefix_tokens=0, ttl=None, added=False,
                    cacheable_tokens=None, max_ttl="1h", reason="off", cacheable_upto=None)
    info = settings.model_info(model)
    layout = _layout(params, model, scope, settings, info.min_cache_tokens, info.tokenizer, count_tokens)
    return _apply(layout, ttl)


def _counter(count_tokens: TokenCounter, tokenizer: str) -> Callable[[dict[str, Any]], int]:
    est = getattr(count_tokens, "estimate", None)
    if callable(est):
        return lambda d: int(est(d, tokenizer))
    return lambda d: int(count_tokens(d))  # type: ignore[operator]


def _canon(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _canon(v) for k, v in obj.items() if k != "cache_control"}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    return obj


def _blocks(content: Any) -> list[Any]:
    # "hi" and [{"type": "text", "text": "hi"}] are the same prompt to the API
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, (list, tuple)):
        return [{"type": "text", "text": b} if isinstance(b, str) else b for b in content]
    return [] if content is None else [content]


def _bytes(obj: Any) -> bytes:
    return json.dumps(_canon(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode("utf-8")


def _ttl_of(cc: Any) -> TTL:
    return "1h" if isinstance(cc, dict) and cc.get("ttl") == "1h" else "5m"


def _last_user(messages: list[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            return i
    return None


def _markable_block(b: Any) -> bool:
    if isinstance(b, str):
        return bool(b)
    if not isinstance(b, dict) or b.get("type") in _UNMARKABLE:
        return False
    return b.get("type") != "text" or bool(b.get("text"))


def _layout(params: dict[str, Any], model: str, scope: str, settings: Settings, min_tokens: int,
            tokenizer: str, count_tokens: TokenCounter) -> _Layout:
    count = _counter(count_tokens, tokenizer)
    tools = params.get("tools")
    tools = list(tools) if isinstance(tools, (list, tuple)) else []
    system = params.get("system")
    sys_blocks = _blocks(system) if system not in (None, "", []) else []
    messages = params.get("messages")
    messages = list(messages) if isinstance(messages, (list, tuple)) else []
    lu = _last_user(messages)
    earlier = messages[:lu] if lu else []

    # -- the user's own markers: how many, where, with which TTL
    user: list[tuple[tuple[int, ...], TTL]] = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and t.get("cache_control"):
            user.append(((0, i), _ttl_of(t["cache_control"])))
    for i, b in enumerate(sys_blocks):
        if isinstance(b, dict) and b.get("cache_control"):
            user.append(((1, i), _ttl_of(b["cache_control"])))
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        for j, b in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(b, dict):
                continue
            earlier_turn = lu is not None and i < lu
            # a tool_result's inner blocks come before the end of the block that holds them
            inner = b.get("content") if b.get("type") == "tool_result" else None
            for k, ib in enumerate(inner if isinstance(inner, list) else ()):
                if isinstance(ib, dict) and ib.get("cache_control"):
                    user.append(((2, i, j, 0, k) if earlier_turn else _TAIL, _ttl_of(ib["cache_control"])))
            if b.get("cache_control"):
                user.append(((2, i, j, 1, 0) if earlier_turn else _TAIL, _ttl_of(b["cache_control"])))
    if params.get("cache_control"):
        user.append((_TAIL, _ttl_of(params["cache_control"])))
    user.sort()

    # -- boundaries, their hashes and token counts
    h = hashlib.blake2b(digest_size=16)
    h.update(b"claude-runtime/prompt-prefix/v1\x00" + model.encode() + b"\x00" + scope.encode())
    h.update(b"\x00tools\x00" + _bytes(tools))
    raw: list[tuple[BoundaryKind, str, dict[str, Any], _Spot]] = []
    if tools:
        spot = _Spot("tools", (0, len(tools) - 1), (len(tools) - 1,), isinstance(tools[-1], dict))
        raw.append(("tools", h.hexdigest(), {"tools": tools}, spot))
    h.update(b"\x00system\x00" + _bytes(sys_blocks))
    if sys_blocks:
        last = sys_blocks[-1]
        ok = isinstance(last, dict) and last.get("type") == "text" and _markable_block(last)
        spot = _Spot("system", (1, len(sys_blocks) - 1), (len(sys_blocks) - 1,), ok)
        raw.append(("system", h.hexdigest(), {"tools": tools, "system": system}, spot))
    if earlier:
        h.update(b"\x00turns\x00" + _bytes([{"role": m.get("role") if isinstance(m, dict) else None,
                                             "content": _blocks(m.get("content") if isinstance(m, dict)
                                                                else None)} for m in earlier]))
        h.update(b"\x00ctx\x00" + _bytes({k: params.get(k) for k in ("tool_choice", "thinking")}))
        i = len(earlier) - 1
        blocks = _blocks(earlier[i].get("content") if isinstance(earlier[i], dict) else None)
        j = len(blocks) - 1
        spot = _Spot("turns", (2, i, j, 1, 0), (i, j), j >= 0 and _markable_block(blocks[j]))
        raw.append(("turns", h.hexdigest(), {"tools": tools, "system": system, "messages": earlier}, spot))

    boundaries: list[Boundary] = []
    for kind, digest, sub, spot in raw:
        sub = {k: v for k, v in sub.items() if v not in (None, [], "")}
        theirs: TTL | None = next((t for p, t in user if p == spot.pos), None)  # type: ignore[misc]
        boundaries.append(Boundary(kind, digest, count(sub), "user" if theirs else None, theirs))

    # tokens up to the user's last marker: a marker inside a section is bounded by that section's boundary
    bound: int | None = 0
    if user:
        last_pos = user[-1][0]
        if last_pos == _TAIL:
            bound = None
        else:
            section = next((b for b in boundaries if _SECTION[b.kind] == last_pos[0]), None)
            bound = section.tokens if section is not None else None
    return _Layout(source=params, boundaries=tuple(boundaries), spots=tuple(s for *_, s in raw),
                   user_markers=tuple(user), user_bound_tokens=bound, min_tokens=min_tokens,
                   max_breakpoints=settings.prompt_cache.max_breakpoints)


def _ttl_fits(pos: tuple[int, ...], ttl: str, markers: list[tuple[tuple[int, ...], str]]) -> bool:
    # the API wants longer-TTL markers before shorter ones, in cache order
    r = _TTL_RANK[ttl]
    return all((_TTL_RANK[t] >= r) if p < pos else (_TTL_RANK[t] <= r) for p, t in markers if p != pos)


def _apply(layout: _Layout, ttl: TTL) -> Plan:
    params = layout.source
    budget = layout.max_breakpoints - len(layout.user_markers)
    bs = list(layout.boundaries)
    candidates = [k for k in range(len(bs)) if bs[k].marker is None and layout.spots[k].markable
                  and bs[k].tokens >= layout.min_tokens]
    long_enough = [b for b in bs if b.tokens >= layout.min_tokens]
    reason = ""
    if not bs:
        reason = "no-prefix"
    elif not long_enough:
        reason = "below-minimum"
    elif not candidates:
        # every long-enough boundary is marked by the user already, or cannot carry a marker (thinking)
        reason = "user-marked" if all(b.marker == "user" for b in long_enough) else "unmarkable"
    elif budget <= 0:
        reason, candidates = "no-breakpoints-left", []
    chosen = sorted(sorted(candidates, key=lambda k: bs[k].tokens, reverse=True)[:max(0, budget)])
    markers = list(layout.user_markers)
    given: dict[int, TTL] = {}
    other: TTL = "5m" if ttl == "1h" else "1h"
    for k in chosen:  # in cache order, so each one is checked against the ones already given
        pos = layout.spots[k].pos
        for t in (ttl, other):
            if _ttl_fits(pos, t, markers):
                given[k] = t
                markers.append((pos, t))
                markers.sort()
                break
    if chosen and not given:
        reason = "ttl-order"
    for k, t in given.items():
        bs[k] = replace(bs[k], marker="auto", ttl=t)
    new_params = _mark(params, [(layout.spots[k], given[k]) for k in sorted(given)]) if given else params

    tracked = next((b for b in reversed(bs) if b.marker and b.tokens >= layout.min_tokens), None)
    auto_bound = max((bs[k].tokens for k in given), default=0)
    cacheable = None if layout.user_bound_tokens is None else max(layout.user_bound_tokens, auto_bound)
    max_ttl: TTL | None = None
    if markers:
        max_ttl = "1h" if any(t == "1h" for _, t in markers) else "5m"
    # the section of the last marker (user markers sort by section first; _TAIL sorts after every section)
    last = max([pos[0] for pos, _ in markers], default=-1)
    upto = None if last >= _TAIL[0] else ("none", "tools", "system", "turns")[last + 1]
    return Plan(params=new_params, prefix_hash=tracked.hash if tracked else None,
                prefix_tokens=tracked.tokens if tracked else 0, ttl=tracked.ttl if tracked else None,
                added=bool(given), breakpoints_added=len(given), boundaries=tuple(bs),
                cacheable_tokens=cacheable, max_ttl=max_ttl, reason=reason, cacheable_upto=upto,
                _layout=layout)


def prefix_params(params: dict[str, Any], upto: str | None) -> dict[str, Any] | None:
    """The part of ``params`` a prompt-cache write or read can cover, as a params-like dict (``tools``,
    ``system``, ``messages``), for ``Plan.cacheable_upto``: ``{}`` for "none", None for the whole prompt."""
    if upto is None:
        return None
    if upto == "none":
        return {}
    out: dict[str, Any] = {}
    if params.get("tools"):
        out["tools"] = params["tools"]
    if upto in ("system", "turns") and params.get("system") not in (None, "", []):
        out["system"] = params["system"]
    if upto == "turns":
        messages = params.get("messages")
        messages = list(messages) if isinstance(messages, (list, tuple)) else []
        lu = _last_user(messages)
        if lu:
            out["messages"] = messages[:lu]
    return out


def _cc(ttl: TTL) -> dict[str, str]:
    return {"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}


def _marked_block(b: Any, ttl: TTL) -> dict[str, Any]:
    base = {"type": "text", "text": b} if isinstance(b, str) else dict(b)
    base["cache_control"] = _cc(ttl)
    return base


def _mark(params: dict[str, Any], spots: list[tuple[_Spot, TTL]]) -> dict[str, Any]:
    """A copy of ``params`` with markers at the given spots; only the containers on the way are copied."""
    out = dict(params)
    for spot, ttl in spots:
        if spot.kind == "tools":
            tools = list(out["tools"])
            tools[spot.index[0]] = _marked_block(tools[spot.index[0]], ttl)
            out["tools"] = tools
        elif spot.kind == "system":
            blocks = _blocks(out["system"]) if isinstance(out["system"], str) else list(out["system"])
            blocks[spot.index[0]] = _marked_block(blocks[spot.index[0]], ttl)
            out["system"] = blocks
        else:
            i, j = spot.index
            messages = list(out["messages"])
            # every earlier turn in block form, not only the marked one: next turn this message is unmarked
            # and must still spell the same prefix for a server that tells "x" from [{"type": "text", ...}]
            for k in range(i):
                if isinstance(messages[k], dict) and isinstance(messages[k].get("content"), str):
                    messages[k] = {**messages[k], "content": _blocks(messages[k]["content"])}
            msg = dict(messages[i])
            content = msg.get("content")
            blocks = _blocks(content) if isinstance(content, str) else list(content)
            blocks[j] = _marked_block(blocks[j], ttl)
            msg["content"] = blocks
            messages[i] = msg
            out["messages"] = messages
    return out


# ---------------------------------------------------------------------------------------------- TTL rule
def _rates(model: str, prompt_tokens: int, settings: Settings) -> PriceTier:
    return tier_for(settings.model_info(model), max(0, int(prompt_tokens)))


def choose_ttl(gaps: Sequence[float], prompt_tokens: int, model: str, settings: Settings) -> TTL:
    """5 m or 1 h for the next write of a prefix, from the gaps (seconds) observed between its uses.

    A use after a gap g finds a TTL-T entry warm iff g <= T (every read refreshes, every write restarts the
    clock). Gaps within 5 minutes cost a read under either TTL, so only the longer ones decide: under 5 m each
    costs a new write (1.25x input); under 1 h it costs a read (0.1x) if g <= 1 h and a 1 h write (2x) if
    not. Add the next write itself (1.25x or 2x) and pick 1 h when it is expected to cost at most
    ``ttl_1h_cost_ratio`` of 5 m, and at least ``ttl_1h_min_long_gaps`` gaps lay between 5 minutes and 1 h.
    Rates come from the model's price tier for ``prompt_tokens`` (they scale with the prefix, so its size
    drops out).
    """
    cfg = settings.prompt_cache
    if not cfg.ttl_1h:
        return "5m"
    short, long_ = TTL_SECONDS["5m"], TTL_SECONDS["1h"]
    long_gaps = [g for g in gaps if g > short]
    if sum(1 for g in long_gaps if g <= long_) < cfg.ttl_1h_min_long_gaps:
        return "5m"
    tier = _rates(model, prompt_tokens, settings)
    w5, w1, rd = tier.cache_write_5m, tier.cache_write_1h, tier.cache_read
    assert w5 is not None and w1 is not None and rd is not None  # filled by PriceTier validation
    cost_5m = w5 * (1 + len(long_gaps))
    cost_1h = w1 + sum(rd if g <= long_ else w1 for g in long_gaps)
    return "1h" if cost_1h <= cfg.ttl_1h_cost_ratio * cost_5m else "5m"


# ------------------------------------------------------------------------------------------ prefix tracker
Kind = Literal["lead", "wait", "warm", "pass"]


@dataclass(frozen=True)
class Decision:
    """What a request with a tracked prefix should do.

    * ``lead``: nobody is writing this prefix: send now, you are expected to write it. Report the outcome
      with ``finish(..., token=token)``, or ``abandon`` if no API response comes.
    * ``wait``: another request is writing it right now. Wait until ``until`` at the latest (the host may
      wake you earlier: ``finish``/``abandon`` return True when a write ends), re-asking every ``poll_s``
      if nothing wakes you, and call ``begin`` again with the same ``waiting_since``.
    * ``warm``: written within its TTL: send now, expect a read.
    * ``pass``: send now, expect no read and do not wait (``reason``: "uncacheable" when the API ignored
      this prefix's marker lately, "wait-exhausted" when the wait ran out while a write is still in flight).
    """

    kind: Kind
    ttl: TTL                         # the TTL to send: the entry's when warm, the TTL rule's pick otherwise
    until: float | None = None
    poll_s: float | None = None
    token: int | None = None
    reason: str = ""


@dataclass
class PrefixState:
    """Everything the tracker knows about one (prefix, model): plain data, so it pickles and copies."""

    warm_until: float = 0.0          # the API's entry is believed fresh until then
    ttl: TTL = "5m"                  # TTL of the entry (or of the write in flight)
    writer: int | None = None        # token of the request writing it now
    lease_until: float = 0.0         # the writer's claim lapses then
    uncacheable_until: float = 0.0
    last_used: float | None = None   # last response that read or wrote it
    gaps: list[float] = field(default_factory=list)   # recent gaps between uses longer than 5 minutes
    last_seen: float = 0.0           # last begin/finish, for forgetting


def outcome(usage: Usage | Any) -> tuple[bool, bool]:
    """(wrote, read) from a response's usage (a ``Usage``, an SDK usage object or its dict)."""
    u = usage if isinstance(usage, Usage) else Usage.from_api(usage)
    return u.cache_write_tokens > 0, u.cache_read_tokens > 0


class PrefixTracker:
    """Warm prefixes and single-flight writes, keyed by (prefix hash, model). A pure state machine: every
    method takes ``now`` (any monotonic clock, the same one throughout); nothing blocks, nothing sleeps.

    Host it wherever one instance sees all requests that should share writes (the limiter or cache actor,
    or one per caller for per-process sharing); it pickles with its state. The host wakes waiters when
    ``finish`` or ``abandon`` returns True, or lets them poll.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cfg = settings.prompt_cache
        self._entries: dict[tuple[str, str], PrefixState] = {}   # least recently touched first
        self._next_token = 1
        # decisions by kind (a waiter's re-asks count each time), responses seen, writes freed unanswered
        self.stats = {"lead": 0, "wait": 0, "warm": 0, "pass": 0, "finished": 0, "wrote": 0, "read": 0,
                      "abandoned": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, prefix: str, model: str) -> PrefixState | None:
        st = self._entries.get((prefix, model))
        return None if st is None else replace(st, gaps=list(st.gaps))

    def is_warm(self, prefix: str, model: str, now: float) -> bool:
        st = self._entries.get((prefix, model))
        return st is not None and st.warm_until - self._cfg.warm_margin_s > now

    def _touch(self, key: tuple[str, str], now: float) -> PrefixState:
        st = self._entries.pop(key, None)
        if st is None:
            st = PrefixState()
        st.last_seen = now
        self._entries[key] = st
        if len(self._entries) > self._cfg.max_prefixes:
            self.prune(now)
            while len(self._entries) > self._cfg.max_prefixes:
                del self._entries[next(iter(self._entries))]
        return st

    def begin(self, prefix: str, model: str, now: float, *, prefix_tokens: int = 0,
              deadline: float | None = None, waiting_since: float | None = None) -> Decision:
        """Decide for one request. ``deadline``: the latest time this request may still wait (its own
        deadline); ``waiting_since``: when it first asked (a re-ask after WAIT passes the first answer's
        time, so ``write_wait_s`` bounds the whole wait, not each re-ask). ``prefix_tokens`` picks the price
        tier for the TTL rule."""
        d = self._begin(prefix, model, now, prefix_tokens, deadline, waiting_since)
        self.stats[d.kind] += 1
        return d

    def _begin(self, prefix: str, model: str, now: float, prefix_tokens: int, deadline: float | None,
               waiting_since: float | None) -> Decision:
        cfg = self._cfg
        self.prune(now)
        st = self._touch((prefix, model), now)
        if st.warm_until - cfg.warm_margin_s > now:
            return Decision("warm", st.ttl)
        if st.uncacheable_until > now:
            return Decision("pass", self._ttl(st, prefix_tokens, model), reason="uncacheable")
        if st.writer is not None and st.lease_until > now:
            start = now if waiting_since is None else waiting_since
            until = min(st.lease_until, start + cfg.write_wait_s)
            if deadline is not None:
                until = min(until, deadline)
            if until <= now:
                return Decision("pass", st.ttl, reason="wait-exhausted")
            return Decision("wait", st.ttl, until=until, poll_s=cfg.wait_poll_s)
        token = self._next_token
        self._next_token += 1
        st.writer, st.lease_until = token, now + cfg.write_lease_s
        st.ttl = self._ttl(st, prefix_tokens, model)
        return Decision("lead", st.ttl, token=token)

    def _ttl(self, st: PrefixState, prefix_tokens: int, model: str) -> TTL:
        return choose_ttl(st.gaps, prefix_tokens, model, self._settings)

    def finish(self, prefix: str, model: str, wrote: bool, read: bool, now: float, *, ttl: TTL | None = None,
               token: int | None = None) -> bool:
        """Record an API response for a request that sent this prefix marked (any decision). ``ttl``: the
        TTL its marker carried. Returns True when a write in flight ended (wake the waiters).

        Read or written: warm for the entry's TTL from now (now is after the API refreshed it, which
        ``warm_margin_s`` allows for). Neither: the API ignored the marker (the prefix is below the model's
        real minimum), so the prefix is "uncacheable" for ``uncacheable_s``: requests then pass instead of
        leading and waiting. Either way the write in flight, if any, is over: whoever held it, the prefix's
        state is now known.
        """
        st = self._touch((prefix, model), now)
        released = st.writer is not None
        st.writer, st.lease_until = None, 0.0
        self.stats["finished"] += 1
        self.stats["wrote"] += bool(wrote)
        self.stats["read"] += bool(read)
        if wrote or read:
            if wrote and ttl is not None:
                st.ttl = ttl
            st.warm_until = max(st.warm_until, now + TTL_SECONDS[st.ttl])
            st.uncacheable_until = 0.0
            if st.last_used is not None and now - st.last_used > TTL_SECONDS["5m"]:
                st.gaps.append(now - st.last_used)
                del st.gaps[:-self._cfg.ttl_history]
            st.last_used = now
        else:
            st.warm_until = 0.0
            st.uncacheable_until = now + self._cfg.uncacheable_s
        return released

    def abandon(self, prefix: str, model: str, token: int | None, now: float) -> bool:
        """The request holding ``token`` got no API response (error, cancelled, served from the response
        cache): free the prefix at once so the next request leads. Returns True when a write was freed."""
        st = self._entries.get((prefix, model))
        if st is None or token is None or st.writer != token:
            return False
        st = self._touch((prefix, model), now)
        st.writer, st.lease_until = None, 0.0
        self.stats["abandoned"] += 1
        return True

    def prune(self, now: float) -> int:
        """Forget prefixes idle for ``forget_after_s`` (oldest first; stops at the first recent one)."""
        horizon = now - self._cfg.forget_after_s
        dropped = 0
        while self._entries:
            key = next(iter(self._entries))
            if self._entries[key].last_seen > horizon:
                break
            del self._entries[key]
            dropped += 1
        return dropped


# ------------------------------------------------------------------------- admission and reservation numbers
def admission_input_tokens(est_input_tokens: int, warm_prefix_tokens: int = 0) -> int:
    """Input tokens to reserve against ITPM: the prompt minus the prefix believed warm.

    Cache reads do not count toward ITPM on current models; uncached input and cache writes do, so a cold
    prefix (the write) is reserved in full. This is the expected charge, not a bound: if a prefix believed
    warm turns out cold, the call spends more ITPM than reserved and the limiter's reconcile corrects it.
    """
    return max(0, int(est_input_tokens) - max(0, int(warm_prefix_tokens)))


def _max_tier(model: str, prompt_tokens: int, settings: Settings) -> PriceTier:
    """Each rate at its highest over every tier a prompt of up to ``prompt_tokens`` can land in (tiers need
    not be priced in increasing order for this to bound)."""
    info = settings.model_info(model)
    reach = tier_for(info, prompt_tokens)
    tiers = info.prices[: info.prices.index(reach) + 1]

    def top(name: str) -> float:
        return max(float(getattr(t, name)) for t in tiers)

    return PriceTier(input=top("input"), output=top("output"), cache_write_5m=top("cache_write_5m"),
                     cache_write_1h=top("cache_write_1h"), cache_read=top("cache_read"))


def budget_bound(model: str, est_input_tokens: int, max_tokens: int, settings: Settings, *,
                 cacheable_tokens: int | None, ttl: TTL | None = "5m", batch: bool = False) -> float:
    """A true upper bound, in dollars, of one call's cost whatever the prompt cache does: the budget
    reservation.

    Only tokens up to the last marker can be written or read (``cacheable_tokens``; None: all of them), and
    each of those costs at most the dearest of input, the write at the markers' dearest TTL (``ttl``; None:
    no marker) and read; every other token is uncached input. Holds for any outcome (cold, warm, partly
    warm, a prefix believed warm that turned out cold) provided the real prompt is at most
    ``estimate_headroom`` times ``est_input_tokens`` and its cacheable part at most that times
    ``cacheable_tokens``, and output at most ``max_tokens``. Rates are the highest of every price tier such
    a prompt can reach. For models whose tiers rise with size it is never above ``pricing.max_cost`` (equal
    with ``cacheable_tokens=None`` and ``ttl="1h"``), and well below it with 5 m markers on a prefix.
    """
    h = settings.prompt_cache.estimate_headroom
    # real token counts are whole, so "at most h x the estimate" is at most its floor (the epsilon keeps a
    # product like 1000 x 1.3 from flooring one token short)
    n_max = math.floor(max(0, int(est_input_tokens)) * h + 1e-6)
    cacheable = n_max if cacheable_tokens is None else min(
        n_max, math.floor(max(0, int(cacheable_tokens)) * h + 1e-6))
    tier = _max_tier(model, n_max, settings)
    if ttl is None:
        cached_rate = tier.input
    else:
        write = tier.cache_write_1h if ttl == "1h" else tier.cache_write_5m
        cached_rate = max(tier.input, float(write), float(tier.cache_read))  # type: ignore[arg-type]
    factor = token_factor(batch)
    return (n_max * tier.input + cacheable * (cached_rate - tier.input)
            + max(0, int(max_tokens)) * tier.output) * factor


def expected_cost(model: str, est_input_tokens: int, max_tokens: int, settings: Settings, *,
                  prefix_tokens: int, warm: bool, ttl: TTL = "5m", batch: bool = False) -> float:
    """What the call most likely costs, output at ``max_tokens``: the prefix at the read price when warm,
    at the write price of ``ttl`` when cold, the rest at the input price. NOT a bound (a prefix believed
    warm may be cold): use it for forecasts and reports, and ``budget_bound`` for reservations."""
    est = max(0, int(est_input_tokens))
    prefix = min(est, max(0, int(prefix_tokens)))
    tier = _rates(model, est, settings)
    cached = tier.cache_read if warm else (tier.cache_write_1h if ttl == "1h" else tier.cache_write_5m)
    factor = token_factor(batch)
    return ((est - prefix) * tier.input + prefix * float(cached)  # type: ignore[arg-type]
            + max(0, int(max_tokens)) * tier.output) * factor


@dataclass(frozen=True)
class Reservation:
    """The three numbers one request needs before its call (see the functions that make each)."""

    itpm_tokens: int      # limiter: expected ITPM charge (admission_input_tokens)
    expected_usd: float   # forecast: read price if warm, write price if cold (expected_cost)
    bound_usd: float      # budget: true upper bound for any cache outcome (budget_bound)


def reservation(p: Plan, decision: Decision | None, est_input_tokens: int, max_tokens: int, model: str,
                settings: Settings, *, batch: bool = False) -> Reservation:
    """The numbers for a planned request: warm iff the tracker said WARM for its tracked prefix."""
    warm = decision is not None and decision.kind == "warm" and p.prefix_hash is not None
    return Reservation(
        itpm_tokens=admission_input_tokens(est_input_tokens, p.prefix_tokens if warm else 0),
        expected_usd=expected_cost(model, est_input_tokens, max_tokens, settings, prefix_tokens=p.prefix_tokens,
                                   warm=warm, ttl=p.ttl or "5m", batch=batch),
        bound_usd=budget_bound(model, est_input_tokens, max_tokens, settings,
                               cacheable_tokens=p.cacheable_tokens, ttl=p.max_ttl, batch=batch),
    )


# ------------------------------------------------------------------------------------------------ savings
def savings(usage: Usage | Any, model: str, settings: Settings, *, batch: bool = False) -> float:
    """Dollars prompt caching saved on this response against sending the same tokens uncached: cache reads
    and writes priced as plain input, minus what they cost. Negative when a write was not repaid by reads
    (a 5 m write costs 0.25x input more than plain input). Same tier and batch rules as ``pricing.price``."""
    u = usage if isinstance(usage, Usage) else Usage.from_api(usage)
    tier = tier_for(settings.model_info(model), u.prompt_tokens)
    plain = (u.cache_write_5m_tokens + u.cache_write_1h_tokens + u.cache_read_tokens) * tier.input
    paid = (u.cache_write_5m_tokens * float(tier.cache_write_5m)  # type: ignore[arg-type]
            + u.cache_write_1h_tokens * float(tier.cache_write_1h)  # type: ignore[arg-type]
            + u.cache_read_tokens * float(tier.cache_read))  # type: ignore[arg-type]
    return (plain - paid) * token_factor(batch)


def savings_summary(rows: Iterable[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Prompt-cache reads and writes, and the dollars they saved against uncached input, over ledger rows
    (``Record.to_row`` dicts; only billed rows, those with a message id, count). Totals and ``by_model``:

    ``calls`` billed calls, ``reads`` / ``writes`` calls that read / wrote the cache, ``read_tokens``,
    ``write_tokens`` (5 m + 1 h), ``read_usd`` / ``write_usd`` what they cost, ``as_input_usd`` what the same
    tokens would have cost as plain input, ``saved_usd`` the difference (negative: writes not yet repaid).
    A model no longer in the configuration is counted in tokens but not priced (``unpriced_calls``). A row's
    ``upstream`` applies that upstream's ``price_factor``, as its bill did.
    """
    factors = {u.name: u.price_factor for u in settings.upstreams}
    def empty() -> dict[str, Any]:
        return {"calls": 0, "reads": 0, "writes": 0, "read_tokens": 0, "write_tokens": 0, "read_usd": 0.0,
                "write_usd": 0.0, "as_input_usd": 0.0, "saved_usd": 0.0, "unpriced_calls": 0}

    total = empty()
    by_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r.get("message_id"):
            continue
        model = r.get("model") or "-"
        u = Usage(input_tokens=int(r.get("input_tokens") or 0), output_tokens=int(r.get("output_tokens") or 0),
                  cache_write_5m_tokens=int(r.get("cache_write_5m_tokens") or 0),
                  cache_write_1h_tokens=int(r.get("cache_write_1h_tokens") or 0),
                  cache_read_tokens=int(r.get("cache_read_tokens") or 0))
        add = {"calls": 1, "reads": int(u.cache_read_tokens > 0), "writes": int(u.cache_write_tokens > 0),
               "read_tokens": u.cache_read_tokens, "write_tokens": u.cache_write_tokens}
        if u.cache_read_tokens or u.cache_write_tokens:
            try:
                tier = tier_for(settings.model_info(model), u.prompt_tokens)
            except Exception:  # noqa: BLE001 - UnknownModel: a model since removed from the configuration
                add["unpriced_calls"] = 1
            else:
                f = token_factor(bool(r.get("batch"))) * factors.get(r.get("upstream") or "", 1.0)
                read = u.cache_read_tokens * float(tier.cache_read) * f  # type: ignore[arg-type]
                write = (u.cache_write_5m_tokens * float(tier.cache_write_5m)  # type: ignore[arg-type]
                         + u.cache_write_1h_tokens * float(tier.cache_write_1h)) * f  # type: ignore[arg-type]
                plain = (u.cache_read_tokens + u.cache_write_tokens) * tier.input * f
                add.update(read_usd=read, write_usd=write, as_input_usd=plain, saved_usd=plain - read - write)
        for acc in (total, by_model.setdefault(model, empty())):
            for k, v in add.items():
                acc[k] += v
    total["by_model"] = by_model
    return total
