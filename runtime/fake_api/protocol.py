"""Wire-level pieces shared by the handlers: API errors, error bodies, ids."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import string

import orjson

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    """An error the API answers with. ``model_class`` is set once the request's model is known, so the
    response can carry that class's rate-limit headers."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 model_class: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type or ERROR_TYPES.get(status, "api_error")
        self.message = message
        self.model_class = model_class


def error_body(status: int, type_: str, message: str, request_id: str | None) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id})


_ALPHABET = string.ascii_letters + string.digits


def _prefix(n: int = 10) -> str:
    raw = os.urandom(n)
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in raw)


class IdMaker:
    """Ids shaped like the API's (``msg_01…``): a random per-server prefix and a counter, so they are unique
    across restarts and cost nothing per request."""

    def __init__(self) -> None:
        self._p = _prefix()
        self._n = itertools.count(1)

    def make(self, kind: str) -> str:
        return f"{kind}_01{self._p}{next(self._n):012d}"


@functools.lru_cache(maxsize=1024)  # a handful of keys call a server; hashing each request's key is waste
def key_id(api_key: str) -> str:
    """A stable, non-reversible name for a key (``apikey_`` + 12 hex of its SHA-256): what billing lines and
    admin reports show instead of the key."""
    return "apikey_" + hashlib.sha256(api_key.encode()).hexdigest()[:12]
