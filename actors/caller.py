"""Caller actors: stateless async shells that run ``runtime.pipeline.Pipeline`` with real ports.

Everything that decides lives in the pipeline (runtime/pipeline.py); this actor only builds the ports (the
limiter, ledger and cache clients over their actor handles, the SDK transport) and hands each request to it.

Whatever a caller holds in memory (estimator calibration, circuit breaker counts) may be lost on restart without
harm. Ray re-runs a killed caller's requests on its restarted process; the pipeline's intents, owned by
(actor name, process life, execution), let the ledger book what the dead process may have been billed and
number the re-run's attempts after it.
"""

from __future__ import annotations

import os
import time
import uuid

import ray
from pydantic import SecretStr

from actors.cache import CacheClient
from actors.ledger import LedgerClient
from actors.limiter import LimiterClient, PrefixClient
from runtime.errors import ClaudeRuntimeError
from runtime.pipeline import Pipeline, Ports
from runtime.request import NormalizedRequest
from runtime.result import Result
from runtime.settings import Settings
from runtime.transport import SdkTransport


class CallerActor:
    def __init__(self, settings: Settings, base_url: str | None, api_key: SecretStr | None,
                 limiter, ledger, cache=None, name: str | None = None) -> None:
        self.settings = settings
        self._life = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._name = name or ray.get_runtime_context().get_actor_name() or "caller"
        self._cache = CacheClient(cache, settings) if cache is not None else None
        ports = Ports(
            admission=LimiterClient(limiter, settings.limiter.max_wait_s),
            ledger=LedgerClient(ledger),
            transport=SdkTransport(settings.retry, api_key=api_key.get_secret_value() if api_key else None,
                                   base_url=base_url),
            cache=self._cache,
            prefixes=PrefixClient(limiter, settings),
        )
        self.pipeline = Pipeline(settings, ports, caller=self._name, life=self._life)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._started = time.time()
        if self._cache is not None:
            # load the embedding model before the first request, not during it (seconds on a cold process)
            self._cache.embedder.embed(["warm up"])

    def ready(self) -> str:
        return self._node_id

    def life(self) -> str:
        """This process's id: it changes when Ray restarts the actor."""
        return self._life

    def get_settings(self) -> Settings:
        # for runtime.connect(): everything but the secrets
        return self.settings.without_secrets()

    def pipeline_stats(self) -> dict:
        return dict(self.pipeline.stats)

    async def handle(self, req: NormalizedRequest) -> Result:
        try:
            return await self.pipeline.run(req)
        except ClaudeRuntimeError as exc:
            raise exc.with_request_id(req.request_id)
