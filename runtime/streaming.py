"""A whole message as the API's stream of events, and events back into a message.

A cache hit streamed to a client must look like any streamed answer: ``message_events`` turns a stored message
into message_start, a start / delta / stop per content block (text, thinking, tool use) and message_delta /
message_stop, with the usage where the API puts it. ``sse`` frames an event the way the API does on the wire.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

# a long text arrives in several deltas, as it would from the API
_CHUNK = 64


def message_events(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    usage = dict(message.get("usage") or {})
    out_tokens = usage.get("output_tokens", 0)
    start = {k: v for k, v in message.items() if k not in ("content", "stop_reason", "stop_sequence")}
    start.update(content=[], stop_reason=None, stop_sequence=None, usage={**usage, "output_tokens": 1 if out_tokens
                                                                            else 0})
    yield {"type": "message_start", "message": start}
    for i, block in enumerate(message.get("content") or []):
        kind = block.get("type")
        if kind == "text":
            yield {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}
            text = block.get("text") or ""
            for j in range(0, len(text), _CHUNK) or [0]:
                yield {"type": "content_block_delta", "index": i,
                       "delta": {"type": "text_delta", "text": text[j:j + _CHUNK]}}
        elif kind == "thinking":
            yield {"type": "content_block_start", "index": i,
                   "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
            yield {"type": "content_block_delta", "index": i,
                   "delta": {"type": "thinking_delta", "thinking": block.get("thinking") or ""}}
            if block.get("signature"):
                yield {"type": "content_block_delta", "index": i,
                       "delta": {"type": "signature_delta", "signature": block["signature"]}}
        elif kind == "tool_use":
            yield {"type": "content_block_start", "index": i,
                   "content_block": {"type": "tool_use", "id": block.get("id"), "name": block.get("name"),
                                     "input": {}}}
            yield {"type": "content_block_delta", "index": i,
                   "delta": {"type": "input_json_delta",
                             "partial_json": json.dumps(block.get("input") or {}, separators=(",", ":"))}}
        else:
            yield {"type": "content_block_start", "index": i, "content_block": block}
        yield {"type": "content_block_stop", "index": i}
    yield {"type": "message_delta",
           "delta": {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")},
           "usage": {"output_tokens": out_tokens}}
    yield {"type": "message_stop"}


def sse(event: dict[str, Any]) -> bytes:
    """One event as the API frames it on the wire."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
