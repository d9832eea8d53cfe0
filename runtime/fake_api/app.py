"""HTTP surface of the fake API (aiohttp): the Messages, count_tokens, Batches and Models routes, the same
Messages API as Bedrock and Vertex serve it (``platforms``), the Admin API's usage / cost / rate-limit reports
(``admin``), plus ``/_fake/*`` controls for tests. Handlers translate between HTTP and the engine; they hold no
state. Every API route counts in ``stats.in_flight`` (by its path template) while it runs."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from aiohttp import web

from runtime.fake_api import admin, platforms
from runtime.fake_api.batches import BatchStore
from runtime.fake_api.engine import Engine, Reply
from runtime.fake_api.prompt_cache import CachePlan
from runtime.fake_api.platforms import ANTHROPIC, BEDROCK, VERTEX
from runtime.fake_api.protocol import ApiError, error_body
from runtime.fake_api.validation import Prepared, resolve_model, validate

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


def _bedrock_event(event: str, data: Any) -> bytes:
    return platforms.bedrock_chunk(data)


def _pace(rep: Reply, tokens_per_s: float | None) -> float:
    """Seconds the answer takes to generate at ``tokens_per_s`` (0 when answers are instant)."""
    if not tokens_per_s:
        return 0.0
    return rep.usage["output_tokens"] / tokens_per_s


class _Done:
    """Starts (prompt-cache entries become readable), then settles and bills, one response exactly once each,
    whichever way its handler ends."""

    __slots__ = ("h", "rep", "plan", "rid", "request", "key", "platform", "platform_model", "called", "started")

    def __init__(self, h: "Handlers", rep: Reply, plan: CachePlan, rid: str, request: web.Request, key: str,
                 platform: str, platform_model: str | None) -> None:
        self.h, self.rep, self.plan, self.rid, self.request, self.key = h, rep, plan, rid, request, key
        self.platform, self.platform_model = platform, platform_model
        self.called = False
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.h.e.response_started(self.plan)

    def __call__(self) -> None:
        self.start()
        if self.called:
            return
        self.called = True
        e = self.h.e
        rep = self.rep
        e.limits.settle(rep.prep.model_class, rep.prep.max_tokens, rep.usage["output_tokens"])
        e.bill(rep, request_id=self.rid, headers=self.request.headers, api_key=self.key, platform=self.platform,
               platform_model=self.platform_model)
        e.stats.record(200, rep.prep.model_class, rep.usage)


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
        except ApiError as err:
            return self._fail(err, cls, headers, rid, ANTHROPIC)
        return await self._create(request, prep, raw, key, rid, headers, ANTHROPIC, None)

    async def _create(self, request: web.Request, prep: Prepared, raw: bytes, key: str, rid: str,
                      headers: dict[str, str], platform: str, platform_model: str | None) -> web.StreamResponse:
        """Admit, generate and answer one validated Messages request, in the platform's wire format."""
        e = self.e
        cls = prep.model_class
        try:
            plan = e.plan(prep, key, raw)
            e.check_size(prep, plan)
            itpm = plan.uncached + plan.write
            wait = e.limits.admit(cls, itpm, prep.max_tokens)
            if wait > 0:
                if platform == ANTHROPIC:
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
            return self._fail(err, cls, headers, rid, platform)
        done = _Done(self, rep, plan, rid, request, key, platform, platform_model)
        if prep.stream:
            return await self._stream(request, done, headers)
        first = e.cfg.latency_ms / 1000.0
        pace = _pace(rep, e.cfg.output_tokens_per_s)
        delay = first + pace
        # aiohttp does not cancel a handler whose client went away (handler_cancellation=False, set explicitly
        # in server.py), so the answer is generated and billed in full; the finally covers a cancellation anyway
        try:
            if first > 0:
                await asyncio.sleep(first)
            done.start()  # generation begins: this response's cache writes are readable from now on
            if pace > 0:
                await asyncio.sleep(pace)
        finally:
            done()
        if platform == ANTHROPIC:
            e.limits.headers(cls, headers)
        elif platform == BEDROCK:
            headers["x-amzn-bedrock-input-token-count"] = str(plan.total)
            headers["x-amzn-bedrock-output-token-count"] = str(rep.usage["output_tokens"])
            headers["x-amzn-bedrock-invocation-latency"] = str(int(delay * 1000))
        return web.Response(body=orjson.dumps(rep.message()), headers=headers, content_type=_JSON)

    def _fail(self, err: ApiError, cls: str | None, headers: dict[str, str], rid: str,
              platform: str) -> web.Response:
        """The error response, shaped as the platform answers it."""
        e = self.e
        if err.model_class is not None:
            cls = err.model_class
        if platform == ANTHROPIC:
            if cls is not None:
                e.limits.headers(cls, headers)
            e.stats.record(err.status, cls)
            return _error(err, headers, rid)
        if platform == BEDROCK:
            status, body, extra = platforms.bedrock_error(err)
            headers.update(extra)
        else:
            status = err.status
            front = platforms.vertex_front_error(err)
            body = front if front is not None else error_body(err.status, err.type, err.message, rid)
        e.stats.record(status, cls)
        return web.Response(body=body, status=status, headers=headers, content_type=_JSON)

    async def _stream(self, request: web.Request, done: "_Done", headers: dict[str, str]) -> web.StreamResponse:
        e = self.e
        rep = done.rep
        platform = done.platform
        if platform == ANTHROPIC:
            e.limits.headers(rep.prep.model_class, headers)
        headers["cache-control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        if platform == BEDROCK:
            resp.content_type = "application/vnd.amazon.eventstream"
            enc = _bedrock_event
        else:
            resp.content_type = "text/event-stream"
            enc = _sse
        msg = rep.message()
        usage = rep.usage
        start_usage = {**usage, "output_tokens": 1}
        start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        gone = False

        async def send(data: bytes) -> None:
            # a client that left does not stop the answer: the rest is generated (and paced) unsent
            nonlocal gone
            if gone:
                return
            try:
                await resp.write(data)
            except (ConnectionError, RuntimeError):
                gone = True

        try:
            try:
                await resp.prepare(request)
            except (ConnectionError, RuntimeError):
                gone = True
            if e.cfg.latency_ms > 0:
                await asyncio.sleep(e.cfg.latency_ms / 1000.0)
            done.start()
            await send(
                enc("message_start", {"type": "message_start", "message": start})
                + enc("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}})
                + enc("ping", {"type": "ping"}))
            pieces = _chunks(rep.text)
            pace = _pace(rep, e.cfg.output_tokens_per_s)
            # each delta is due once its share of the output (by characters) has been "generated"
            total_chars = sum(len(p) for p in pieces) or 1
            sent_chars = 0
            t_gen = loop.time()
            for piece in pieces:
                if pace > 0:
                    sent_chars += len(piece)
                    wait = t_gen + pace * sent_chars / total_chars - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                await send(enc("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                       "delta": {"type": "text_delta", "text": piece}}))
            # billed before the last bytes go out, so a client that has the whole stream also finds its line
            done()
            stop: dict[str, Any] = {"type": "message_stop"}
            if platform == BEDROCK:
                ms = int((loop.time() - t0) * 1000)
                stop["amazon-bedrock-invocationMetrics"] = {
                    "inputTokenCount": usage["input_tokens"] + usage["cache_creation_input_tokens"]
                    + usage["cache_read_input_tokens"], "outputTokenCount": usage["output_tokens"],
                    "invocationLatency": ms, "firstByteLatency": int(e.cfg.latency_ms)}
            await send(
                enc("content_block_stop", {"type": "content_block_stop", "index": 0})
                + enc("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": rep.stop_reason, "stop_sequence": rep.stop_sequence},
                    "usage": {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                              "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                              "cache_read_input_tokens": usage["cache_read_input_tokens"]}})
                + enc("message_stop", stop))
            if not gone:
                try:
                    await resp.write_eof()
                except (ConnectionError, RuntimeError):
                    pass
        finally:
            # the tokens were generated whether or not the client stayed to read them: the real API bills them
            done()
        return resp

    # -- Bedrock ---------------------------------------------------------------------------------------------
    async def bedrock_invoke(self, request: web.Request) -> web.StreamResponse:
        return await self._bedrock(request, stream=False)

    async def bedrock_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._bedrock(request, stream=True)

    async def _bedrock(self, request: web.Request, stream: bool) -> web.StreamResponse:
        e = self.e
        rid = e.ids.make("req")
        headers = {"request-id": rid, "x-amzn-requestid": rid}
        pid = request.match_info["model_id"]
        raw = await request.read()
        cls = None
        try:
            key = platforms.credential(BEDROCK, request.headers)
            model = platforms.resolve_model(BEDROCK, pid, e.cfg.models, e.cfg.platform_models)
            if model is None:
                raise ApiError(400, "The provided model identifier is invalid.")
            cls = e.cfg.models[model].model_class
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ApiError(400, "Malformed input request, please reformat your input and try again.") from None
            inner = platforms.platform_body(BEDROCK, body, model)
            if stream:
                inner["stream"] = True
            prep = validate(inner, e.cfg.models)
        except ApiError as err:
            return self._fail(err, cls, headers, rid, BEDROCK)
        return await self._create(request, prep, raw, key, rid, headers, BEDROCK, pid)

    # -- Vertex ----------------------------------------------------------------------------------------------
    async def vertex_predict(self, request: web.Request) -> web.StreamResponse:
        e = self.e
        rid = e.ids.make("req")
        headers = {"request-id": rid}
        m = request.match_info
        model_part, _, method = m["spec"].rpartition(":")
        raw = await request.read()
        cls = None
        try:
            if method not in ("rawPredict", "streamRawPredict") or not model_part:
                raise ApiError(404, f"Method not found: {m['spec']}")
            key = platforms.credential(VERTEX, request.headers)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ApiError(400, "There was an error parsing the body of your request: invalid JSON") from None
            count = model_part == "count-tokens"
            if count:
                if method != "rawPredict":
                    raise ApiError(404, f"Method not found: {m['spec']}")
                model_part = body.get("model") if isinstance(body, dict) else None
                if not isinstance(model_part, str) or not model_part:
                    raise ApiError(400, "model: Field required")
            model = platforms.resolve_model(VERTEX, model_part, e.cfg.models, e.cfg.platform_models)
            if model is None:
                raise ApiError(404, f"Publisher Model `projects/{m['project']}/locations/{m['region']}/publishers/"
                                    f"anthropic/models/{model_part}` not found.")
            cls = e.cfg.models[model].model_class
            inner = platforms.platform_body(VERTEX, body, model)
            if count:
                inner.pop("stream", None)
                prep = validate(inner, e.cfg.models, count_only=True)
                plan = e.plan(prep, key, b"")
            else:
                if method == "streamRawPredict":
                    inner["stream"] = True
                prep = validate(inner, e.cfg.models)
        except ApiError as err:
            return self._fail(err, cls, headers, rid, VERTEX)
        if count:
            e.stats.count_tokens += 1
            return _json({"input_tokens": plan.total}, headers)
        return await self._create(request, prep, raw, key, rid, headers, VERTEX, model_part)

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

    # -- Admin API ------------------------------------------------------------------------------------------
    def _admin(self, request: web.Request, report) -> web.Response:
        rid = self.e.ids.make("req")
        headers = {"request-id": rid}
        q = request.query
        try:
            self.e.authenticate_admin(request.headers)
            _check_version(request)
            data = report(lambda name: q.getall(name, []))
        except ApiError as err:
            return _error(err, headers, rid)
        return _json(data, headers)

    async def admin_usage(self, request: web.Request) -> web.Response:
        return self._admin(request, lambda getall: admin.usage_report(self.e.book, getall))

    async def admin_cost(self, request: web.Request) -> web.Response:
        return self._admin(request, lambda getall: admin.cost_report(self.e.book, getall))

    async def admin_rate_limits(self, request: web.Request) -> web.Response:
        cfg = self.e.cfg
        return self._admin(request, lambda getall: admin.rate_limits(cfg.models, cfg.limits, getall))

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


def _tracked(engine: Engine, route: str, handler):
    """``handler`` counted in ``stats.in_flight`` under ``route`` while it runs (streams: until the last byte)."""
    stats = engine.stats

    async def run(request: web.Request) -> web.StreamResponse:
        stats.enter(route)
        try:
            return await handler(request)
        finally:
            stats.leave(route)

    return run


_VERTEX = "/projects/{project}/locations/{region}/publishers/anthropic/models/{spec}"


def make_app(engine: Engine) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    batches = BatchStore(engine)
    app[ENGINE_KEY] = engine
    app[BATCHES_KEY] = batches
    h = Handlers(engine, batches)
    r = app.router

    def api(method: str, path: str, handler) -> None:
        r.add_route(method, path, _tracked(engine, path.replace(":.+}", "}"), handler))

    api("POST", "/v1/messages", h.messages)
    api("POST", "/v1/messages/count_tokens", h.count_tokens)
    api("POST", "/v1/messages/batches", h.batch_create)
    api("GET", "/v1/messages/batches", h.batch_list)
    api("GET", "/v1/messages/batches/{batch_id}", h.batch_get)
    api("DELETE", "/v1/messages/batches/{batch_id}", h.batch_delete)
    api("POST", "/v1/messages/batches/{batch_id}/cancel", h.batch_cancel)
    api("GET", "/v1/messages/batches/{batch_id}/results", h.batch_results)
    api("GET", "/v1/models", h.models_list)
    api("GET", "/v1/models/{model_id}", h.models_get)
    # Bedrock: a model id may carry ':' (and, as an ARN, '/'), so it is matched up to the action
    api("POST", "/model/{model_id:.+}/invoke", h.bedrock_invoke)
    api("POST", "/model/{model_id:.+}/invoke-with-response-stream", h.bedrock_stream)
    # Vertex: the SDK's default base URL ends in /v1; a base_url without it posts to /projects/...
    api("POST", "/v1" + _VERTEX, h.vertex_predict)
    api("POST", _VERTEX, h.vertex_predict)
    api("GET", "/v1/organizations/usage_report/messages", h.admin_usage)
    api("GET", "/v1/organizations/cost_report", h.admin_cost)
    api("GET", "/v1/organizations/rate_limits", h.admin_rate_limits)
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
