"""Claude on Amazon Bedrock and Google Vertex AI, as their endpoints look to the SDK's platform clients.

What differs from the Anthropic API, and is reproduced here:

- **Paths and bodies.** Bedrock: ``POST /model/{model_id}/invoke`` and ``/invoke-with-response-stream``; the
  body has ``anthropic_version`` (and ``anthropic_beta``) and neither ``model`` nor ``stream``. Vertex:
  ``POST [/v1]/projects/{p}/locations/{r}/publishers/anthropic/models/{model}:rawPredict`` and
  ``:streamRawPredict`` (the body keeps ``stream``), and ``models/count-tokens:rawPredict`` (whose body keeps
  ``model``). Model ids are the platform's (``us.anthropic.claude-sonnet-5-5-v1:0``,
  ``claude-sonnet-5-5@20261001``), mapped to the registry's by ``resolve_model``.
- **Credentials.** Bedrock requests are SigV4-signed (or carry a Bedrock API key as a bearer token); Vertex ones
  carry an OAuth access token. The fake checks presence, not signatures, and names the caller by a hash of the
  access key id / token (``credential``).
- **Streaming.** Bedrock streams AWS event-stream frames (``application/vnd.amazon.eventstream``), each a
  ``chunk`` event whose JSON payload is ``{"bytes": base64(<the Anthropic SSE event's JSON>)}``; Vertex streams
  the Anthropic SSE as is.
- **Errors.** Bedrock answers ``{"message": ...}`` with an ``x-amzn-ErrorType`` header and its own statuses
  (overloaded is 503 ServiceUnavailableException, a too-long prompt is a 400 ValidationException). Vertex
  passes the model's Anthropic-shaped errors through, but its own front end answers auth (401), unknown models
  (404) and quota (429) in Google's shape ``{"error": {"code", "message", "status"}}``. Neither sends
  ``anthropic-ratelimit-*`` or ``retry-after`` headers. The SDK picks its exception class by status alone.
"""

from __future__ import annotations

import base64
import re
import struct
import zlib
from typing import Mapping

import orjson

from runtime.fake_api.protocol import ApiError
from runtime.settings import ModelInfo

ANTHROPIC = "anthropic"
BEDROCK = "bedrock"
VERTEX = "vertex"
PLATFORMS = (ANTHROPIC, BEDROCK, VERTEX)

# region or geography prefix of a cross-region inference profile ("us.", "eu.", "apac.", "global."), then the
# provider, the model, an optional snapshot date and the version suffix
_BEDROCK_ID = re.compile(r"^(?:[a-z]{2,8}\.)?anthropic\.(?P<id>[a-z0-9.-]+?)(?:-\d{8})?-v\d+(?::\d+)?$")
_VERTEX_ID = re.compile(r"^(?P<id>[a-z0-9.-]+?)(?:@(?:\d{8}|latest|default))?$")
# body fields the platforms add around a Messages request
PLATFORM_BODY_FIELDS = ("anthropic_version", "anthropic_beta", "user_profile_id")


def resolve_model(platform: str, model_id: str, models: Mapping[str, ModelInfo],
                  explicit: Mapping[str, str]) -> str | None:
    """The registry model a platform id stands for, or None.

    ``explicit`` (``FakeApiConfig.platform_models``: platform id -> registry id) wins. Otherwise Bedrock ids
    ``[geo.]anthropic.<model>[-YYYYMMDD]-v<N>[:<M>]`` (also as the last part of an ARN) and Vertex ids
    ``<model>[@<date>]`` name the registry model ``<model>``. Bare registry ids are accepted on Vertex only, as
    Vertex accepts a model without a version."""
    target = explicit.get(model_id)
    if target is not None:
        return target if target in models else None
    if platform == BEDROCK:
        mid = model_id.rsplit("/", 1)[-1] if model_id.startswith("arn:") else model_id
        m = _BEDROCK_ID.match(mid)
    else:
        m = _VERTEX_ID.match(model_id)
    if m is None:
        return None
    rid = m.group("id")
    return rid if rid in models else None


