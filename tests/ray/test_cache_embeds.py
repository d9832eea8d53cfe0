"""``cache.embed_in_actor``: the cache actor embeds a lookup's prompt itself (one round trip on a miss), and
hands the embedding to the pool when its model is busy or absent. Real Ray, real LanceDB, the real model."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import ray

from tests.runtime_fixtures import ray_local, stats_when  # noqa: F401 - a fixture
from actors.cache import NAMESPACE, CacheActor, CacheClient
from runtime.embedding import get_embedder
from runtime.settings import CacheSettings, Settings

pytestmark = pytest.mark.ray

T0 = 1_800_000_000.0
MODEL = "claude-haiku-5-5"
Q = "How do I reverse a list in Python?"
PARA = "How can I reverse a list in Python?"


class CountingEmbedder:
    """The real in-process embedder, counting the texts the client asks it for (the pool's stand-in here)."""

    def __init__(self) -> None:
        self.inner = get_embedder()
        self.texts: list[str] = []

    async def encode_async(self, texts, *, tokens=False):
        self.texts.extend(texts)
        return await self.inner.encode_async(texts, tokens=tokens)


def req(text: str, max_tokens: int = 256) -> dict:
    return {"max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}


def answer(text: str) -> dict:
    return {"id": "msg_" + uuid.uuid4().hex[:6], "type": "message", "role": "assistant", "model": "m",
            "stop_reason": "end_turn", "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": 10, "output_tokens": 20}}


def _actor(tmp_path, **cache):
    settings = Settings(data_dir=tmp_path, cache=CacheSettings(embed_in_actor=True, **cache))
    actor = CacheActor.options(name=f"cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE,
                               lifetime="detached").remote(settings, maintenance_interval_s=0)
    ray.get(actor.ping.remote())
    return actor, settings


@pytest.fixture
def embedding_cache(ray_local, tmp_path):
    actor, settings = _actor(tmp_path)
    yield actor, CacheClient(actor, settings, CountingEmbedder()), settings
    ray.kill(actor, no_restart=True)


async def test_the_actor_embeds_a_miss_and_serves_exact_and_paraphrase_without_the_pool(embedding_cache):
    actor, client, _ = embedding_cache
    await stats_when(actor, lambda st: st["embedding"]["loaded"], timeout_s=120)
    out = await client.lookup(req(Q), MODEL, "A", now=T0)
    assert out.kind == "miss" and out.leader
    # the actor's vector is the model's vector: rows it embeds and rows the pool embedded are searched alike
    want = client.embedder.inner.encode([Q], tokens=True)
    assert np.allclose(out.vector, want.vectors[0], atol=1e-5)
    assert out.tokens is not None and out.tokens.shape == want.tokens[0].shape
    # embed alone (the miss path's floor in benchmarks/overhead.py): the same vector, and no lookup counted
    alone = await actor.embed.remote(Q)
    assert np.allclose(alone["vector"], want.vectors[0], atol=1e-5)
    assert alone["tokens"].shape == want.tokens[0].shape
    assert await client.store(out, answer("Use reversed()."), MODEL, 0.01, now=T0)

    exact = await client.lookup(req(Q), MODEL, "A", now=T0 + 1)
    assert exact.kind == "exact"
    sem = await client.lookup(req(PARA), MODEL, "A", now=T0 + 1)
    assert sem.kind == "semantic", sem.reason
    assert sem.message["content"][0]["text"] == "Use reversed()."
    other = await client.lookup(req(PARA), MODEL, "B", now=T0 + 1)  # another tenant's scope
    assert other.kind == "miss"
    st = await actor.stats.remote()
    # the miss, the paraphrase and the other tenant's lookup were embedded there; the exact hit not at all
    assert st["embedding"]["embedded_here"] == 3 and st["embedding"]["sent_to_pool"] == 0
    assert client.embedder.texts == []


async def test_concurrent_lookups_share_the_actors_model_and_the_overflow_goes_to_the_pool(embedding_cache):
    actor, client, _ = embedding_cache
    await stats_when(actor, lambda st: st["embedding"]["loaded"], timeout_s=120)
    prompts = [f"What is the boiling point of {x} at sea level?" for x in
               ("water", "ethanol", "acetone", "mercury", "benzene", "glycerol", "methanol", "hexane",
                "toluene", "propanol", "octane", "pentane")]
    outs = await asyncio.gather(*[client.lookup(req(p), MODEL, "A", now=T0) for p in prompts])
    assert all(o.kind == "miss" and o.leader and o.vector is not None and o.tokens is not None for o in outs)
    st = await actor.stats.remote()
    here, sent = st["embedding"]["embedded_here"], st["embedding"]["sent_to_pool"]
    # every lookup was embedded once, in one place or the other (the actor takes at most 8 at once), and the
    # client's pool took exactly the ones sent to it
    assert here + sent == len(prompts) and here >= 1
    assert len(client.embedder.texts) == sent
    for p, o in zip(prompts, outs):  # batched or not, here or in the pool: the same vector for the same prompt
        assert np.allclose(o.vector, client.embedder.inner.encode([p]).vectors[0], atol=1e-5)


async def test_an_actor_without_its_model_leaves_every_lookup_to_the_pool(ray_local, tmp_path):
    actor, settings = _actor(tmp_path, embedding_model=str(tmp_path / "no-such-model"))
    try:
        client = CacheClient(actor, settings, CountingEmbedder())
        out = await client.lookup(req(Q), MODEL, "A", now=T0)
        assert out.kind == "miss" and out.leader and out.vector is not None
        assert await actor.embed.remote(Q) is None  # nothing here to embed with
        assert await client.store(out, answer("Use reversed()."), MODEL, 0.01, now=T0)
        sem = await client.lookup(req(PARA), MODEL, "A", now=T0 + 1)
        assert sem.kind == "semantic", sem.reason
        st = await actor.stats.remote()
        assert st["embedding"]["embedded_here"] == 0 and st["embedding"]["sent_to_pool"] == 2
        assert client.embedder.texts == [Q, PARA]  # the answer was stored with its lookup's vector
    finally:
        ray.kill(actor, no_restart=True)


async def test_store_later_sends_before_the_next_lookup_and_drain_waits_for_it(embedding_cache):
    # the request path hands its answer back first and serialises and sends the write on the loop's next turn;
    # here a lookup is one trip, sent at once: a paraphrase asked right after, from the same client, must still
    # find that answer (the real clock throughout: store_later stamps the row with it)
    actor, client, _ = embedding_cache
    await stats_when(actor, lambda st: st["embedding"]["loaded"], timeout_s=120)
    pairs = [("How do I sort a dict by value in Python?", "How can I sort a dict by value in Python?"),
             ("What is the tallest mountain in Africa?", "What's the tallest mountain in Africa?")]
    for q, para in pairs:
        out = await client.lookup(req(q), MODEL, "A")
        assert out.kind == "miss" and out.leader
        client.store_later(out, answer(f"answer to {q}"), MODEL, 0.01)
        near = await client.lookup(req(para), MODEL, "A")
        assert near.kind == "semantic", (para, near.reason)
        assert near.message["content"][0]["text"] == f"answer to {q}"
    # an answer not to keep frees its key; drain returns once every write and release is done
    out = await client.lookup(req(Q), MODEL, "A")
    truncated = {**answer("trunc"), "stop_reason": "max_tokens"}
    client.store_later(out, truncated, MODEL, 0.01)
    await client.drain()
    assert not client._puts and not client._unsent
    stats = await actor.stats.remote()
    assert stats["puts"] == 2 and stats["claims"] == 0
