"""Running the fake API: in a background thread of the current process (tests, the Ray actor) or blocking in
the foreground (the ``claude-runtime fake-api`` command)."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import orjson
from aiohttp import web

from runtime.fake_api.app import make_app
from runtime.fake_api.config import FakeApiConfig
from runtime.fake_api.engine import Engine


# A client that disconnects must not stop its response: the real API generates and bills it anyway. aiohttp
# (3.9 on) only cancels a handler on disconnect when handler_cancellation=True; the servers below say False
# explicitly, and the handlers bill in `finally` blocks in case a handler is cancelled regardless (shutdown).


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{shown}:{port}"


class FakeApiServer:
    """The fake API on its own thread and event loop::

        with FakeApiServer(FakeApiConfig(limits=None)).start() as srv:
            client = anthropic.Anthropic(base_url=srv.url, api_key="k", max_retries=0)
            client.messages.create(model="claude-haiku-5-5", max_tokens=64, messages=[...])
            srv.stats()["by_status"]   # {"200": 1}
    """

    def __init__(self, cfg: FakeApiConfig | None = None) -> None:
        self.cfg = (cfg or FakeApiConfig()).copy()
        self.engine = Engine(self.cfg)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake API is not started: call start() first")
        return _url(self.cfg.host, self.port)

    def start(self, timeout: float = 30.0) -> "FakeApiServer":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name="fake-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the fake API did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the fake API failed to start: {self._error}") from self._error
        return self

    def _main(self) -> None:
        loop = self._loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            self._runner = web.AppRunner(make_app(self.engine), access_log=None, handle_signals=False,
                                         handler_cancellation=False)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, backlog=2048)
            loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as exc:  # surfaced to start()'s caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            self.engine.close()
            loop.close()

    def _call(self, fn, *args: Any) -> Any:
        """Run ``fn`` on the server's loop (the engine is only touched from there) and return its result."""
        if self._loop is None or not self._loop.is_running():
            return fn(*args)

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """The same dict as ``GET /_fake/stats``."""
        return self._call(self.engine.stats.snapshot)

    def configure(self, **changes: Any) -> dict[str, Any]:
        """The same as ``POST /_fake/config``: p529, p500, latency_ms, p529_by_class, limits, ..."""
        return self._call(self.engine.configure, orjson.loads(orjson.dumps(changes, default=_jsonable)))

    def reset(self) -> None:
        """The same as ``POST /_fake/reset``."""
        self._call(self.engine.reset)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
        self._thread = None
        self._loop = None

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass


def _jsonable(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    if dump is not None:
        return dump()
    raise TypeError(f"cannot send {type(obj).__name__} as configuration")


def serve(cfg: FakeApiConfig | None = None, host: str | None = None, port: int | None = None) -> None:
    """Serve in the foreground until interrupted (uvloop when installed). Prints one line with the URL, so a
    parent process that asked for port 0 can read the port it got."""
    cfg = (cfg or FakeApiConfig()).copy()
    host = cfg.host if host is None else host
    port = cfg.port if port is None else port
    engine = Engine(cfg)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    runner = web.AppRunner(make_app(engine), access_log=None, handler_cancellation=False)
    try:
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, host, port, backlog=2048)
        loop.run_until_complete(site.start())
        bound = runner.addresses[0][1]
        print(f"fake-api listening on {_url(host, bound)}", flush=True)
        sys.stdout.flush()
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        loop.run_until_complete(runner.cleanup())
        engine.close()
        loop.close()
