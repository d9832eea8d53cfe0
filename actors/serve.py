"""The HTTP front door: an Anthropic-compatible endpoint on Ray Serve, in front of a running runtime.

    POST /v1/messages                 JSON, or SSE events with "stream": true (the API's bytes, event by event)
    POST /v1/messages/count_tokens    {"input_tokens": N}
    GET  /healthz                     200 when the runtime answers

Point any Anthropic SDK at it (``base_url="http://host:port"``, ``api_key=<a key from claude-runtime keys
create>``) and every request runs the runtime's own path: cache, limiter, router, fallback, ledger, budgets.
The upstream keys stay in the runtime's caller actors; this deployment never holds one.

Each replica is a thin async shell: it authenticates the key (runtime/keys.py), applies the key's own request
rate and daily budget (runtime/frontdoor.KeyGate), calls the runtime through ``runtime.connect()``, and maps a
typed failure to the API's error reply (runtime/frontdoor.error_reply). Requests carry the id
``fd-<key id>-<random>``, so the ledger finds every row a key caused by prefix.

A streamed request is billed from the upstream's final usage by the pipeline, like any other; a client that
disconnects mid-stream stops nothing upstream (the pipeline reads the answer to its end, bills it, caches it
when complete), and the key's budget is settled from the ledger row once it exists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import ray

from runtime.errors import ClaudeRuntimeError, InvalidRequest
from runtime.frontdoor import (ErrorReply, KeyGate, Ticket, api_key_from, error_event, error_reply, new_request_id,
                               parse_body, reply_for_status, request_prefix, worst_case_usd)
from runtime.keys import KeyStore
from runtime.streaming import sse

log = logging.getLogger("claude_runtime.frontdoor")

APP_NAME = "claude-runtime"
PRIORITY_HEADER = "x-claude-runtime-priority"
CACHE_HEADER = "x-claude-runtime-cache"
# a caller may lower its own priority, never claim the reserve kept for critical traffic
CALLER_PRIORITIES = ("normal", "bulk")


def _cause(exc: BaseException) -> BaseException:
    if isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        return exc.cause
    return exc


class FrontDoor:
    """The Serve deployment's body (``build_app`` makes it a deployment)."""

    def __init__(self, runtime_name: str = "default", replicas: int = 1, budget_refresh_s: float = 2.0,
                 settle_timeout_s: float = 1800.0) -> None:
        import runtime

        self.rt = runtime.connect(runtime_name)
        self.settings = self.rt.settings
        self.keys = KeyStore.in_dir(self.settings.data_dir)
        self.gate = KeyGate(replicas=replicas, refresh_s=budget_refresh_s)
        self.settle_timeout_s = settle_timeout_s
        self._background: set[asyncio.Task] = set()
        self.stats = {"requests": 0, "streams": 0, "errors": 0, "unauthorized": 0, "disconnects": 0}

    # -- HTTP ------------------------------------------------------------------------------------------------
    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path in ("/healthz", ""):
            return Response(orjson.dumps({"ok": True}), media_type="application/json")
        if path not in ("/v1/messages", "/v1/messages/count_tokens"):
            return self._error(reply_for_status(404, f"no route {request.method} {request.url.path}"), None)
        if request.method != "POST":
            return self._error(ErrorReply(405, "invalid_request_error",
                                          f"{request.method} is not allowed on {path}"), None)
        entry = self.keys.authenticate(api_key_from(request.headers))
        if entry is None:
            self.stats["unauthorized"] += 1
            return self._error(reply_for_status(401, "invalid x-api-key"), new_request_id("anon"))
        rid = new_request_id(entry.key_id)
        self.stats["requests"] += 1
        try:
            body = parse_body(await request.body())
            opts = self._options(request.headers, rid)
            if path.endswith("/count_tokens"):
                return await self._count_tokens(body, entry, rid, opts)
            return await self._messages(body, entry, rid, opts)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the API's error reply
            return self._failure(exc, rid, entry)

    def _options(self, headers: Any, rid: str) -> dict[str, Any]:
        priority = headers.get(PRIORITY_HEADER, "normal")
        if priority not in CALLER_PRIORITIES:
            raise InvalidRequest(f"{PRIORITY_HEADER} must be one of {CALLER_PRIORITIES}", request_id=rid,
                                 field=PRIORITY_HEADER)
        return {"priority": priority, "cache": headers.get(CACHE_HEADER, "on").lower() not in ("off", "0", "false")}

    def _error(self, reply: Any, rid: str | None, entry: Any = None) -> Any:
        from starlette.responses import Response

        headers = {**reply.headers, **({"request-id": rid} if rid else {})}
        if entry is not None:
            headers.update(self.gate.headers(entry))
        return Response(reply.body(rid), status_code=reply.status, headers=headers, media_type="application/json")

    def _failure(self, exc: BaseException, rid: str, entry: Any) -> Any:
        exc = _cause(exc)
        self.stats["errors"] += 1
        if not isinstance(exc, ClaudeRuntimeError):
            log.exception("front door: unexpected failure for %s", rid, exc_info=exc)
        return self._error(error_reply(exc), rid, entry)

    # -- the key's rate and budget ---------------------------------------------------------------------------
    async def _admit(self, entry: Any, req: Any) -> Ticket:
        if entry.budget_usd is not None and self.gate.needs_refresh(entry):
            asked = time.time()
            # callers journal their records and drain them to the ledger in the background: push what they
            # hold first, so the ledger's figure has every cost settled before ``asked``
            await asyncio.gather(*(c.flush.remote() for c in self.rt.callers), return_exceptions=True)
            got = await self.rt.ledger.request_spend.remote(request_prefix(entry.key_id),
                                                            float(int(asked) // 86400 * 86400))
            self.gate.refreshed(entry.key_id, got["usd"], asked)
        amount = worst_case_usd(req, self.settings) if entry.budget_usd is not None else 0.0
        return self.gate.admit(entry, amount, req.request_id)

    def _settle_later(self, ticket: Ticket, rid: str) -> None:
        """Settle the key's reservation once the request's ledger row exists (a stream's is written after its
        last event, a disconnected client's when the upstream finishes)."""
        if ticket.reserved_usd == 0.0:
            self.gate.settle(ticket, 0.0)
            return

        async def wait_for_row() -> None:
            deadline = time.monotonic() + self.settle_timeout_s
            pause = 0.05
            while time.monotonic() < deadline:
                try:
                    got = await self.rt.ledger.request_spend.remote(rid)
                except Exception:  # noqa: BLE001 - a restarting ledger: ask again
                    got = {"rows": 0}
                if got["rows"]:
                    self.gate.settle(ticket, got["usd"])
                    return
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
            self.gate.settle(ticket, ticket.reserved_usd)  # never heard: count the worst case

        task = asyncio.get_running_loop().create_task(wait_for_row())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- endpoints -------------------------------------------------------------------------------------------
    def _validated(self, body: dict, entry: Any, rid: str, opts: dict, streaming: bool) -> Any:
        from runtime.request import validate

        return validate(body, self.settings, user_id=entry.user_id, tenant=entry.tenant, priority=opts["priority"],
                        cache=opts["cache"], request_id=rid, streaming=streaming)

    async def _messages(self, body: dict, entry: Any, rid: str, opts: dict) -> Any:
        from starlette.responses import Response, StreamingResponse

        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("stream must be true or false", request_id=rid, field="stream")
        req = self._validated(body, entry, rid, opts, stream)
        ticket = await self._admit(entry, req)
        if not stream:
            try:
                res = await self.rt.submit_validated(req)
            except BaseException as exc:
                if isinstance(_cause(exc), InvalidRequest):
                    self.gate.settle(ticket, 0.0)  # refused before anything was reserved or sent
                else:
                    self._settle_later(ticket, rid)  # a failure may still have been billed (unreconciled)
                raise
            self.gate.settle(ticket, res.cost_usd)
            headers = {"request-id": rid, "x-claude-runtime-cache": res.cache, "x-claude-runtime-model": res.model,
                       "x-claude-runtime-cost-usd": f"{res.cost_usd:.8f}", **self.gate.headers(entry)}
            return Response(orjson.dumps(res.message.model_dump(mode="json")), headers=headers,
                            media_type="application/json")

        self.stats["streams"] += 1
        events = self.rt.astream_validated(req)
        try:
            # a failure before the first event is an HTTP error, as the API answers it
            first = await events.__anext__()
        except BaseException as exc:
            if isinstance(_cause(exc), InvalidRequest):
                self.gate.settle(ticket, 0.0)
            else:
                self._settle_later(ticket, rid)
            raise

        async def body_bytes():
            finished = False
            try:
                yield sse(first)
                async for event in events:
                    yield sse(event)
                finished = True
            except Exception as exc:  # noqa: BLE001 - after the first byte, a failure is an error event
                reply = error_reply(_cause(exc))
                yield sse(error_event(reply.error_type, reply.message))
                finished = True
            finally:
                if not finished:
                    self.stats["disconnects"] += 1
                self._settle_later(ticket, rid)

        headers = {"request-id": rid, "cache-control": "no-cache", **self.gate.headers(entry)}
        return StreamingResponse(body_bytes(), media_type="text/event-stream; charset=utf-8", headers=headers)

    async def _count_tokens(self, body: dict, entry: Any, rid: str, opts: dict) -> Any:
        from starlette.responses import Response

        # count_tokens takes no max_tokens; the validator wants one (any value: nothing is generated)
        req = self._validated({"max_tokens": 1, **body}, entry, rid, opts, False)
        ticket = self.gate.admit(entry, 0.0, rid)  # counting is free, but it is a request of the key's rate
        self.gate.settle(ticket, 0.0)
        caller = self.rt.callers[hash(rid) % len(self.rt.callers)]
        n = await caller.count_tokens.remote(req)
        return Response(orjson.dumps({"input_tokens": n}), media_type="application/json",
                        headers={"request-id": rid, **self.gate.headers(entry)})

    # -- for tests and ops -----------------------------------------------------------------------------------
    async def front_door_stats(self) -> dict[str, Any]:
        return {**self.stats, "background_settles": len(self._background)}


def build_app(runtime_name: str = "default", *, replicas: int = 1, access_log: bool = False,
              max_ongoing_requests: int = 2048, budget_refresh_s: float = 2.0):
    """The Serve application (bind it with ``serve.run``)."""
    from ray import serve

    deployment = serve.deployment(FrontDoor, name="FrontDoor").options(
        num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": access_log, "log_level": "INFO" if access_log else "WARNING"},
    )
    return deployment.bind(runtime_name, replicas, budget_refresh_s)


def run_front_door(*, host: str = "127.0.0.1", port: int = 8000, runtime_name: str = "default",
                   replicas: int = 1, access_log: bool = False, blocking: bool = False) -> str:
    """Deploy the front door on the connected Ray cluster (a runtime must be running); returns its URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(runtime_name, replicas=replicas, access_log=access_log), name=APP_NAME,
              route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"
