"""claude-runtime: call the Claude API at production scale on Ray.

    import ray, runtime
    ray.init()
    rt = runtime.start(runtime.Settings())
    res = ray.get(rt.submit({"model": "auto", "max_tokens": 256,
                             "messages": [{"role": "user", "content": "Hi"}]}, user_id="u1"))
    res.message, res.model, res.cache, res.cost_usd, res.attempts

The pure-logic modules never import Ray; ``start``, ``connect`` and ``Runtime`` load it on first use, so
``import runtime.buckets`` (say) stays cheap.
"""

from typing import Any

from runtime import errors
from runtime.errors import (BudgetExceeded, ClaudeRuntimeError, ConfigurationError, InvalidRequest,
                            OverloadedAfterFallback, RateLimitedPastDeadline, UpstreamError)
from runtime.result import Result
from runtime.settings import Settings

__all__ = [
    "Settings", "Result", "Runtime", "start", "connect", "errors", "ClaudeRuntimeError", "ConfigurationError",
    "InvalidRequest", "BudgetExceeded", "RateLimitedPastDeadline", "OverloadedAfterFallback", "UpstreamError",
]

_LAZY = {"start", "connect", "Runtime"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from runtime import client
        return getattr(client, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
