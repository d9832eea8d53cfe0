"""Wrong-answer feedback, the byte-capped mirror and old tables, on real Ray, real LanceDB (tmp_path) and the
real embedding model and verifier."""

from __future__ import annotations

import asyncio
import uuid

import pyarrow as pa
import pytest
import ray

from tests.runtime_fixtures import ray_local  # noqa: F401 - a fixture
from actors.cache import NAMESPACE, SCHEMA, CacheActor, CacheClient, CacheStore
from runtime import cache_policy as cp
from runtime import cache_verifier as cv
from runtime.embedding import get_embedder
from runtime.settings import CacheSettings, Settings

pytestmark = pytest.mark.ray

T0 = 1_800_000_000.0  # injected clock: every call passes now
MODEL = "claude-haiku-5-5"
Q = "How do I reverse a list in Python?"
E = "How can I reverse a list in Python?"  # the cached neighbour Q hits first (highest cosine)
N = "How would I reverse a list in Python?"  # a second neighbour: after feedback it must not answer Q either


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def new_actor(settings: Settings):
    actor = CacheActor.options(name=f"cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE,
                               lifetime="detached").remote(settings, maintenance_interval_s=0)
    ray.get(actor.ping.remote())
    return actor


@pytest.fixture
def cache(ray_local, tmp_path, embedder):
    settings = Settings(data_dir=tmp_path)
    actor = new_actor(settings)
    yield actor, CacheClient(actor, settings, embedder), settings
    ray.kill(actor, no_restart=True)


def req(text: str) -> dict:
    return {"max_tokens": 256, "messages": [{"role": "user", "content": text}]}


def answer(text: str) -> dict:
    return {"id": "msg_" + uuid.uuid4().hex[:6], "type": "message", "role": "assistant", "model": "m",
            "stop_reason": "end_turn", "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": 10, "output_tokens": 20}}


async def seed(client: CacheClient, text: str, tenant: str = "A") -> str:
    """Store an answer for ``text`` directly (neighbours of each other must all be in the table)."""
    params = req(text)
    enc = client.embedder.encode([text], tokens=True)
    key = cp.exact_key(params, MODEL, tenant)
    await client._actor.put.remote({
        "key": key, "scope_id": cp.scope_for(params, MODEL, tenant).scope_id(), "tenant": tenant, "model": MODEL,
        "kind": "code", "prompt": text, "vector": enc.vectors[0], "response": answer(f"answer to {text}"),
        "cost_usd": 0.01, "created_at": T0, "expires_at": T0 + 3600, "tokens": cv.pack_tokens(enc.tokens[0])})
    return key


async def ask_and_store(client: CacheClient, text: str, request_id: str) -> str:
    """The caller's path: a miss under ``request_id``, then its answer stored."""
    out = await client.lookup(req(text), MODEL, "A", now=T0, request_id=request_id)
    assert out.kind == "miss" and out.leader, out
    assert await client.store(out, answer(f"answer to {text}"), MODEL, 0.01, now=T0)
    return out.key


async def recorded(actor, counter: str, at_least: int) -> None:
    """Hits are recorded fire-and-forget: wait until the actor has counted them."""
    for _ in range(500):
        if (await actor.stats.remote())[counter] >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{counter} never reached {at_least}")


async def test_wrong_answer_evicts_the_entry_and_its_neighbours_no_longer_answer(cache, tmp_path):
    actor, client, settings = cache
    e_key = await seed(client, E)
    await seed(client, N)
    hit = await client.lookup(req(Q), MODEL, "A", now=T0, request_id="r-1")
    assert hit.kind == "semantic" and hit.message["content"][0]["text"] == f"answer to {E}", hit
    await recorded(actor, "hits_semantic", 1)

    out = await actor.feedback.remote("r-1", True, T0)
    assert out == {"request_id": "r-1", "found": True, "evicted": e_key, "tightened": 1}
    assert await actor.lookup_exact.remote(e_key, T0) is None
    again = await client.lookup(req(Q), MODEL, "A", now=T0)
    assert again.kind == "miss" and again.reason.startswith("verifier"), again
    await client.release(again)
    # the neighbour's raised threshold is durable: a fresh actor over the same table still refuses it
    other = new_actor(settings)
    try:
        fresh = await CacheClient(other, settings, client.embedder).lookup(req(Q), MODEL, "A", now=T0)
        assert fresh.kind == "miss"
        # and the neighbour still answers its own exact question
        assert (await CacheClient(other, settings, client.embedder).lookup(req(N), MODEL, "A", now=T0)).kind \
            == "exact"
    finally:
        ray.kill(other, no_restart=True)
    assert (await actor.stats.remote())["feedback_wrong"] == 1


