"""The one seam between the pipeline and the network: the ``Transport`` port and its SDK implementation.

The pipeline never sees an SDK exception. A call either returns a ``Response`` (the message and the rate-limit
headers) or raises ``CallFailed``, which says what the limiter, the ledger and the fallback policy each need:

    status        the HTTP status (0: no answer came back)
    sent          "no"    the request certainly never reached the API (connect error, pool timeout)
                  "yes"   the API answered with an error status: processed, not billed
                  "maybe" the request went out and its answer was lost (read timeout, dropped connection,
                          a stream cut after it started): it may have been billed, so the ledger keeps an
                          unreconciled row and the limiter keeps its tokens
    retry_after   the server's retry-after, sanitised (never NaN, never negative)

Long answers: the API expects streaming for requests that may run for minutes, and a fixed total timeout would
fail any answer longer than itself. So requests with a large ``max_tokens`` are streamed internally (the final
message is accumulated; callers still get one ``Message``), with an idle timeout between events and an overall
limit sized to ``max_tokens``; short requests get a read timeout sized the same way.

``SdkTransport`` is tested against ``httpx2.MockTransport`` (pass ``http_client=``) and against the local API.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import anthropic
import httpx2

from runtime.errors import redact
from runtime.fallback import sane_retry_after
from runtime.settings import RetrySettings

RUNTIME_REQUEST_ID_HEADER = "x-claude-runtime-request-id"
RUNTIME_ATTEMPT_HEADER = "x-claude-runtime-attempt"

# the events of the API's stream (the SDK adds convenience events of its own, which are not passed on)
API_STREAM_EVENTS = frozenset({"message_start", "content_block_start", "content_block_delta", "content_block_stop",
                               "message_delta", "message_stop", "ping", "error"})

# the parameters messages.count_tokens accepts (the rest of a create request does not change the count)
COUNT_TOKENS_PARAMS = frozenset({"messages", "system", "tools", "tool_choice", "thinking", "output_config",
                                 "mcp_servers", "context_management"})


@dataclass
class Response:
    message: Any                      # anthropic.types.Message
    headers: dict[str, str] = field(default_factory=dict)   # lower-cased ratelimit-*, retry-after, request-id


class CallFailed(Exception):
    """A call that produced no message. See the module docstring for the fields."""

    def __init__(self, status: int, sent: str, *, error_type: str, message: str,
                 headers: dict[str, str] | None = None, retry_after: float | None = None,
                 api_request_id: str | None = None, emitted: bool = False) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        if sent not in ("no", "yes", "maybe"):
            raise ValueError(f"sent must be no / yes / maybe, not {sent!r}")
        self.status = int(status)
        self.sent = sent
        self.error_type = error_type
        self.message = redact(message)
        self.headers = headers or {}
        self.retry_after = retry_after
        self.api_request_id = api_request_id
        # part of the answer already went to the consumer (a stream): it cannot be retried transparently
        self.emitted = emitted

    @property
    def maybe_billed(self) -> bool:
        return self.sent == "maybe"

    @property
    def timed_out(self) -> bool:
        return self.error_type == "timeout"


class Transport(Protocol):
    async def create(self, model: str, params: dict[str, Any], *, request_id: str, attempt: int,
                     max_tokens: int) -> Response: ...

    async def stream(self, model: str, params: dict[str, Any], *, request_id: str, attempt: int,
                     max_tokens: int, emit: Any) -> Response:
        """Stream the answer: ``emit(event)`` for each of the API's events (dicts, as the API sends them),
        then return the accumulated message like ``create``."""
        ...

    async def count_tokens(self, model: str, params: dict[str, Any]) -> int: ...


# -- timeouts -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallTimeouts:
    stream: bool
    connect_s: float
    read_s: float       # non-streamed: the whole answer; streamed: the longest silence between events
    total_s: float      # the whole call, whatever its mode

    def httpx(self) -> httpx2.Timeout:
        return httpx2.Timeout(connect=self.connect_s, read=self.read_s, write=self.connect_s + 30.0,
                              pool=self.connect_s)


def timeouts_for(max_tokens: int, retry: RetrySettings) -> CallTimeouts:
    """Sized to the longest answer ``max_tokens`` allows at the slowest expected generation rate."""
    total = retry.request_timeout_s + max(0, int(max_tokens)) / retry.min_output_tokens_per_s
    stream = max_tokens > retry.stream_above_max_tokens
    read = retry.stream_idle_timeout_s if stream else total
    return CallTimeouts(stream, retry.connect_timeout_s, read, total)


# -- classification (pure over the SDK's exception types) -----------------------------------------------------

_NOT_SENT_CAUSES = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout)


def ratelimit_headers(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    return {k.lower(): v for k, v in headers.items()
            if k.lower().startswith("anthropic-ratelimit-") or k.lower() in ("retry-after", "request-id")}


def _retry_after(headers: dict[str, str]) -> float | None:
    return sane_retry_after(headers.get("retry-after"), 60.0) if "retry-after" in headers else None


def _error_type(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("type"), str):
            return err["type"]
    return type(exc).__name__


def _error_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
    return str(exc)


def classify(exc: BaseException, *, stream_started: bool = False) -> CallFailed:
    """An SDK (or asyncio) exception as a ``CallFailed``. ``stream_started``: the answer had begun to arrive,
    so the request was processed even if no status error says so."""
    if isinstance(exc, CallFailed):
        return exc
    if isinstance(exc, anthropic.APIStatusError):
        headers = ratelimit_headers(getattr(exc.response, "headers", None))
        # an error event inside a stream that had started: the work was done, the bill is unknown
        sent = "maybe" if stream_started else "yes"
        return CallFailed(int(exc.status_code), sent, error_type=_error_type(exc), message=_error_message(exc),
                          headers=headers, retry_after=_retry_after(headers),
                          api_request_id=headers.get("request-id"))
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__
        if isinstance(cause, _NOT_SENT_CAUSES) and not stream_started and not _lost_after_connect(cause):
            return CallFailed(0, "no", error_type="connection_error", message=type(cause).__name__)
        kind = "timeout" if isinstance(exc, anthropic.APITimeoutError) else "connection_error"
        return CallFailed(0, "maybe", error_type=kind, message=type(cause or exc).__name__)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return CallFailed(0, "maybe", error_type="timeout", message="the call ran past its time limit")
    # anything else (a malformed answer the SDK could not parse, a bug): the request went out; whether it was
    # billed is unknown
    return CallFailed(0, "maybe", error_type=type(exc).__name__, message=redact(str(exc))[:300])


def _lost_after_connect(cause: BaseException) -> bool:
    """The aiohttp backend reports every ``aiohttp.ClientConnectionError`` as an httpx ``ConnectError``, including
    a connection the server closed after the request went out (``ServerDisconnectedError``, a reset while
    reading). Only a failure to connect (``ClientConnectorError``) or a connect timeout proves nothing was sent."""
    origin = cause.__cause__
    if origin is None or type(origin).__module__.split(".")[0] != "aiohttp":
        return False
    import aiohttp

    not_sent = (aiohttp.ClientConnectorError,)
    timeout = getattr(aiohttp, "ConnectionTimeoutError", None)
    if timeout is not None:
        not_sent += (timeout,)
    return not isinstance(origin, not_sent)


# -- the SDK implementation -----------------------------------------------------------------------------------

class SdkTransport:
    """``Transport`` over the SDK's async client (``max_retries=0``: retry policy is the pipeline's):
    ``AsyncAnthropic`` by default, or a platform client (``client=``) with its own model ids (``model_id``)."""

    def __init__(self, retry: RetrySettings, *, api_key: str | None = None, base_url: str | None = None,
                 http_client: httpx2.AsyncClient | None = None, client: Any = None,
                 model_id: Any = None) -> None:
        self.retry = retry
        self.model_id = model_id or (lambda model: model)
        if client is None:
            kw: dict[str, Any] = {}
            if http_client is not None:
                kw["http_client"] = http_client
            client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0,
                                              timeout=retry.request_timeout_s, **kw)
        self.client = client

    async def aclose(self) -> None:
        """Close the client's connections (its aiohttp session or httpx pool): call once nothing uses it."""
        await self.client.close()

    @staticmethod
    def _headers(request_id: str, attempt: int) -> dict[str, str]:
        return {RUNTIME_REQUEST_ID_HEADER: request_id, RUNTIME_ATTEMPT_HEADER: str(int(attempt))}

    async def create(self, model: str, params: dict[str, Any], *, request_id: str, attempt: int,
                     max_tokens: int) -> Response:
        t = timeouts_for(max_tokens, self.retry)
        headers = self._headers(request_id, attempt)
        model = self.model_id(model)
        if t.stream:
            return await self._streamed(model, params, headers, t)
        try:
            # asyncio.timeout, not wait_for: no extra task per call (the overall cap behind httpx's own timeouts)
            async with asyncio.timeout(t.total_s + t.connect_s):
                raw = await self.client.messages.with_raw_response.create(model=model, **params,
                                                                          extra_headers=headers, timeout=t.httpx())
            message = await raw.parse()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a CallFailed
            raise classify(exc) from None
        return Response(message, ratelimit_headers(raw.headers))

    async def _streamed(self, model: str, params: dict[str, Any], headers: dict[str, str],
                        t: CallTimeouts) -> Response:
        started = False

        async def run() -> Response:
            nonlocal started
            async with self.client.messages.stream(model=model, **params, extra_headers=headers,
                                                   timeout=t.httpx()) as stream:
                stopped = False
                async for event in stream:
                    if event.type == "message_start":
                        started = True
                    elif event.type == "message_stop":
                        stopped = True
                if not stopped:
                    # the SDK hands back whatever arrived when a stream ends early: a cut answer is not an answer
                    raise CallFailed(0, "maybe", error_type="stream_cut",
                                     message="the stream ended before message_stop")
                message = await stream.get_final_message()
                return Response(message, ratelimit_headers(stream.response.headers))

        try:
            return await asyncio.wait_for(run(), timeout=t.total_s + t.connect_s)
        except Exception as exc:  # noqa: BLE001
            raise classify(exc, stream_started=started) from None

    async def stream(self, model: str, params: dict[str, Any], *, request_id: str, attempt: int,
                     max_tokens: int, emit: Any) -> Response:
        t = timeouts_for(max_tokens, self.retry)
        headers = self._headers(request_id, attempt)
        started = emitted = False

        async def run() -> Response:
            nonlocal started, emitted
            async with self.client.messages.stream(model=self.model_id(model), **params, extra_headers=headers,
                                                   timeout=t.httpx()) as stream:
                stopped = False
                async for event in stream:
                    if event.type not in API_STREAM_EVENTS:
                        continue  # the SDK's own convenience events (text, input_json, ...)
                    if event.type == "message_start":
                        started = True
                    elif event.type == "message_stop":
                        stopped = True
                    emit(event.model_dump(mode="json", exclude_none=False))
                    emitted = True
                if not stopped:
                    raise CallFailed(0, "maybe", error_type="stream_cut",
                                     message="the stream ended before message_stop", emitted=emitted)
                return Response(await stream.get_final_message(), ratelimit_headers(stream.response.headers))

        try:
            return await asyncio.wait_for(run(), timeout=t.total_s + t.connect_s)
        except Exception as exc:  # noqa: BLE001
            f = classify(exc, stream_started=started)
            f.emitted = f.emitted or emitted
            raise f from None

    async def count_tokens(self, model: str, params: dict[str, Any]) -> int:
        body = {k: v for k, v in params.items() if k in COUNT_TOKENS_PARAMS}
        try:
            res = await self.client.messages.count_tokens(model=self.model_id(model), **body,
                                                          timeout=self.retry.connect_timeout_s + 20.0)
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        n = int(res.input_tokens)
        if n < 0 or not math.isfinite(n):
            raise CallFailed(0, "yes", error_type="bad_count", message="count_tokens answered a negative count")
        return n


