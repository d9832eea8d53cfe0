"""The typed error tree. Every failed request ends in exactly one of these, carrying its request id.

    ClaudeRuntimeError                  base; .request_id
    ├── ConfigurationError              settings are wrong (also a ValueError)
    │   └── UnknownModel                a model id with no registry entry: never priced as $0
    ├── InvalidRequest                  rejected locally before any limiter reservation or network call
    ├── BudgetExceeded                  a budget (day/month, global/user/tenant) would be passed
    ├── RateLimitedPastDeadline         admission did not come within the wait limit
    ├── OverloadedAfterFallback         429/529/5xx on every model of the fallback chain
    ├── UpstreamTimeout                 the API never answered (timeout after the send, dropped connection):
    │                                   the call may have been billed; the ledger holds an unreconciled row
    ├── UpstreamError                   the API refused the request (4xx): surfaced at once, never retried
    │   └── AuthenticationError         401/403
    └── RequestLost                     the request's caller died and it could not be re-run

Messages never contain an API key: ``redact`` strips anything key-shaped before it is stored.
Errors pickle with all their fields so they cross Ray process boundaries intact.
"""

from __future__ import annotations

import re
from typing import Any

_KEY_RE = re.compile(r"sk-ant-[A-Za-z0-9_\-]+|(?i:bearer)\s+[A-Za-z0-9_\-\.]{8,}")


def redact(text: str) -> str:
    """Remove anything that looks like an Anthropic key or bearer token."""
    return _KEY_RE.sub("[REDACTED]", text)


class ClaudeRuntimeError(Exception):
    def __init__(self, message: str, *, request_id: str | None = None, **fields: Any) -> None:
        message = redact(str(message))
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.fields = fields
        for k, v in fields.items():
            setattr(self, k, v)

    def __reduce__(self):  # keyword-only fields survive pickling (Ray)
        return (_rebuild, (type(self), self.message, self.request_id, self.fields))

    def __str__(self) -> str:
        return f"{self.message} [request {self.request_id}]" if self.request_id else self.message

    def with_request_id(self, request_id: str) -> "ClaudeRuntimeError":
        self.request_id = request_id
        return self


def _rebuild(cls, message, request_id, fields):
    err = cls.__new__(cls)
    ClaudeRuntimeError.__init__(err, message, request_id=request_id, **fields)
    return err


class ConfigurationError(ClaudeRuntimeError, ValueError):
    pass


class UnknownModel(ConfigurationError):
    def __init__(self, model: str, *, known: list[str] | None = None, request_id: str | None = None,
                 message: str | None = None) -> None:
        msg = message or (f"unknown model {model!r}: add it to Settings.models with its class and prices"
                          + (f" (known: {', '.join(known)})" if known else ""))
        ClaudeRuntimeError.__init__(self, msg, request_id=request_id, model=model)

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.request_id, self.fields))


class InvalidRequest(ClaudeRuntimeError, ValueError):
    """.field names the offending part of the request where one can be named."""


class BudgetExceeded(ClaudeRuntimeError):
    """.budget names the budget (e.g. 'daily', 'user:u1:daily'); .limit_usd and .spent_usd say how far."""


class RateLimitedPastDeadline(ClaudeRuntimeError):
    pass


class OverloadedAfterFallback(ClaudeRuntimeError):
    """.attempts lists (model, status) for every try."""


class UpstreamTimeout(ClaudeRuntimeError):
    """.attempts lists (model, status) for every try; the last one went out and got no answer."""


class UpstreamError(ClaudeRuntimeError):
    """.status and .error_type are the API's; .api_request_id is its request-id header when it sent one."""


class AuthenticationError(UpstreamError):
    pass


class RequestLost(ClaudeRuntimeError):
    pass
