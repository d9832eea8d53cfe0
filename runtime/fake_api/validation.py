"""Request validation with the API's messages and statuses (400 / 404 / 413), so the SDK raises the same class.

Checks only what the real API rejects and what the rest of the fake relies on; messages are phrased like the
API's (``field: problem``), including "Extra inputs are not permitted" for parameters the 2026-10-21 version
removed (temperature, top_p, top_k) or never had.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.fake_api import media
from runtime.fake_api.protocol import ApiError
from runtime.settings import ModelInfo

CREATE_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "tools", "tool_choice",
    "thinking", "cache_control", "container", "diagnostics", "inference_geo", "output_config", "service_tier",
    "speed", "mcp_servers", "context_management",
})
COUNT_FIELDS = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control", "output_config", "speed",
    "mcp_servers", "context_management",
})
ROLES = frozenset({"user", "assistant", "system"})
_CACHE_TTLS = frozenset({"5m", "1h"})
# the API's limit on cache_control markers per request (top-level automatic caching takes one of them)
MAX_CACHE_BREAKPOINTS = 4


@dataclass(frozen=True)
class Prepared:
    body: dict
    model: str
    info: ModelInfo
    model_class: str
    family: str
    max_tokens: int
    stream: bool
    user_id: str | None


def _bad(msg: str, cls: str | None = None) -> ApiError:
    return ApiError(400, msg, model_class=cls)


def _check_cache_control(cc: Any, where: str, cls: str | None) -> None:
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise _bad(f"{where}.cache_control.type: Input should be 'ephemeral'", cls)
    ttl = cc.get("ttl")
    if ttl is not None and ttl not in _CACHE_TTLS:
        raise _bad(f"{where}.cache_control.ttl: Input should be '5m' or '1h'", cls)


def _check_block(b: Any, where: str, cls: str | None) -> None:
    if not isinstance(b, dict):
        raise _bad(f"{where}: Input should be a valid dictionary or object", cls)
    t = b.get("type")
    if not isinstance(t, str):
        raise _bad(f"{where}.type: Field required", cls)
    if b.get("cache_control") is not None:
        if t in ("thinking", "redacted_thinking"):
            raise _bad(f"{where}.{t}.cache_control: Extra inputs are not permitted: thinking blocks cannot be "
                       "marked for caching directly (they are cached with the turn that holds them)", cls)
        if t == "text" and b.get("text") == "":
            raise _bad(f"{where}: cache_control cannot be set for empty text blocks", cls)
    if t == "text":
        text = b.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text: Field required", cls)
        if not text:
            raise _bad("messages: text content blocks must be non-empty", cls)
    elif t == "image":
        _check_image(b, where, cls)
    elif t == "document":
        _check_document(b, where, cls)
    cc = b.get("cache_control")
    if cc is not None:
        _check_cache_control(cc, where, cls)


def _source(b: dict, where: str, cls: str | None) -> tuple[dict, Any]:
    src = b.get("source")
    if not isinstance(src, dict):
        raise _bad(f"{where}.source: Input should be a valid dictionary or object", cls)
    return src, src.get("type")


def _check_ref(src: dict, kind: str, where: str, cls: str | None) -> None:
    """A source the server does not fetch: it must still name its URL or file."""
    field = "url" if kind == "url" else "file_id"
    if not isinstance(src.get(field), str) or not src[field]:
        raise _bad(f"{where}.source.{kind}.{field}: Field required", cls)


def _check_image(b: dict, where: str, cls: str | None) -> None:
    src, kind = _source(b, where, cls)
    if kind in ("url", "file"):
        return _check_ref(src, kind, where, cls)
    if kind != "base64":
        raise _bad(f"{where}.source.type: Input should be 'base64', 'url' or 'file'", cls)
    mt = src.get("media_type")
    if mt not in media.IMAGE_MEDIA_TYPES:
        raise _bad(f"{where}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or "
                   "'image/webp'", cls)
    data = src.get("data")
    if not isinstance(data, str) or not data:
        raise _bad(f"{where}.source.base64.data: Field required", cls)
    try:
        real, w, h = media.image_info(data)
    except media.MediaError as exc:
        raise _bad(f"{where}.source.base64.data: {exc}", cls) from None
    if real != mt:
        raise _bad(f"{where}.source.base64.data: Image does not match the provided media type {mt}", cls)
    if max(w, h) > media.MAX_IMAGE_SIDE:
        raise _bad(f"{where}.source.base64.data: image dimensions exceed max allowed size: "
                   f"{media.MAX_IMAGE_SIDE} pixels", cls)


def _check_document(b: dict, where: str, cls: str | None) -> None:
    src, kind = _source(b, where, cls)
    if kind in ("url", "file"):
        return _check_ref(src, kind, where, cls)
    if kind == "text":
        if not isinstance(src.get("data"), str):
            raise _bad(f"{where}.source.text.data: Field required", cls)
        return None
    if kind == "content":
        content = src.get("content")
        if isinstance(content, str):
            return None
        if not isinstance(content, list) or not content:
            raise _bad(f"{where}.source.content.content: Input should be a valid string or a non-empty list", cls)
        for j, blk in enumerate(content):
            inner = f"{where}.source.content.{j}"
            if not isinstance(blk, dict) or blk.get("type") not in ("text", "image"):
                raise _bad(f"{inner}.type: Input should be 'text' or 'image'", cls)
            _check_block(blk, inner, cls)
        return None
    if kind != "base64":
        raise _bad(f"{where}.source.type: Input should be 'base64', 'content', 'text', 'url' or 'file'", cls)
    if src.get("media_type") != "application/pdf":
        raise _bad(f"{where}.source.base64.media_type: Input should be 'application/pdf'", cls)
    data = src.get("data")
    if not isinstance(data, str) or not data:
        raise _bad(f"{where}.source.base64.data: Field required", cls)
    try:
        info = media.pdf_info(data)
    except media.MediaError as exc:
        raise _bad(f"{where}.source.base64.data: {exc}", cls) from None
    if info.pages > media.PDF_MAX_PAGES:
        raise _bad(f"{where}.source.base64.data: A maximum of {media.PDF_MAX_PAGES} PDF pages may be provided.",
                   cls)


def _markers(body: dict) -> list[str]:
    """The TTL of every cache_control in the request, in the order the API caches the prompt: tools, system,
    messages (a tool_result's inner blocks before the block itself), then a top-level one."""
    out: list[str] = []

    def add(cc: Any) -> None:
        if cc is not None:
            out.append("1h" if isinstance(cc, dict) and cc.get("ttl") == "1h" else "5m")

    for t in body.get("tools") or ():
        if isinstance(t, dict):
            add(t.get("cache_control"))
    system = body.get("system")
    for b in system if isinstance(system, list) else ():
        if isinstance(b, dict):
            add(b.get("cache_control"))
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        for b in content if isinstance(content, list) else ():
            if not isinstance(b, dict):
                continue
            inner = b.get("content") if b.get("type") == "tool_result" else None
            for ib in inner if isinstance(inner, list) else ():
                if isinstance(ib, dict):
                    add(ib.get("cache_control"))
            add(b.get("cache_control"))
    add(body.get("cache_control"))
    return out


def _check_breakpoints(body: dict, cls: str | None) -> None:
    ttls = _markers(body)
    if len(ttls) > MAX_CACHE_BREAKPOINTS:
        raise _bad(f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
                   f"Found {len(ttls)}.", cls)
    first_5m = next((i for i, t in enumerate(ttls) if t == "5m"), None)
    if first_5m is not None and "1h" in ttls[first_5m + 1:]:
        raise _bad("a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. Note "
                   "that blocks are processed in the following order: `tools`, `system`, `messages`.", cls)


def resolve_model(body: Any, models: dict[str, ModelInfo]) -> tuple[str, ModelInfo] | None:
    """The request's model if it is a known one (used to pick rate-limit headers even for a bad request)."""
    if isinstance(body, dict):
        m = body.get("model")
        if isinstance(m, str):
            info = models.get(m)
            if info is not None:
                return m, info
    return None


def validate(body: Any, models: dict[str, ModelInfo], *, count_only: bool = False,
             batch: bool = False) -> Prepared:
    if not isinstance(body, dict):
        raise _bad("Input should be a valid dictionary or object")
    resolved = resolve_model(body, models)
    cls = resolved[1].model_class if resolved else None
    allowed = COUNT_FIELDS if count_only else CREATE_FIELDS
    for k in body:
        if k not in allowed:
            raise _bad(f"{k}: Extra inputs are not permitted", cls)
    model = body.get("model")
    if model is None:
        raise _bad("model: Field required")
    if not isinstance(model, str) or not model:
        raise _bad("model: Input should be a valid string")
    max_tokens = 0
    if not count_only:
        if "max_tokens" not in body:
            raise _bad("max_tokens: Field required", cls)
        max_tokens = body["max_tokens"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise _bad("max_tokens: Input should be a valid integer", cls)
        if max_tokens < 1:
            raise _bad("max_tokens: Input should be greater than or equal to 1", cls)
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages: Field required", cls)
    if not isinstance(msgs, list):
        raise _bad("messages: Input should be a valid list", cls)
    if not msgs:
        raise _bad("messages: at least one message is required", cls)
    last = len(msgs) - 1
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages.{i}: Input should be a valid dictionary or object", cls)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'", cls)
        if "content" not in m:
            raise _bad(f"messages.{i}.content: Field required", cls)
        content = m["content"]
        if isinstance(content, str):
            # the API lets only a final assistant turn (a prefill) be empty
            if not content and not (i == last and role == "assistant"):
                raise _bad(f"messages.{i}: all messages must have non-empty content except for the optional "
                           "final assistant message", cls)
        elif isinstance(content, list):
            if not content and not (i == last and role == "assistant"):
                raise _bad(f"messages.{i}: all messages must have non-empty content except for the optional "
                           "final assistant message", cls)
            for j, b in enumerate(content):
                _check_block(b, f"messages.{i}.content.{j}", cls)
        else:
            raise _bad(f"messages.{i}.content: Input should be a valid string or list", cls)
    system = body.get("system")
    if system is not None:
        if isinstance(system, list):
            for j, b in enumerate(system):
                _check_block(b, f"system.{j}", cls)
                if b.get("type") != "text":
                    raise _bad(f"system.{j}.type: Input should be 'text'", cls)
        elif not isinstance(system, str):
            raise _bad("system: Input should be a valid string or list", cls)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools: Input should be a valid list", cls)
        for j, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise _bad(f"tools.{j}.name: Field required", cls)
            if t.get("cache_control") is not None:
                _check_cache_control(t["cache_control"], f"tools.{j}", cls)
    if body.get("cache_control") is not None:
        _check_cache_control(body["cache_control"], "", cls)
    _check_breakpoints(body, cls)
    seqs = body.get("stop_sequences")
    if seqs is not None and (not isinstance(seqs, list) or not all(isinstance(s, str) for s in seqs)):
        raise _bad("stop_sequences: Input should be a valid list of strings", cls)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream: Input should be a valid boolean", cls)
    if batch and stream:
        raise _bad("stream: streaming is not supported for requests in a Message Batch", cls)
    user_id = None
    meta = body.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            raise _bad("metadata: Input should be a valid dictionary or object", cls)
        for k in meta:
            if k != "user_id":
                raise _bad(f"metadata.{k}: Extra inputs are not permitted", cls)
        user_id = meta.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise _bad("metadata.user_id: Input should be a valid string", cls)
    if resolved is None:
        raise ApiError(404, f"model: {model}")
    _, info = resolved
    if not count_only and max_tokens > info.max_output_tokens:
        raise _bad(f"max_tokens: {max_tokens} > {info.max_output_tokens}, which is the maximum allowed number of "
                   f"output tokens for {model}", cls)
    return Prepared(body=body, model=model, info=info, model_class=info.model_class, family=info.tokenizer,
                    max_tokens=max_tokens, stream=stream, user_id=user_id)
