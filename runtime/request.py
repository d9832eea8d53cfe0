"""Validation and normalisation of one request, before anything else sees it.

A request that the API would reject gets ``InvalidRequest`` here, before any limiter reservation, ledger entry or
network call: the user learns at once, and nothing is spent on it.
"""

from __future__ import annotations

import copy
import math
import re
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
    id_given: bool = False            # the caller chose the request id (it may collide with a running one)
    # automatic prompt caching for this request: None follows Settings.prompt_caching, True / False override it
    prompt_cache: bool | None = None


def _fail(msg: str, field_name: str, request_id: str) -> InvalidRequest:
    return InvalidRequest(msg, request_id=request_id, field=field_name)


# the Message Batches API's custom_id pattern, so any request id can also travel through a batch
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# what a request is allowed to be made of: JSON, and not absurdly deep (a hostile argument must not recurse us
# into a crash)
_MAX_DEPTH = 64


def _check_json(value: Any, where: str, rid: str, depth: int = 0) -> None:
    """The request must be JSON the API can read: str keys, finite numbers, no other objects."""
    if depth > _MAX_DEPTH:
        raise _fail(f"{where}: nested too deeply", where, rid)
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(f"{where}: numbers must be finite", where, rid)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(f"{where}: object keys must be strings, not {type(k).__name__}", where, rid)
            _check_json(v, f"{where}.{k}", rid, depth + 1)
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", rid, depth + 1)
        return
    raise _fail(f"{where}: {type(value).__name__} is not JSON (use dicts, lists, strings and numbers)", where, rid)


_IMAGE_MEDIA = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def _check_block(block: Any, where: str, rid: str) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise _fail(f"{where}: each content block must be an object with a 'type'", where, rid)
    kind = block["type"]
    if kind == "text" and not (isinstance(block.get("text"), str) and block["text"].strip()):
        raise _fail(f"{where}: text blocks need non-empty 'text'", where, rid)
    if kind in ("image", "document"):
        src = block.get("source")
        if not isinstance(src, dict) or not isinstance(src.get("type"), str):
            raise _fail(f"{where}.source: must be an object with a 'type'", f"{where}.source", rid)
        stype = src["type"]
        if stype == "base64":
            if not (isinstance(src.get("data"), str) and src["data"]):
                raise _fail(f"{where}.source.data: base64 sources need non-empty 'data'", f"{where}.source", rid)
            if not isinstance(src.get("media_type"), str):
                raise _fail(f"{where}.source.media_type: required for base64 sources", f"{where}.source", rid)
            if kind == "image" and src["media_type"] not in _IMAGE_MEDIA:
                raise _fail(f"{where}.source.media_type: images must be one of {sorted(_IMAGE_MEDIA)}",
                            f"{where}.source", rid)
        elif stype == "url":
            if not (isinstance(src.get("url"), str) and src["url"]):
                raise _fail(f"{where}.source.url: url sources need a 'url'", f"{where}.source", rid)
        elif stype == "text":
            if not isinstance(src.get("data"), str):
                raise _fail(f"{where}.source.data: text sources need string 'data'", f"{where}.source", rid)
        elif stype == "content":
            if not isinstance(src.get("content"), (list, str)):
                raise _fail(f"{where}.source.content: must be a string or a list of blocks", f"{where}.source",
                            rid)
        elif stype != "file":
            raise _fail(f"{where}.source.type: unknown source type {stype!r}", f"{where}.source", rid)
    if "cache_control" in block and not isinstance(block["cache_control"], dict):
        raise _fail(f"{where}.cache_control: must be an object", f"{where}.cache_control", rid)


def _check_content(content: Any, where: str, rid: str) -> None:
    if isinstance(content, str):
        if not content.strip():
            raise _fail(f"{where}: text content must not be empty", where, rid)
        return
    if not isinstance(content, list) or not content:
        raise _fail(f"{where}: content must be a non-empty string or a non-empty list of blocks", where, rid)
    for j, block in enumerate(content):
        _check_block(block, f"{where}[{j}]", rid)


