"""Validation and normalisation of one request, before anything else sees it.

A request that the API would reject gets ``InvalidRequest`` here, before any limiter reservation, ledger entry or
network call: the user learns at once, and nothing is spent on it.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import InvalidRequest
from runtime.settings import PRIORITIES, Settings

AUTO = "auto"

# the 2026-10-21 API version removed sampling knobs: the API answers 400, so do we, without a round trip
REMOVED_PARAMS = frozenset({"temperature", "top_p", "top_k"})
ALLOWED_PARAMS = frozenset({
    "model", "max_tokens", "messages", "system", "metadata", "stop_sequences", "tools", "tool_choice",
    "thinking", "service_tier", "output_config", "mcp_servers", "container", "context_management",
    "inference_geo",
})
ROLES = frozenset({"user", "assistant"})


@dataclass
class NormalizedRequest:
    """What travels from ``rt.submit`` to a caller actor. ``params`` is the messages.create dict without model."""

    request_id: str
    requested_model: str          # "auto" or a model id from the registry
    params: dict[str, Any]
    max_tokens: int
    user_id: str | None = None
    tenant: str | None = None
    priority: str = "normal"
    cache_enabled: bool = True
    deadline_s: float | None = None   # how long the caller may wait for admission
    meta: dict[str, Any] = field(default_factory=dict)


def _fail(msg: str, field_name: str, request_id: str) -> InvalidRequest:
    return InvalidRequest(msg, request_id=request_id, field=field_name)


def _check_content(content: Any, where: str, rid: str) -> None:
    if isinstance(content, str):
        if not content.strip():
            raise _fail(f"{where}: text content must not be empty", where, rid)
        return
    if not isinstance(content, list) or not content:
        raise _fail(f"{where}: content must be a non-empty string or a non-empty list of blocks", where, rid)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _fail(f"{where}[{j}]: each content block must be an object with a 'type'", f"{where}[{j}]", rid)
        if block["type"] == "text" and not (isinstance(block.get("text"), str) and block["text"].strip()):
            raise _fail(f"{where}[{j}]: text blocks need non-empty 'text'", f"{where}[{j}]", rid)


def validate(
    request: dict[str, Any],
    settings: Settings,
    *,
    user_id: str | None = None,
    tenant: str | None = None,
    priority: str = "normal",
    cache: bool = True,
    request_id: str | None = None,
    deadline_s: float | None = None,
) -> NormalizedRequest:
    rid = request_id or f"req_{uuid.uuid4().hex}"
    if not isinstance(request, dict):
        raise _fail(f"a request is a dict like messages.create takes, not {type(request).__name__}", "request", rid)
    removed = sorted(REMOVED_PARAMS & request.keys())
    if removed:
        raise _fail(f"{', '.join(removed)}: removed in the current API version (the API answers 400); "
                    "use 'effort' / thinking settings instead", removed[0], rid)
    if request.get("stream"):
        raise _fail("stream: submit() returns whole messages; streaming is not supported through submit()",
                    "stream", rid)
    unknown = sorted(set(request) - ALLOWED_PARAMS - {"stream"})
    if unknown:
        raise _fail(f"{', '.join(unknown)}: extra inputs are not permitted", unknown[0], rid)
    if priority not in PRIORITIES:
        raise _fail(f"priority must be one of {PRIORITIES}, not {priority!r}", "priority", rid)
    if user_id is not None and not isinstance(user_id, str):
        raise _fail("user_id must be a string", "user_id", rid)
    if tenant is not None and not isinstance(tenant, str):
        raise _fail("tenant must be a string", "tenant", rid)

    model = request.get("model", AUTO)
    if not isinstance(model, str) or not model:
        raise _fail("model must be a model id or 'auto'", "model", rid)
    if model != AUTO and model not in settings.models:
        raise _fail(f"unknown model {model!r}; configured: {', '.join(sorted(settings.models))} or 'auto'",
                    "model", rid)

    max_tokens = request.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _fail(f"max_tokens must be an integer >= 1, not {max_tokens!r}", "max_tokens", rid)
    candidates = ([model] if model != AUTO else
                  [settings.router.haiku_model, settings.router.sonnet_model, settings.router.opus_model])
    ceiling = min(settings.models[m].max_output_tokens for m in candidates)
    if max_tokens > ceiling:
        raise _fail(f"max_tokens {max_tokens} is above the model's limit of {ceiling}", "max_tokens", rid)

    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages must be a non-empty list", "messages", rid)
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _fail(f"messages[{i}] must be an object with role and content", f"messages[{i}]", rid)
        if msg.get("role") not in ROLES:
            raise _fail(f"messages[{i}].role must be 'user' or 'assistant', not {msg.get('role')!r}",
                        f"messages[{i}].role", rid)
        extra = set(msg) - {"role", "content"}
        if extra:
            raise _fail(f"messages[{i}]: extra inputs are not permitted: {sorted(extra)}", f"messages[{i}]", rid)
        _check_content(msg.get("content"), f"messages[{i}].content", rid)
    if messages[0]["role"] != "user":
        raise _fail("the first message must have role 'user'", "messages[0].role", rid)

    system = request.get("system")
    if system is not None:
        if isinstance(system, list):
            if not all(isinstance(b, dict) and b.get("type") == "text" for b in system):
                raise _fail("system blocks must be text blocks", "system", rid)
        elif not isinstance(system, str):
            raise _fail("system must be a string or a list of text blocks", "system", rid)
    stops = request.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise _fail("stop_sequences must be a list of non-empty strings", "stop_sequences", rid)
    metadata = request.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or set(metadata) - {"user_id"}:
            raise _fail("metadata may only carry user_id", "metadata", rid)

    params = copy.deepcopy({k: v for k, v in request.items() if k not in ("model", "stream")})
    # the API's per-user attribution: our user id goes to metadata unless the caller set its own
    if user_id is not None:
        params.setdefault("metadata", {}).setdefault("user_id", user_id)
    return NormalizedRequest(
        request_id=rid, requested_model=model, params=params, max_tokens=max_tokens, user_id=user_id,
        tenant=tenant, priority=priority, cache_enabled=bool(cache), deadline_s=deadline_s,
    )


def text_of(content: Any) -> str:
    """The text of a message content or system value (non-text blocks contribute nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def prompt_text(params: dict[str, Any]) -> str:
    """System prompt and user turns, the text routing and complexity look at."""
    parts = [text_of(params.get("system"))]
    parts += [text_of(m.get("content")) for m in params.get("messages", []) if m.get("role") == "user"]
    return "\n".join(p for p in parts if p)