def credential(platform: str, headers: Mapping[str, str]) -> str:
    """Who is calling, from the Authorization header (presence is all that is checked); 401 if absent.

    SigV4 names its access key id in ``Credential=<id>/<date>/...``: that id, not the per-request signature,
    identifies the caller, so its requests share one prompt-cache scope and one ``api_key_id``."""
    auth = headers.get("authorization") or ""
    if platform == BEDROCK:
        if auth.startswith("AWS4-HMAC-SHA256"):
            m = re.search(r"Credential=([^/,\s]+)", auth)
            if m is not None:
                return "aws:" + m.group(1)
        elif auth[:7].lower() == "bearer " and auth[7:].strip():
            return "aws-bearer:" + auth[7:].strip()
        raise ApiError(401, "Missing Authentication Token")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return "gcp:" + auth[7:].strip()
    raise ApiError(401, "Request is missing required authentication credential. Expected OAuth 2 access token, "
                        "login cookie or other valid authentication credential.")


def platform_body(platform: str, body: object, registry_model: str) -> dict:
    """The Anthropic-shaped request inside a platform body: ``anthropic_*`` fields removed, ``model`` set.

    Raises the platform's 400 for what it rejects: a missing ``anthropic_version``, and on Bedrock a ``model``
    or ``stream`` field (the model is in the path, streaming in the route)."""
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed input request, please reformat your input and try again.")
    version = body.get("anthropic_version")
    if not isinstance(version, str) or not version:
        raise ApiError(400, "anthropic_version: Field required" if platform == VERTEX else
                       "Malformed input request: #: required key [anthropic_version] not found, please reformat "
                       "your input and try again.")
    if platform == BEDROCK:
        for k in ("model", "stream"):
            if k in body:
                raise ApiError(400, f"Malformed input request: #: extraneous key [{k}] is not permitted, please "
                                    "reformat your input and try again.")
    out = {k: v for k, v in body.items() if k not in PLATFORM_BODY_FIELDS}
    out["model"] = registry_model
    return out


# -- errors --------------------------------------------------------------------------------------------------
_BEDROCK_ERRORS = {
    400: (400, "ValidationException"),
    401: (401, "UnrecognizedClientException"),
    403: (403, "AccessDeniedException"),
    404: (404, "ResourceNotFoundException"),
    413: (400, "ValidationException"),
    429: (429, "ThrottlingException"),
    500: (500, "InternalServerException"),
    529: (503, "ServiceUnavailableException"),
}
_BEDROCK_MESSAGES = {
    413: "Input is too long for requested model.",
    429: "Too many requests, please wait before trying again.",
    529: "Bedrock is unable to process your request.",
}
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}


def bedrock_error(err: ApiError) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, extra headers) of an error as Bedrock answers it."""
    status, kind = _BEDROCK_ERRORS.get(err.status, (err.status, "InternalServerException"))
    msg = _BEDROCK_MESSAGES.get(err.status, err.message)
    return status, orjson.dumps({"message": msg}), {"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/"
                                                                         "coral/com.amazon.bedrock/"}


def vertex_front_error(err: ApiError) -> bytes | None:
    """Google's error body for the errors Vertex's own front end answers (auth, unknown model, quota); None
    for the model's errors, which Vertex passes through in the Anthropic shape."""
    if err.status not in (401, 403, 404, 429):
        return None
    if err.status == 429:
        msg = ("Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base "
               "model: anthropic-claude. Please submit a quota increase request.")
    else:
        msg = err.message
    return orjson.dumps({"error": {"code": err.status, "message": msg, "status": _GOOGLE_STATUS[err.status]}})


# -- AWS event stream ----------------------------------------------------------------------------------------
def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v  # 7: string value


_CHUNK_HEADERS = (_header(":event-type", "chunk") + _header(":content-type", "application/json")
                  + _header(":message-type", "event"))


def event_frame(headers: bytes, payload: bytes) -> bytes:
    """One message of the AWS event-stream encoding: a prelude (total length, headers length, CRC32 of the
    two), the headers, the payload, and a CRC32 of everything before it."""
    prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
    msg = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


def bedrock_chunk(event: dict) -> bytes:
    """An Anthropic stream event as Bedrock sends it: a ``chunk`` frame carrying the event's JSON in base64."""
    return event_frame(_CHUNK_HEADERS, b'{"bytes":"' + base64.b64encode(orjson.dumps(event)) + b'"}')