def check_request_id(request_id: Any) -> str:
    """A caller-supplied request id: 1-64 letters, digits, ``_`` or ``-`` (it is also the batch custom_id and a
    ledger key)."""
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        shown = request_id if isinstance(request_id, (str, int, float)) else type(request_id).__name__
        raise InvalidRequest(f"request_id must be 1-64 letters, digits, _ or -, not {shown!r}",
                             request_id=None, field="request_id")
    return request_id


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
    streaming: bool = False,
    prompt_cache: bool | None = None,
) -> NormalizedRequest:
    """``streaming``: the request is for ``rt.stream`` (``stream=True`` in it is then allowed, and implied)."""
    rid = check_request_id(request_id) if request_id is not None else f"req_{uuid.uuid4().hex}"
    if not isinstance(request, dict):
        raise _fail(f"a request is a dict like messages.create takes, not {type(request).__name__}", "request", rid)
    if isinstance(priority, str) and priority not in PRIORITIES or not isinstance(priority, str):
        raise _fail(f"priority must be one of {PRIORITIES}, not {priority!r}", "priority", rid)
    if user_id is not None and not (isinstance(user_id, str) and 0 < len(user_id) <= 256):
        raise _fail("user_id must be a non-empty string of at most 256 characters", "user_id", rid)
    if tenant is not None and not (isinstance(tenant, str) and 0 < len(tenant) <= 256):
        raise _fail("tenant must be a non-empty string of at most 256 characters", "tenant", rid)
    if not isinstance(cache, bool):
        raise _fail("cache must be True or False", "cache", rid)
    if prompt_cache is not None and not isinstance(prompt_cache, bool):
        raise _fail("prompt_cache must be None (follow the settings), True or False", "prompt_cache", rid)
    if deadline_s is not None:
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not math.isfinite(
                deadline_s) or deadline_s <= 0:
            raise _fail(f"deadline_s must be a positive number of seconds, not {deadline_s!r}", "deadline_s", rid)
    _check_json(request, "request", rid)
    removed = sorted(REMOVED_PARAMS & request.keys())
    if removed:
        raise _fail(f"{', '.join(removed)}: removed in the current API version (the API answers 400); "
                    "use 'effort' / thinking settings instead", removed[0], rid)
    if request.get("stream") and not streaming:
        raise _fail("stream: submit() returns whole messages; use rt.stream(...) for events", "stream", rid)
    if "stream" in request and not isinstance(request["stream"], bool):
        raise _fail("stream must be true or false", "stream", rid)
    unknown = sorted(set(request) - ALLOWED_PARAMS - {"stream"})
    if unknown:
        raise _fail(f"{', '.join(unknown)}: extra inputs are not permitted", unknown[0], rid)

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
        if not isinstance(msg.get("role"), str) or msg["role"] not in ROLES:
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
            if not all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
                       and b["text"].strip() for b in system):
                raise _fail("system blocks must be text blocks with non-empty 'text'", "system", rid)
        elif not isinstance(system, str):
            raise _fail("system must be a string or a list of text blocks", "system", rid)
    stops = request.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise _fail("stop_sequences must be a list of non-empty strings", "stop_sequences", rid)
    metadata = request.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or set(metadata) - {"user_id"}:
            raise _fail("metadata may only carry user_id", "metadata", rid)
        if metadata.get("user_id") is not None and not isinstance(metadata["user_id"], str):
            raise _fail("metadata.user_id must be a string", "metadata", rid)
    for name in ("tools", "tool_choice", "thinking", "output_config", "mcp_servers", "container",
                 "context_management"):
        v = request.get(name)
        if v is None:
            continue
        want = list if name in ("tools", "mcp_servers") else (dict, str) if name == "container" else dict
        if not isinstance(v, want):
            raise _fail(f"{name} has the wrong type ({type(v).__name__})", name, rid)
    if request.get("tools") is not None:
        for i, tool in enumerate(request["tools"]):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise _fail(f"tools[{i}] must be an object with a non-empty 'name'", f"tools[{i}]", rid)
    if request.get("service_tier") is not None and request["service_tier"] not in ("auto", "standard_only"):
        raise _fail("service_tier must be 'auto' or 'standard_only'", "service_tier", rid)
    if request.get("inference_geo") is not None and not isinstance(request["inference_geo"], str):
        raise _fail("inference_geo must be a string", "inference_geo", rid)

    params = copy.deepcopy({k: v for k, v in request.items() if k not in ("model", "stream")})
    # the API's per-user attribution: our user id goes to metadata unless the caller set its own
    if user_id is not None:
        params.setdefault("metadata", {}).setdefault("user_id", user_id)
    return NormalizedRequest(
        request_id=rid, requested_model=model, params=params, max_tokens=max_tokens, user_id=user_id,
        tenant=tenant, priority=priority, cache_enabled=bool(cache), deadline_s=deadline_s,
        id_given=request_id is not None, prompt_cache=prompt_cache,
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