async def test_tightening_stays_inside_the_scope(cache):
    actor, client, _ = cache
    e_key = await seed(client, E, tenant="A")
    await seed(client, N, tenant="B")
    await seed(client, E, tenant="B")
    hit = await client.lookup(req(Q), MODEL, "A", now=T0, request_id="r-a")
    assert hit.kind == "semantic"
    await recorded(actor, "hits_semantic", 1)
    assert (await actor.feedback.remote("r-a", True, T0))["evicted"] == e_key
    # tenant B's copies of the same prompts are another scope: untouched, still answering
    b = await client.lookup(req(Q), MODEL, "B", now=T0)
    assert b.kind == "semantic" and b.message["content"][0]["text"] == f"answer to {E}"


async def test_feedback_on_a_stored_answer_evicts_it_and_unknown_requests_are_reported(cache):
    actor, client, _ = cache
    key = await ask_and_store(client, "What is the boiling point of ethanol?", "r-stored")
    assert (await actor.feedback.remote("r-stored", True, T0))["evicted"] == key
    assert await actor.lookup_exact.remote(key, T0) is None
    assert await actor.feedback.remote("r-never", True, T0) == {"request_id": "r-never", "found": False,
                                                                 "evicted": None, "tightened": 0}
    ok = await ask_and_store(client, "Who painted the ceiling of the Sistine Chapel?", "r-fine")
    assert (await actor.feedback.remote("r-fine", False, T0))["evicted"] is None
    assert await actor.lookup_exact.remote(ok, T0) is not None


async def test_a_tiny_mirror_still_serves_everything_from_the_table(ray_local, tmp_path, embedder):
    settings = Settings(data_dir=tmp_path, cache=CacheSettings(mirror_max_bytes=30_000))
    actor = new_actor(settings)
    client = CacheClient(actor, settings, embedder)
    try:
        prompts = [E, "What is the capital of Australia?", "How do vaccines work?", "Why is the sky blue?"]
        for p in prompts:
            await seed(client, p)
        mem = (await actor.stats.remote())["memory"]
        assert mem["mirror_bytes"] <= 30_000 and mem["payloads_held"] < len(prompts)
        for p in prompts:  # every answer comes back, read from the table by key
            hit = await client.lookup(req(p), MODEL, "A", now=T0)
            assert hit.kind == "exact" and hit.message["content"][0]["text"] == f"answer to {p}"
        near = await client.lookup(req(Q), MODEL, "A", now=T0)
        assert near.kind == "semantic" and near.message["content"][0]["text"] == f"answer to {E}"
    finally:
        ray.kill(actor, no_restart=True)


def test_a_table_from_before_token_embeddings_opens_and_serves(tmp_path, embedder):
    import lancedb

    old_schema = pa.schema([f for f in SCHEMA if f.name not in ("tokens", "min_score")])
    vec = embedder.embed([E])[0]
    key = cp.exact_key(req(E), MODEL, "A")
    scope = cp.scope_for(req(E), MODEL, "A").scope_id()
    row = {"key": key, "scope_id": scope, "tenant": "A", "model": MODEL, "kind": "code", "prompt": E,
           "vector": vec.tolist(), "response": '{"content": []}', "cost_usd": 0.01, "created_at": T0,
           "expires_at": T0 + 3600, "hits": 0}
    db = lancedb.connect(str(tmp_path / "cache"))
    db.create_table("entries", data=pa.Table.from_pylist([row], schema=old_schema))
    store = CacheStore(tmp_path / "cache")
    assert {"tokens", "min_score"} <= set(store.table.schema.names)
    assert store.lookup_exact(key, T0)["prompt"] == E
    found = store.search(embedder.embed([Q])[0], scope, 5, T0)
    assert found and found[0]["key"] == key and found[0]["tokens"] is None  # judged by cosine alone
