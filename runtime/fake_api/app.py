"""HTTP surface of the fake API (aiohttp): the Messages, count_tokens, Batches and Models routes, plus
``/_fake/*`` controls for tests. Handlers translate between HTTP and the engine; they hold no state."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from aiohttp import web

from runtime.fake_api.batches import BatchStore
from runtime.fake_api.engine import Engine, Reply
from runtime.fake_api.protocol import ApiError, error_body
from runtime.fake_api.validation import resolve_model, validate

# big prompts (200k tokens) and batches (256 MB on the real service) must not hit aiohttp's 1 MB default
MAX_BODY = 300 * 1024 * 1024
_JSON = "application/json"
_BAD_JSON = object()
ENGINE_KEY = web.AppKey("engine", Engine)
BATCHES_KEY = web.AppKey("batches", BatchStore)


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _json(data: Any, headers: dict[str, str], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type=_JSON)


def _error(err: ApiError, headers: dict[str, str], request_id: str) -> web.Response:
    return web.Response(body=error_body(err.status, err.type, err.message, request_id), status=err.status,
                        headers=headers, content_type=_JSON)


def _check_version(request: web.Request) -> None:
    if not request.headers.get("anthropic-version"):
        raise ApiError(400, "anthropic-version: header is required")


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _chunks(text: str, words_per_chunk: int = 6) -> list[str]:
    parts = text.split(" ")
    out = []
    for i in range(0, len(parts), words_per_chunk):
        piece = " ".join(parts[i:i + words_per_chunk])
        out.append(piece if i == 0 else " " + piece)
    return out or [""]


class Handlers:
    def __init__(self, engine: Engine, batches: BatchStore) -> None:
        self.e = engine
        self.b = batches

    # -- /v1/messages --------------------------------------------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        e = self.e
        rid = e.ids.make("req")
        headers = {"request-id": rid}
        cls: str | None = None
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = _BAD_JSON
        # the model's class is looked up first so that even a 401 carries that class's rate-limit headers
        resolved = resolve_model(body, e.cfg.models)
        if resolved is not None:
            cls = resolved[1].model_class
        try:
            key = e.authenticate(request.headers)
            _check_version(request)
            if body is _BAD_JSON:
                raise ApiError(400, "There was an error parsing the body of your request: invalid JSON")
            prep = validate(body, e.cfg.models)
            plan = e.plan(prep, key, raw)
            e.check_size(prep, plan)
            itpm = plan.uncached + plan.write
            wait = e.limits.admit(cls, itpm, prep.max_tokens)
            if wait > 0:
                headers["retry-after"] = str(max(1, math.ceil(wait)))
                headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
                raise ApiError(429, f"This request would exceed the rate limit for your organization of "
                                    f"{cls} requests or tokens per minute. Retry after {wait:.2f} s.",
                               model_class=cls)
            fault = e.roll_fault(cls)
            if fault is not None:
                e.limits.take_request(cls)
                raise fault
            e.limits.take(cls, itpm, prep.max_tokens)
            rep = e.reply(prep, plan)
        except ApiError as err:
            if err.model_class is not None:
                cls = err.model_class
            if cls is not None:
                e.limits.headers(cls, headers)
            e.stats.record(err.status, cls)
            return _error(err, headers, rid)
        latency = e.cfg.latency_ms
        if prep.stream:
            return await self._stream(request, rep, headers, rid, latency)
        if latency > 0:
            await asyncio.sleep(latency / 1000.0)
        self._finish(rep, rid, request)
        e.limits.headers(cls, headers)
        return web.Response(body=orjson.dumps(rep.message()), headers=headers, content_type=_JSON)

    def _finish(self, rep: Reply, rid: str, request: web.Request) -> None:
        e = self.e
        e.limits.settle(rep.prep.model_class, rep.prep.max_tokens, rep.usage["output_tokens"])
        e.bill(rep, request_id=rid, headers=request.headers)
        e.stats.record(200, rep.prep.model_class, rep.usage)

    async def _stream(self, request: web.Request, rep: Reply, headers: dict[str, str], rid: str,
                      latency_ms: float) -> web.StreamResponse:
        e = self.e
        e.limits.headers(rep.prep.model_class, headers)
        headers["cache-control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        msg = rep.message()
        usage = rep.usage
        start_usage = {**usage, "output_tokens": 1}
        start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
        billed = False
        try:
            await resp.prepare(request)
            if latency_ms > 0:
                await asyncio.sleep(latency_ms / 1000.0)
            await resp.write(
                _sse("message_start", {"type": "message_start", "message": start})
                + _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
                + _sse("ping", {"type": "ping"}))
            for piece in _chunks(rep.text):
                await resp.write(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                              "delta": {"type": "text_delta", "text": piece}}))
            # billed before the last bytes go out, so a client that has the whole stream also finds its line
            billed = True
            self._finish(rep, rid, request)
            await resp.write(
                _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                + _sse("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": rep.stop_reason, "stop_sequence": rep.stop_sequence},
                    "usage": {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                              "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                              "cache_read_input_tokens": usage["cache_read_input_tokens"]}})
                + _sse("message_stop", {"type": "message_stop"}))
            await resp.write_eof()
        finally:
            # the tokens were generated whether or not the client stayed to read them: the real API bills them
            if not billed:
                self._finish(rep, rid, request)
        return resp

    # -- /v1/messages/count_tokens -------------------------------------------------------------------------
    async def count_tokens(self, request: web.Request) -> web.Response:
        e = self.e
        rid = e.ids.make("req")
        headers = {"request-id": rid}
        try:
            key = e.authenticate(request.headers)
            _check_version(request)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise ApiError(400, "There was an error parsing the body of your request: invalid JSON") from None
            prep = validate(body, e.cfg.models, count_only=True)
            plan = e.plan(prep, key, b"")  # counts only: never touches the prompt cache
        except ApiError as err:
            return _error(err, headers, rid)
        e.stats.count_tokens += 1
        return _json({"input_tokens": plan.total}, headers)

    # -- /v1/messages/batches ------------------------------------------------------------------------------
    def _batch_auth(self, request: web.Request) -> str:
        key = self.e.authenticate(request.headers)
        _check_version(request)
        return key

    async def batch_create(self, request: web.Request) -> web.Response:
        rid = self.e.ids.make("req")
        headers = {"request-id": rid}
        try:
            key = self._batch_auth(request)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise ApiError(400, "There was an error parsing the body of your request: invalid JSON") from None
            b = self.b.create(key, body)
        except ApiError as err:
            return _error(err, headers, rid)
        return _json(b.to_json(_base_url(request)), headers)

    async def batch_get(self, request: web.Request) -> web.Response:
        return self._batch_op(request, self.b.get)

    def _batch_op(self, request: web.Request, op) -> web.Response:
        """One batch by id through ``op`` (get, cancel), answered as the batch object."""
        rid = self.e.ids.make("req")
        headers = {"request-id": rid}
        try:
            self._batch_auth(request)
            b = op(request.match_info["batch_id"])
        except ApiError as err:
            return _error(err, headers, rid)
        return _json(b.to_json(_base_url(request)), headers)

    async def batch_list(self, request: web.Request) -> web.Response:
        rid = self.e.ids.make("req")
        headers = {"request-id": rid}
        q = request.query
        try:
            self._batch_auth(request)
            try:
                limit = int(q.get("limit", "20"))
            except ValueError:
                raise ApiError(400, "limit: Input should be a valid integer") from None
            if not 1 <= limit <= 1000:
                raise ApiError(400, "limit: Input should be between 1 and 1000")
            page, more = self.b.list(limit, q.get("after_id"), q.get("before_id"))
        except ApiError as err:
            return _error(err, headers, rid)
        base = _base_url(request)
        data = [b.to_json(base) for b in page]
        return _json({"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None}, headers)

    async def batch_cancel(self, request: web.Request) -> web.Response:
        return self._batch_op(request, self.b.cancel)

    async def batch_delete(self, request: web.Request) -> web.Response:
        rid = self.e.ids.make("req")
        headers = {"request-id": rid}
        try:
            self._batch_auth(request)
            bid = self.b.delete(request.match_info["batch_id"])
        except ApiError as err:
            return _error(err, headers, rid)
        return _json({"id": bid, "type": "message_batch_deleted"}, headers)

    async def batch_results(self, request: web.Request) -> web.Response:
        rid = self.e.ids.make("req")
        headers = {"request-id": rid}
        try:
            self._batch_auth(request)
            body = self.b.results(request.match_info["batch_id"])
        except ApiError as err:
            return _error(err, headers, rid)
        return web.Response(body=body, headers=headers, content_type="application/x-jsonl")

    # -- /v1/models ----------------------------------------------------------------------------------------
    def _model_json(self, mid: str) -> dict[str, Any]:
        return {"type": "model", "id": mid, "display_name": mid, "created_at": "2026-01-01T00:00:00Z"}

    async def models_list(self, request: web.Request) -> web.Response:
        rid = self.e.ids.make("req")
        try:
            self._batch_auth(request)
        except ApiError as err:
            return _error(err, {"request-id": rid}, rid)
        data = [self._model_json(m) for m in self.e.cfg.models]
        return _json({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None}, {"request-id": rid})

    async def models_get(self, request: web.Request) -> web.Response:
        rid = self.e.ids.make("req")
        mid = request.match_info["model_id"]
        try:
            self._batch_auth(request)
            if mid not in self.e.cfg.models:
                raise ApiError(404, f"model: {mid}")
        except ApiError as err:
            return _error(err, {"request-id": rid}, rid)
        return _json(self._model_json(mid), {"request-id": rid})

    # -- /_fake controls -----------------------------------------------------------------------------------
    async def fake_stats(self, request: web.Request) -> web.Response:
        return _json(self.e.stats.snapshot(), {})

    async def fake_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read() or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            return _json(self.e.configure(changes), {})
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, {}, status=400)

    async def fake_reset(self, request: web.Request) -> web.Response:
        self.e.reset()
        return _json({"ok": True}, {})

    async def fake_health(self, request: web.Request) -> web.Response:
        return _json({"ok": True}, {})

    async def not_found(self, request: web.Request) -> web.Response:
        rid = self.e.ids.make("req")
        return _error(ApiError(404, f"Not found: {request.method} {request.path}"), {"request-id": rid}, rid)


def make_app(engine: Engine) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    batches = BatchStore(engine)
    app[ENGINE_KEY] = engine
    app[BATCHES_KEY] = batches
    h = Handlers(engine, batches)
    r = app.router
    r.add_post("/v1/messages", h.messages)
    r.add_post("/v1/messages/count_tokens", h.count_tokens)
    r.add_post("/v1/messages/batches", h.batch_create)
    r.add_get("/v1/messages/batches", h.batch_list)
    r.add_get("/v1/messages/batches/{batch_id}", h.batch_get)
    r.add_delete("/v1/messages/batches/{batch_id}", h.batch_delete)
    r.add_post("/v1/messages/batches/{batch_id}/cancel", h.batch_cancel)
    r.add_get("/v1/messages/batches/{batch_id}/results", h.batch_results)
    r.add_get("/v1/models", h.models_list)
    r.add_get("/v1/models/{model_id}", h.models_get)
    r.add_get("/_fake/stats", h.fake_stats)
    r.add_post("/_fake/config", h.fake_config)
    r.add_post("/_fake/reset", h.fake_reset)
    r.add_get("/_fake/health", h.fake_health)
    r.add_route("*", "/{tail:.*}", h.not_found)

    async def _cleanup(app: web.Application) -> None:
        for b in list(batches.batches.values()):
            if b.task is not None:
                b.task.cancel()

    app.on_cleanup.append(_cleanup)
    return app
