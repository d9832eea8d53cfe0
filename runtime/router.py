"""Model routing: ``model="auto"`` picks Haiku, Sonnet or Opus by how hard the task looks.

The rules are the seed's, made configurable (``Settings.router``) and readable:

- Opus when the prompt is long (``complex_min_chars``), asks for a long answer (``complex_min_max_tokens``), or
  carries two or more "complex" keywords (analyze, design, prove, refactor, ...).
- Haiku when the prompt is short (``simple_max_chars``) and either carries a "simple" keyword (classify, extract,
  translate, ...) or asks for a short answer (<= 512 tokens) with no complex keyword.
- Sonnet otherwise.

An explicit model id is honoured as given. Budget pressure may later move non-critical traffic to Haiku; that is
the ledger's decision, not the router's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from runtime.request import AUTO, prompt_text
from runtime.settings import RouterSettings, Settings


@dataclass(frozen=True)
class Route:
    model: str
    model_class: str
    reason: str


@lru_cache(maxsize=64)
def _keyword_re(words: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def complexity_class(text: str, max_tokens: int, rs: RouterSettings) -> tuple[str, str]:
    n_complex = len(_keyword_re(rs.complex_keywords).findall(text)) if rs.complex_keywords else 0
    if len(text) >= rs.complex_min_chars:
        return "opus", f"long prompt ({len(text)} chars)"
    if max_tokens >= rs.complex_min_max_tokens:
        return "opus", f"long answer requested ({max_tokens} tokens)"
    if n_complex >= 2:
        return "opus", f"{n_complex} complex keywords"
    if len(text) <= rs.simple_max_chars:
        simple = bool(rs.simple_keywords) and _keyword_re(rs.simple_keywords).search(text) is not None
        if simple:
            return "haiku", "short prompt with a simple-task keyword"
        if max_tokens <= 512 and n_complex == 0:
            return "haiku", "short prompt, short answer"
    return "sonnet", "default"


def route(requested_model: str, params: dict, settings: Settings) -> Route:
    if requested_model != AUTO:
        return Route(requested_model, settings.model_info(requested_model).model_class, "requested")
    cls, reason = complexity_class(prompt_text(params), int(params.get("max_tokens", 0)), settings.router)
    model = settings.class_model(cls)
    return Route(model, settings.models[model].model_class, reason)
