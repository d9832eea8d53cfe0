"""A local Anthropic-compatible API: the embedded backend of the demo, the tests and the benchmarks.

It speaks the Messages API as the real service does (JSON and SSE, count_tokens, Message Batches, prompt
caching, RPM/ITPM/OTPM buckets with their headers, 4xx/429/5xx/529 error bodies) so the real ``anthropic`` SDK
works against it unchanged, and it writes a billing log the ledger can be reconciled against. Pure asyncio +
aiohttp; never imports Ray.

    from runtime.fake_api import FakeApiConfig, FakeApiServer, serve
    cfg = FakeApiConfig.from_settings(settings, p529=0.01)
    with FakeApiServer(cfg).start() as srv:
        anthropic.Anthropic(base_url=srv.url, api_key="k", max_retries=0)
    serve(cfg, host="127.0.0.1", port=8080)       # blocking, for the CLI

It also serves the Messages API as Amazon Bedrock and Google Vertex AI do (``platforms``: paths, bodies, the AWS
event stream, their error shapes), so ``anthropic.AnthropicBedrock`` / ``AnthropicVertex`` work against it with
dummy credentials, and the Admin API's usage, cost and rate-limit reports (``admin``) from its billing log.

Controls: ``GET /_fake/stats`` (counters, ``billed_by_platform``, ``in_flight``), ``POST /_fake/config`` (p529,
p500, latency_ms, p529_by_class, p500_by_class, limits, output_tokens, output_tokens_per_s, batch_seconds,
cache_min_tokens: null for each model's own minimum, platform_models), ``POST /_fake/reset``, ``GET /_fake/health``.
"""

from runtime.fake_api.billing import read_billing
from runtime.fake_api.config import FakeApiConfig
from runtime.fake_api.server import FakeApiServer, serve
from runtime.fake_api.tokenizer import count_prompt, count_text

__all__ = ["FakeApiConfig", "FakeApiServer", "serve", "count_text", "count_prompt", "read_billing"]