def build_transport(upstream: Any, retry: RetrySettings) -> SdkTransport:
    """The transport for one upstream (``runtime.settings.UpstreamSettings``, with its secrets)."""
    def secret(v: Any) -> str | None:
        return v.get_secret_value() if v is not None else None

    if upstream.kind == "bedrock":
        from anthropic import AsyncAnthropicBedrock

        kw: dict[str, Any] = {"aws_region": upstream.aws_region, "base_url": upstream.base_url,
                              "max_retries": 0, "timeout": retry.request_timeout_s}
        if upstream.api_key is not None:
            kw["api_key"] = secret(upstream.api_key)
        else:
            kw.update(aws_access_key=secret(upstream.aws_access_key), aws_secret_key=secret(upstream.aws_secret_key),
                      aws_session_token=secret(upstream.aws_session_token))
        return SdkTransport(retry, client=AsyncAnthropicBedrock(**kw), model_id=upstream.platform_model)
    if upstream.kind == "vertex":
        from anthropic import AsyncAnthropicVertex

        client = AsyncAnthropicVertex(region=upstream.region, project_id=upstream.project_id,
                                      access_token=secret(upstream.access_token), base_url=upstream.base_url,
                                      max_retries=0, timeout=retry.request_timeout_s)
        return SdkTransport(retry, client=client, model_id=upstream.platform_model)
    http_client = None
    if retry.http_client == "aiohttp":
        http_client = anthropic.DefaultAioHttpClient(timeout=retry.request_timeout_s)
    return SdkTransport(retry, api_key=secret(upstream.api_key), base_url=upstream.base_url,
                        model_id=upstream.platform_model, http_client=http_client)
