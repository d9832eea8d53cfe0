"""The embedded local API as a detached Ray actor, so every node's callers reach one server with one set of
buckets and one billing log (the way one real account behaves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from runtime.fake_api import FakeApiConfig, FakeApiServer
from runtime.fake_api.billing import read_billing
from runtime.settings import Settings

NAMESPACE = "claude_runtime"
NAME = "fake_api"


@ray.remote(num_cpus=0, max_concurrency=4)
class FakeApiActor:
    def __init__(self, settings: Settings, overrides: dict[str, Any] | None = None) -> None:
        cfg = FakeApiConfig.from_settings(settings, **(overrides or {}))
        self._server = FakeApiServer(cfg).start()

    def url(self) -> str:
        return self._server.url

    def stats(self) -> dict:
        return self._server.stats()

    def billing_lines(self) -> list[dict[str, Any]]:
        """Every complete line of this server's billing log (what ``rt.reconcile()`` settles against)."""
        path = self._server.cfg.billing_path
        if path is None or not Path(path).exists():
            return []
        return read_billing(Path(path))

    def stop(self) -> None:
        self._server.stop()


def get_or_create_fake_api(settings: Settings, overrides: dict[str, Any] | None = None, *,
                           scheduling_strategy: Any = None, namespace: str = NAMESPACE):
    return FakeApiActor.options(
        name=NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
        scheduling_strategy=scheduling_strategy,
    ).remote(settings, overrides)
