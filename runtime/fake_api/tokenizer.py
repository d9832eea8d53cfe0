"""The fake API's own tokenizer: deterministic, cheap, and additive (a prompt's count is the sum of its blocks').

Pieces are runs of up to 10 ASCII letters, runs of up to 3 digits, and any other single non-space character;
each piece is one token in the "v1" family. The "v2" family (models from 4.7 on) charges one more token for
letter pieces of 5 or more letters, which on English prose comes to about 1.3x the v1 count, the ratio the
real tokenizers show. Plain English averages ~3.7 characters per v1 token.

    count_text("Hello, world!", "v1")   # 4: Hello , world !
    count_text("Hello, world!", "v2")   # 6: Hello and world are long pieces

Images and documents are counted as the real API counts them (``media``): an image by its pixel size after
downscaling, a PDF by its text plus one page image per page, a text document by its text, a content document by
its blocks.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import base64
import binascii
import math

import orjson

from runtime.fake_api import media

_PIECE = re.compile(r"[A-Za-z]{1,10}|\d{1,3}|\S")
# matched from the same starting points as _PIECE's letter runs, so it counts exactly the long letter pieces
_LONG = re.compile(r"[A-Za-z]{5,10}")

# role and turn markers the real API adds around each message
MESSAGE_OVERHEAD = 3


def count_text(text: str, family: str = "v2") -> int:
    n = len(_PIECE.findall(text))
    if family == "v2":
        n += len(_LONG.findall(text))
    return n


def _json_text(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def block_tokens(block: Any, family: str) -> int:
    """Tokens of one content block (a str is a text block)."""
    if isinstance(block, str):
        return count_text(block, family)
    if not isinstance(block, dict):
        return count_text(_json_text(block), family)
    t = block.get("type")
    if t == "text":
        return count_text(block.get("text") or "", family)
    if t == "image":
        return image_block_tokens(block)
    if t == "document":
        return document_block_tokens(block, family)
    if t == "tool_use":
        return count_text(block.get("name") or "", family) + count_text(_json_text(block.get("input") or {}), family)
    if t == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return MESSAGE_OVERHEAD + sum(block_tokens(b, family) for b in content)
        return MESSAGE_OVERHEAD + count_text(content or "", family)
    if t == "thinking":
        return count_text(block.get("thinking") or "", family)
    body = {k: v for k, v in block.items() if k != "cache_control"}
    return count_text(_json_text(body), family)


def image_block_tokens(block: dict) -> int:
    src = block.get("source")
    if isinstance(src, dict) and src.get("type") == "base64":
        data = src.get("data")
        if isinstance(data, str):
            n = media.base64_image_tokens(data)
            if n is not None:
                return n
        return media.MAX_IMAGE_TOKENS
    return media.URL_IMAGE_TOKENS


def document_block_tokens(block: dict, family: str) -> int:
    """A document's title and context, plus its source: text, content blocks, or a PDF (text + page images)."""
    n = 0
    for k in ("title", "context"):
        v = block.get(k)
        if isinstance(v, str):
            n += count_text(v, family)
    src = block.get("source")
    if not isinstance(src, dict):
        return n + media.URL_DOCUMENT_TOKENS
    kind = src.get("type")
    if kind == "text":
        data = src.get("data")
        return n + count_text(data if isinstance(data, str) else "", family)
    if kind == "content":
        content = src.get("content")
        if isinstance(content, str):
            return n + count_text(content, family)
        return n + sum(block_tokens(b, family) for b in content or ())
    if kind == "base64" and isinstance(src.get("data"), str):
        data = src["data"]
        if src.get("media_type") == "text/plain":
            try:
                return n + count_text(base64.b64decode(data).decode("utf-8", "replace"), family)
            except (binascii.Error, ValueError):
                return n + media.URL_DOCUMENT_TOKENS
        try:
            pdf = media.pdf_info(data)
        except media.MediaError:
            return n + media.URL_DOCUMENT_TOKENS
        return (n + count_text(pdf.text, family) + math.ceil(pdf.opaque_glyphs / media.GLYPHS_PER_TOKEN)
                + pdf.pages * pdf.page_image_tokens)
    return n + media.URL_DOCUMENT_TOKENS


def tool_tokens(tool: Any, family: str) -> int:
    if isinstance(tool, dict) and "cache_control" in tool:
        tool = {k: v for k, v in tool.items() if k != "cache_control"}
    return count_text(_json_text(tool), family)


def iter_prompt_blocks(body: dict) -> Iterator[tuple[str, Any]]:
    """The prompt in the order the API caches it: tools, then system, then messages.

    Yields ``(kind, block)`` with kind in {"tool", "system", "turn", "block"}; a "turn" marks the start of a
    message (its role as the block) and carries the per-message overhead."""
    for tool in body.get("tools") or ():
        yield "tool", tool
    system = body.get("system")
    if isinstance(system, str):
        if system:
            yield "system", system
    elif isinstance(system, list):
        for b in system:
            yield "system", b
    for msg in body.get("messages") or ():
        yield "turn", msg.get("role")
        content = msg.get("content")
        if isinstance(content, str):
            yield "block", content
        else:
            for b in content or ():
                yield "block", b


def count_prompt(body: dict, family: str = "v2") -> int:
    """Input tokens of a (validated) Messages request: tools + system + messages."""
    total = 0
    for tool in body.get("tools") or ():
        total += tool_tokens(tool, family)
    system = body.get("system")
    if isinstance(system, str):
        total += count_text(system, family)
    elif isinstance(system, list):
        for b in system:
            total += block_tokens(b, family)
    for msg in body.get("messages") or ():
        total += MESSAGE_OVERHEAD
        content = msg.get("content")
        if isinstance(content, str):
            total += count_text(content, family)
        else:
            for b in content or ():
                total += block_tokens(b, family)
    return total


def prompt_block_tokens(kind: str, block: Any, family: str) -> int:
    if kind == "turn":
        return MESSAGE_OVERHEAD
    if kind == "tool":
        return tool_tokens(block, family)
    return block_tokens(block, family)
