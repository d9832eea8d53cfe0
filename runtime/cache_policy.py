"""What the response cache may serve, for how long, and to whom.

Pure rules, no I/O: the cache actor stores rows, the caller-side ``CacheClient`` (actors/cache.py) asks these
functions every question that decides correctness.

Serving a cached answer to a question that is not the same question is the worst thing the cache can do, so
every rule here leans towards a miss:

* ``Scope`` is a hard partition. Two requests may share a semantic answer only if tenant, system prompt +
  tools, model, every turn except the last user turn, and every answer-changing parameter are identical. The
  cache actor filters on ``scope_id`` before the vector search, so a neighbour from another scope is never
  even a candidate.
* ``exact_key`` hashes everything that can change the answer, with whitespace and content-shape normalised so
  trivially different spellings of the same request share a key.
* ``bypass_reason`` keeps real-time questions, turns the cache cannot judge (images, tool traffic) and
  opted-out requests away from the cache entirely.
* ``guard`` vetoes a semantic neighbour that clears the similarity threshold but differs in something an
  embedding is known to blur, by category (runtime.cache_guard): negation, quoted strings, how much, who,
  when, where, which way, modality, the object or tool, names. runtime.cache_verifier then judges what the
  guard lets through.

``max_tokens`` is deliberately in no key: the model never sees it (it only truncates), and only complete
``end_turn`` answers are stored, so a stored answer is a valid answer for any request whose ``max_tokens`` it
fits in. ``answer_fits`` checks that instead of splitting the cache by a bucketed ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from runtime import cache_guard

Kind = Literal["factual", "code", "analysis"]

# request fields that never change the answer's content; everything else is answer-changing by default, so an
# unknown future parameter splits the cache instead of silently merging different answers
_IGNORED_PARAMS = frozenset({"metadata", "stream", "max_tokens", "model", "service_tier", "timeout",
                             "extra_headers", "extra_query", "extra_body", "betas"})
# parameters hashed into their own Scope field
_SCOPE_FIELDS = frozenset({"messages", "system", "tools"})

def _norm_ws(text: str) -> str:
    # only the ends and line endings: inner whitespace can be meaning (indentation decides what a loop holds)
    return text.replace("\r\n", "\n").strip()


def _sha(obj: Any, n: int = 64) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def _canon_block(block: Any) -> Any:
    """One content block with prompt-caching markers dropped and text whitespace normalised."""
    if isinstance(block, str):
        return {"type": "text", "text": _norm_ws(block)}
    if not isinstance(block, dict):
        return block
    out = {k: _canon_value(v) for k, v in block.items() if k not in ("cache_control", "citations")}
    if out.get("type") == "text" and isinstance(out.get("text"), str):
        out["text"] = _norm_ws(out["text"])
    return out


def _canon_value(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _canon_value(x) for k, x in v.items() if k != "cache_control"}
    if isinstance(v, (list, tuple)):
        return [_canon_value(x) for x in v]
    return v


def _canon_content(content: Any) -> list[Any]:
    # "hi" and [{"type": "text", "text": "hi"}] are the same prompt to the API
    if isinstance(content, str):
        return [_canon_block(content)]
    if isinstance(content, (list, tuple)):
        return [_canon_block(b) for b in content]
    return [content]


def _canon_message(msg: Any) -> Any:
    if not isinstance(msg, dict):
        return msg
    return {"role": msg.get("role"), "content": _canon_content(msg.get("content", ""))}


def _canon_system(system: Any) -> Any:
    if system is None:
        return None
    blocks = _canon_content(system)
    if all(isinstance(b, dict) and b.get("type") == "text" for b in blocks):
        return _norm_ws(" ".join(b.get("text", "") for b in blocks))
    return blocks


def _last_user_index(messages: list[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            return i
    return None


def _block_text(block: Any) -> str | None:
    if isinstance(block, str):
        return block
    if isinstance(block, dict) and block.get("type") == "text":
        return str(block.get("text", ""))
    return None


@dataclass(frozen=True)
class Scope:
    """The hard partition a semantic hit must stay inside."""

    tenant: str
    system_hash: str
    model: str
    context_hash: str
    params_hash: str

    def scope_id(self) -> str:
        # 32 hex chars: collision-safe for any realistic number of scopes, short enough to index cheaply
        return _sha([self.tenant, self.system_hash, self.model, self.context_hash, self.params_hash], 32)


def scope_for(params: dict, model: str, tenant: str | None) -> Scope:
    messages = list(params.get("messages") or [])
    last = _last_user_index(messages)
    # everything except the last user turn's text, including an assistant prefill after it: the prefill
    # steers the answer as much as the history does
    context = [_canon_message(m) for i, m in enumerate(messages) if i != last]
    if last is not None:
        context.insert(last, {"role": "user", "content": "<last-user-turn>"})
    system = {"system": _canon_system(params.get("system")), "tools": _canon_value(params.get("tools"))}
    rest = {k: _canon_value(v) for k, v in params.items() if k not in _IGNORED_PARAMS | _SCOPE_FIELDS}
    return Scope(
        tenant=tenant or "",
        system_hash=_sha(system, 32),
        model=model,
        context_hash=_sha(context, 32),
        params_hash=_sha(rest, 32),
    )


def exact_key(params: dict, model: str, tenant: str | None) -> str:
    canon = {
        "v": 1,
        "tenant": tenant or "",
        "model": model,
        "system": _canon_system(params.get("system")),
        "messages": [_canon_message(m) for m in params.get("messages") or []],
        "rest": {k: _canon_value(v) for k, v in params.items()
                 if k not in _IGNORED_PARAMS and k not in ("system", "messages")},
    }
    return _sha(canon)


def last_user_text(params: dict) -> str:
    """Text of the last user turn (text blocks joined by newlines); '' when there is none."""
    messages = list(params.get("messages") or [])
    last = _last_user_index(messages)
    if last is None:
        return ""
    content = messages[last].get("content", "")
    if isinstance(content, str):
        return content.strip()
    parts = [t for t in (_block_text(b) for b in content or []) if t is not None]
    return "\n".join(parts).strip()


# -- classification and TTL ---------------------------------------------------------------------------------

# code answers age slowest (24 h), analysis in between, plain facts fastest: facts are what changes in the
# world. The rules read top-down: a code signal wins over an analysis signal ("compare these two functions").
_CODE_RE = re.compile(
    r"```|\b(def|class|import|return|lambda|const|let|var|async|await|struct|fn|func|SELECT|INSERT)\b"
    r"|\b(code|function|method|script|snippet|program|compile[rsd]?|compiling|debug|bug|stack ?trace|exception"
    r"|regex|regexp|sql|query|api|library|package|module|python|javascript|typescript|java|golang|rust|c\+\+|c#"
    r"|ruby|php|swift|kotlin|bash|shell|pandas|numpy|react|django|flask|docker|kubernetes|git|json|yaml|html"
    r"|css|unit test|refactor|implement|syntax|variable|array|dict(ionary)?|list comprehension)\b"
    r"|[a-z_]+\(\)|\w+\.\w+\(",
    re.IGNORECASE,
)
_ANALYSIS_RE = re.compile(
    r"\b(analy[sz]e|analysis|compare|comparison|contrast|evaluate|evaluation|assess|critique|review|pros and cons"
    r"|trade-?offs?|advantages|disadvantages|implications?|strategy|strategies|recommend(ation)?s?|should (i|we)"
    r"|why (do|does|did|is|are|would|might)|explain why|argue|argument|opinion|essay|in depth|impact of"
    r"|what are the (risks|benefits))\b",
    re.IGNORECASE,
)


def classify(text: str) -> Kind:
    """'code' if the text reads as a programming question, else 'analysis' if it asks for judgement or
    comparison, else 'factual'. Readable keyword rules: see _CODE_RE and _ANALYSIS_RE."""
    if _CODE_RE.search(text or ""):
        return "code"
    if _ANALYSIS_RE.search(text or ""):
        return "analysis"
    return "factual"


def ttl_for(kind: str, cache_settings: Any) -> float:
    return {
        "factual": cache_settings.ttl_factual_s,
        "code": cache_settings.ttl_code_s,
        "analysis": cache_settings.ttl_analysis_s,
    }.get(kind, cache_settings.ttl_factual_s)  # unknown kind: the shortest-lived class


# -- bypass ---------------------------------------------------------------------------------------------------

_JUDGEABLE_BLOCKS = frozenset({"text"})


def _bypass_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    alts = sorted((re.escape(w.strip()).replace(r"\ ", r"\s+") for w in words if w.strip()), key=len,
                  reverse=True)
    return re.compile(r"\b(" + "|".join(alts) + r")\b", re.IGNORECASE) if alts else re.compile(r"(?!x)x")


_PATTERNS: dict[tuple[str, ...], re.Pattern[str]] = {}


def bypass_reason(params: dict, cache_settings: Any, cache_enabled: bool = True) -> str | None:
    """Why this request must not touch the cache (neither read nor write); None when it may."""
    if not cache_enabled:
        return "cache disabled for this request"
    if not getattr(cache_settings, "enabled", True):
        return "cache disabled in settings"
    messages = params.get("messages") or []
    if not messages:
        return "no messages"
    for m in messages:
        content = m.get("content", "") if isinstance(m, dict) else None
        if isinstance(content, str):
            continue
        for block in content or []:
            btype = block.get("type") if isinstance(block, dict) else None
            if btype not in _JUDGEABLE_BLOCKS:
                # images, documents, tool calls and tool results: the text alone cannot say two requests match
                return f"non-text content ({btype or type(block).__name__})"
    text = last_user_text(params)
    if not text:
        return "no user text"
    words = tuple(getattr(cache_settings, "bypass_words", ()) or ())
    pat = _PATTERNS.get(words)
    if pat is None:
        pat = _PATTERNS.setdefault(words, _bypass_pattern(words))
    hit = pat.search(text)
    if hit:
        return f"real-time word {hit.group(0).lower()!r}"
    return None


def is_storable(message: Any) -> bool:
    """Only complete, successful, text answers are worth serving again."""
    if not isinstance(message, dict) or message.get("stop_reason") != "end_turn":
        return False
    if message.get("type", "message") != "message" or message.get("role", "assistant") != "assistant":
        return False
    content = message.get("content") or []
    if not isinstance(content, list) or not content:
        return False
    has_text = False
    for block in content:
        if not isinstance(block, dict):
            return False
        btype = block.get("type")
        if btype == "text":
            has_text = has_text or bool(str(block.get("text", "")).strip())
        elif btype not in ("thinking", "redacted_thinking"):
            return False  # tool_use, server tool results, anything unknown
    return has_text


def answer_fits(message: Any, max_tokens: Any) -> bool:
    """A stored answer longer than this request's max_tokens would be one the API could never have given."""
    if not isinstance(max_tokens, int) or not isinstance(message, dict):
        return True
    usage = message.get("usage") or {}
    out = usage.get("output_tokens") if isinstance(usage, dict) else None
    return not isinstance(out, int) or out <= max_tokens


# -- the guard ------------------------------------------------------------------------------------------------

def guard(query: str, candidate: str) -> str | None:
    """A reason to reject ``candidate`` (a cached prompt) as an answer source for ``query`` even though their
    embeddings are close ("who: age groups differ (child vs adult)"); None to accept. The rules and their
    vocabulary live in runtime.cache_guard, by category."""
    return cache_guard.guard(query, candidate)


def prepare_judging(prompt: str) -> None:
    """Do now the part of judging candidates that depends on the prompt alone (``guard``'s analysis of it)."""
    cache_guard.prepare(prompt)


# all-MiniLM-L6-v2 reads 256 word pieces and drops the rest; ~3 characters a piece keeps well inside that
SEMANTIC_MAX_CHARS = 700


def semantic_eligible(prompt: str) -> bool:
    """Whether a prompt is short enough for its embedding to stand for all of it."""
    return len(prompt) <= SEMANTIC_MAX_CHARS
