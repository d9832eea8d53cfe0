"""The cache actor and CacheClient on real Ray, real LanceDB (tmp_path) and the real embedding model."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest
import ray

from tests.runtime_fixtures import ray_local, stats_when  # noqa: F401 - a fixture
from actors.cache import NAMESPACE, CacheActor, CacheClient, get_or_create_cache
from runtime import cache_policy as cp
from runtime.embedding import get_embedder
from runtime.settings import CacheSettings, Settings

pytestmark = pytest.mark.ray

T0 = 1_800_000_000.0  # injected clock: every call passes now




@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def make_settings(tmp_path, **cache) -> Settings:
    return Settings(data_dir=tmp_path, cache=CacheSettings(**cache))


@pytest.fixture
def cache(ray_local, tmp_path, embedder):
    """A private cache actor (unique name, so tests do not share state) and a client for it."""
    settings = make_settings(tmp_path)
    actor = CacheActor.options(name=f"cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE,
                               lifetime="detached").remote(settings, maintenance_interval_s=0)
    ray.get(actor.ping.remote())
    yield actor, CacheClient(actor, settings, embedder), settings
    ray.kill(actor, no_restart=True)


def req(text: str, system: str | None = None, history: list | None = None, max_tokens: int = 256) -> dict:
    p = {"max_tokens": max_tokens, "messages": (history or []) + [{"role": "user", "content": text}]}
    if system:
        p["system"] = system
    return p


def answer(text: str, out_tokens: int = 20, stop: str = "end_turn") -> dict:
    return {"id": "msg_" + uuid.uuid4().hex[:6], "type": "message", "role": "assistant", "model": "m",
            "stop_reason": stop, "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": 10, "output_tokens": out_tokens}}


async def seed(client: CacheClient, params: dict, text: str, model="claude-haiku-5-5", tenant="A",
               now=T0, cost=0.01) -> None:
    out = await client.lookup(params, model, tenant, now=now)
    assert out.kind == "miss" and out.leader
    assert await client.store(out, answer(text), model, cost, now=now)


Q = "How do I reverse a list in Python?"
PARA = "How can I reverse a list in Python?"


async def test_exact_then_semantic_hit_with_saving(cache):
    actor, client, _ = cache
    await seed(client, req(Q), "Use reversed() or list.reverse().", cost=0.02)
    exact = await client.lookup(req(Q), "claude-haiku-5-5", "A", now=T0 + 1)
    assert exact.kind == "exact" and exact.message["content"][0]["text"].startswith("Use reversed")
    assert exact.saved_usd == pytest.approx(0.02)
    sem = await client.lookup(req(PARA), "claude-haiku-5-5", "A", now=T0 + 1)
    assert sem.kind == "semantic", sem.reason
    assert sem.similarity >= client._settings.cache.similarity_threshold
    # fire-and-forget counts; a miss is counted in the client and sent within a second (CacheClient._record)
    stats = await stats_when(actor, lambda st: st["hits_exact"] + st["hits_semantic"] >= 2 and st["misses"] >= 1)
    assert stats["hits_exact"] == 1 and stats["hits_semantic"] == 1 and stats["misses"] == 1
    assert stats["saved_usd"] == pytest.approx(0.04) and stats["entries"] == 1


async def test_a_semantic_hit_hands_back_the_claim_its_probe_took(cache):
    # the miss path's one trip (CacheActor.probe) claims the key before the candidates are judged: a lookup that
    # then finds a hit must not leave its own key claimed, or the next asker of that exact prompt would park
    # behind a leader that never calls the API
    actor, client, _ = cache
    await seed(client, req(Q), "Use reversed().")
    sem = await client.lookup(req(PARA), "claude-haiku-5-5", "A", now=T0 + 1, owner="reader")
    assert sem.kind == "semantic", sem.reason
    # the release was sent, not waited for, before the hit came back (an async actor need not run it before
    # the next call): wait for it to land
    deadline = time.monotonic() + 30
    while ray.get(actor.stats.remote())["claims"]:
        assert time.monotonic() < deadline, "the probe's claim was never handed back"
        await asyncio.sleep(0.02)
    again = await client.lookup(req(PARA), "claude-haiku-5-5", "A", now=T0 + 1, owner="other")
    assert again.kind == "semantic"


async def test_store_without_waiting_hands_the_answer_to_waiters_and_drain_waits_for_it(cache):
    actor, client, _ = cache
    params = req("Explain how a B-tree stays balanced")
    leader, tasks = await _gather_with_leader(client, params, 4)
    assert await client.store(leader, answer("Splits and merges."), "claude-haiku-5-5", 0.01, now=T0,
                              wait=False)
    outs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert [o.kind for o in outs if o is not leader] == ["exact"] * 3
    await client.drain()
    assert not client._puts
    assert ray.get(actor.stats.remote())["claims"] == 0
    # an answer not to keep, sent without waiting: the key is free for the next asker
    out = await client.lookup(req(Q), "claude-haiku-5-5", "A", now=T0)
    assert out.leader
    assert not await client.store(out, answer("trunc", stop="max_tokens"), "claude-haiku-5-5", 0.01, now=T0,
                                  wait=False)
    again = await client.lookup(req(Q), "claude-haiku-5-5", "A", now=T0)
    assert again.kind == "miss" and again.leader


async def test_a_paraphrase_asked_right_after_an_unawaited_store_finds_it(cache):
    # the request path sends its answer's put without waiting: a lookup in that scope waits for puts still
    # landing there, so the next question never misses an answer that was already given
    _, client, _ = cache
    pairs = [("How do I reverse a list in Python?", "How can I reverse a list in Python?"),
             ("What is the capital city of Australia?", "What's the capital city of Australia?"),
             ("How do I read a CSV file with pandas?", "How can I read a CSV file with pandas?")]
    for q, para in pairs:
        out = await client.lookup(req(q), "claude-haiku-5-5", "A", now=T0)
        assert out.kind == "miss" and out.leader
        assert await client.store(out, answer(f"answer to {q}"), "claude-haiku-5-5", 0.01, now=T0, wait=False)
        near = await client.lookup(req(para), "claude-haiku-5-5", "A", now=T0)
        assert near.kind == "semantic", (para, near.reason)
        assert near.message["content"][0]["text"] == f"answer to {q}"
    await client.drain()


@pytest.mark.parametrize("change", ["tenant", "tenant_none", "system", "model", "history"])
async def test_scope_isolation(cache, change):
    _, client, _ = cache
    await seed(client, req(Q, system="Be brief.", history=[{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]),
               "cached answer")
    params = req(Q, system="Be brief.", history=[{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}])
    model, tenant = "claude-haiku-5-5", "A"
    if change == "tenant":
        tenant = "B"
    elif change == "tenant_none":
        tenant = None
    elif change == "system":
        params["system"] = "Answer like a pirate."
    elif change == "model":
        model = "claude-opus-5-5"
    else:
        params["messages"][1]["content"] = "HELLO, what do you want?"
    out = await client.lookup(params, model, tenant, now=T0 + 1)  # identical last user text
    assert out.kind == "miss" and out.message is None


async def test_search_never_returns_another_scopes_rows(cache):
    actor, _, _ = cache
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((40, 384)).astype(np.float32)
    scopes = ["a" * 32, "b" * 32]
    entries = [{"key": f"{i:064x}", "scope_id": scopes[i % 2], "prompt": f"p{i}", "vector": vecs[i],
                "response": "{}", "expires_at": T0 + 100} for i in range(40)]
    ray.get(actor.put_many.remote(entries))
    for i in range(0, 40, 7):
        other = scopes[(i + 1) % 2]
        rows = ray.get(actor.search.remote(vecs[i], other, 10, T0))
        assert rows and all(r["scope_id"] == other for r in rows)
        assert f"{i:064x}" not in {r["key"] for r in rows}
        own = ray.get(actor.search.remote(vecs[i], scopes[i % 2], 1, T0))
        assert own[0]["key"] == f"{i:064x}" and own[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(actor.search.remote(vecs[0], "x' OR '1'='1", 5, T0))


async def test_guard_blocks_near_miss_above_threshold(cache):
    _, client, _ = cache
    await seed(client, req("Is it safe to eat raw chicken?"), "No.")
    out = await client.lookup(req("Is it not safe to eat raw chicken?"), "claude-haiku-5-5", "A", now=T0 + 1)
    assert out.kind == "miss" and out.reason and "negation" in out.reason


async def test_ttl_expiry_via_now(cache):
    actor, client, settings = cache
    await seed(client, req("What is the capital of Australia?"), "Canberra.", now=T0)
    ttl = settings.cache.ttl_factual_s
    assert (await client.lookup(req("What is the capital of Australia?"), "claude-haiku-5-5", "A",
                                now=T0 + ttl - 1)).kind == "exact"
    assert (await client.lookup(req("What's the capital of Australia?"), "claude-haiku-5-5", "A",
                                now=T0 + ttl - 1)).kind == "semantic"
    late = T0 + ttl + 1
    assert (await client.lookup(req("What is the capital of Australia?"), "claude-haiku-5-5", "A",
                                now=late)).kind == "miss"
    assert (await client.lookup(req("What's the capital of Australia?"), "claude-haiku-5-5", "A",
                                now=late)).kind == "miss"
    assert ray.get(actor.evict_expired.remote(late)) == 1
    stats = ray.get(actor.stats.remote())
    assert stats["entries"] == 0 and stats["evictions"] == 1


async def test_code_answers_live_longer_than_facts(cache):
    actor, client, settings = cache
    await seed(client, req(Q), "reversed()", now=T0)
    row = ray.get(actor.lookup_exact.remote(cp.exact_key(req(Q), "claude-haiku-5-5", "A"), T0))
    assert row["kind"] == "code" and row["expires_at"] == pytest.approx(T0 + settings.cache.ttl_code_s)


async def test_bypass_never_reads_or_writes(cache):
    actor, client, _ = cache
    out = await client.lookup(req("What is the weather in Paris today?"), "claude-haiku-5-5", "A", now=T0)
    assert out.kind == "bypass" and "weather" in out.reason
    assert not await client.store(out, answer("Sunny."), "claude-haiku-5-5", 0.01, now=T0)
    off = await client.lookup(req(Q), "claude-haiku-5-5", "A", cache_enabled=False, now=T0)
    assert off.kind == "bypass"
    stats = await stats_when(actor, lambda st: st["bypasses"] >= 2)
    assert stats["entries"] == 0 and stats["bypasses"] == 2


async def test_unstorable_answer_is_not_cached_and_frees_the_key(cache):
    _, client, _ = cache
    out = await client.lookup(req(Q), "claude-haiku-5-5", "A", now=T0)
    assert out.leader
    assert not await client.store(out, answer("trunc", stop="max_tokens"), "claude-haiku-5-5", 0.01, now=T0)
    again = await client.lookup(req(Q), "claude-haiku-5-5", "A", now=T0)
    assert again.kind == "miss" and again.leader  # released, not stuck behind a claim


async def test_cached_answer_longer_than_max_tokens_is_not_served(cache):
    _, client, _ = cache
    out = await client.lookup(req(Q, max_tokens=1000), "claude-haiku-5-5", "A", now=T0)
    await client.store(out, answer("long answer", out_tokens=500), "claude-haiku-5-5", 0.01, now=T0)
    assert (await client.lookup(req(Q, max_tokens=1000), "claude-haiku-5-5", "A", now=T0)).kind == "exact"
    small = await client.lookup(req(Q, max_tokens=100), "claude-haiku-5-5", "A", now=T0)
    assert small.kind == "miss"


async def _gather_with_leader(client: CacheClient, params: dict, n: int):
    tasks = [asyncio.ensure_future(client.lookup(params, "claude-haiku-5-5", "A", now=T0)) for _ in range(n)]
    leader = None
    pending = set(tasks)
    while leader is None:
        done, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no lookup finished: nobody became leader"
        for t in done:
            out = t.result()
            assert out.kind == "miss" and out.leader, f"a follower finished before the leader: {out.kind}"
            leader = out
    assert len(pending) == n - 1
    deadline = time.monotonic() + 30
    while ray.get(client._actor.stats.remote())["waiting"] < n - 1:  # everyone else parks behind the leader
        assert time.monotonic() < deadline, "followers did not park in wait()"
        await asyncio.sleep(0.05)
    return leader, tasks


async def test_single_flight_twenty_concurrent_lookups(cache):
    actor, client, _ = cache
    params = req("Explain how a hash map handles collisions")
    leader, tasks = await _gather_with_leader(client, params, 20)
    await asyncio.sleep(0.3)
    assert sum(t.done() for t in tasks) == 1  # followers stay parked until the leader stores
    assert await client.store(leader, answer("Chaining or open addressing."), "claude-haiku-5-5", 0.03,
                              now=T0)
    outs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    leaders = [o for o in outs if o.leader]
    followers = [o for o in outs if not o.leader]
    assert len(leaders) == 1 and len(followers) == 19
    assert all(o.kind == "exact" and o.message["content"][0]["text"] == "Chaining or open addressing."
               for o in followers)
    assert all(o.saved_usd == pytest.approx(0.03) for o in followers)
    assert ray.get(actor.stats.remote())["claims"] == 0


async def test_failed_leader_releases_waiters(cache):
    _, client, _ = cache
    params = req("Summarise the causes of the French Revolution")
    leader, tasks = await _gather_with_leader(client, params, 5)
    await client.release(leader)  # the API call failed
    outs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    rest = [o for o in outs if o is not leader]
    assert len(rest) == 4 and all(o.kind == "miss" for o in rest)
    assert sum(o.leader for o in rest) == 1  # exactly one waiter takes over the key


async def test_restart_keeps_entries(ray_local, tmp_path, embedder):
    settings = make_settings(tmp_path)
    name = f"cache-{uuid.uuid4().hex[:8]}"
    actor = CacheActor.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(
        settings, maintenance_interval_s=0)
    client = CacheClient(actor, settings, embedder)
    try:
        await seed(client, req(Q), "reversed()")
        life = ray.get(actor.ping.remote())
        ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1) without its memory
        deadline = time.monotonic() + 60
        while True:  # kill is asynchronous: wait for the new life, not an answer from the old one
            try:
                if ray.get(actor.ping.remote(), timeout=10) != life:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline, "actor did not come back"
            await asyncio.sleep(0.2)
        while True:
            out = await client.lookup(req(Q), "claude-haiku-5-5", "A", now=T0 + 5)
            if out.reason != "cache unavailable":  # while it restarts, lookups degrade to misses
                break
            assert time.monotonic() < deadline, "actor did not come back"
            await asyncio.sleep(0.5)
        assert out.kind == "exact"
        sem = await client.lookup(req(PARA), "claude-haiku-5-5", "A", now=T0 + 5)
        assert sem.kind == "semantic", sem.reason
    finally:
        ray.kill(actor, no_restart=True)


async def test_size_cap_evicts_least_used(ray_local, tmp_path):
    settings = make_settings(tmp_path, max_entries=10)
    actor = CacheActor.options(name=f"cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE,
                               lifetime="detached").remote(settings, maintenance_interval_s=0)
    try:
        rng = np.random.default_rng(1)
        entries = [{"key": f"{i:064x}", "scope_id": "c" * 32, "prompt": f"p{i}",
                    "vector": rng.standard_normal(384), "response": "{}", "created_at": T0 + i,
                    "expires_at": T0 + 10_000} for i in range(10)]
        ray.get(actor.put_many.remote(entries))
        ray.get(actor.record.remote("exact", 0.0, f"{0:064x}"))  # the oldest, but used
        more = [{**e, "key": f"{i + 10:064x}", "created_at": T0 + 10 + i} for i, e in enumerate(entries[:5])]
        ray.get(actor.put_many.remote(more))
        stats = ray.get(actor.stats.remote())
        assert stats["entries"] <= 10 and stats["evictions"] >= 5
        assert ray.get(actor.lookup_exact.remote(f"{0:064x}", T0)) is not None  # hit rows survive
        assert ray.get(actor.lookup_exact.remote(f"{1:064x}", T0)) is None  # oldest unused row went first
        assert ray.get(actor.maintain.remote(T0))["hits_flushed"] == 1
    finally:
        ray.kill(actor, no_restart=True)


def test_get_or_create_cache_is_one_singleton(ray_local, tmp_path):
    settings = make_settings(tmp_path)
    a = get_or_create_cache(settings, maintenance_interval_s=0)
    b = get_or_create_cache(settings, maintenance_interval_s=0)
    try:
        assert a._actor_id == b._actor_id
        assert ray.get_actor("cache", namespace=NAMESPACE)._actor_id == a._actor_id
    finally:
        ray.kill(a, no_restart=True)


async def test_waiters_never_outwait_a_leader_that_stopped_renewing_nor_their_own_deadline(tmp_path):
    from actors.cache import CacheService

    svc = CacheService(make_settings(tmp_path), maintenance_interval_s=0, claim_lease_s=0.5)
    key = "ab" * 16
    assert await svc.claim(key, owner="caller-0|life-1|e1")
    # a waiter with a short deadline gives up at its deadline, though the leader is alive
    t0 = time.monotonic()
    assert await svc.wait(key, timeout_s=0.1) is None
    assert time.monotonic() - t0 < 0.45
    # the leader's caller died: no renewals, so its claim lapses and waiters go to the API themselves
    t0 = time.monotonic()
    assert await svc.wait(key, timeout_s=240) is None
    assert time.monotonic() - t0 < 5
    assert await svc.claim(key, owner="caller-1|life-9|e2")


async def test_a_restarted_caller_takes_over_its_dead_life_claim_at_once(tmp_path):
    from actors.cache import CacheService

    svc = CacheService(make_settings(tmp_path), maintenance_interval_s=0, claim_lease_s=60)
    key = "cd" * 16
    assert await svc.claim(key, owner="caller-0|life-1|e1")
    assert not await svc.claim(key, owner="caller-1|life-3|e7")   # another live caller waits
    assert await svc.claim(key, owner="caller-0|life-2|e1")       # the same caller, restarted: its old self is gone
    assert await svc.renew(key, owner="caller-0|life-2|e1")
    assert not await svc.renew(key, owner="caller-0|life-1|e1")


# -- where the table lives: a path, or a URI handed to LanceDB ------------------------------------------------------

def _row(key: str) -> dict:
    vec = np.random.default_rng(int(key[:6], 16)).standard_normal(384).astype(np.float32)
    return {"key": key, "scope_id": "ab" * 16, "tenant": "t", "model": "m", "kind": "factual", "prompt": "p",
            "vector": vec, "response": "{}", "cost_usd": 0.01, "created_at": T0, "expires_at": T0 + 3600, "hits": 0}


def _put(store, key: str) -> None:
    from actors.cache import CacheService

    row = CacheService._validate(_row(key))
    store.write([row])
    store.apply([row])


def test_the_quick_search_finds_what_the_search_finds_and_declines_what_needs_the_table(tmp_path):
    # the probe searches on the actor's loop when the scope is a small matmul with every payload held, and in a
    # thread otherwise: both must give the same rows in the same order
    from actors.cache import CacheService, CacheStore

    store = CacheStore(tmp_path / "quick")
    rng = np.random.default_rng(7)
    scopes = ["ab" * 16, "cd" * 16]
    rows = []
    for i in range(60):
        rows.append(CacheService._validate({
            "key": f"{i:064x}", "scope_id": scopes[i % 2], "prompt": f"prompt {i}", "response": "{}",
            "vector": rng.standard_normal(384).astype(np.float32), "expires_at": T0 + 3_600, "created_at": T0}))
    store.write(rows)
    store.apply(rows)
    for j in range(10):
        q = rows[j]["vector"] + 0.5 * rng.standard_normal(384).astype(np.float32)
        for scope in scopes:
            quick = store.search_quick(q, scope, 5, T0 + 1, -1.0)
            full = store.search(q, scope, 5, T0 + 1, -1.0)
            assert quick is not None and len(quick) == 5
            assert [(r["key"], r["similarity"], r["prompt"]) for r in quick] == \
                [(r["key"], r["similarity"], r["prompt"]) for r in full]
            assert all(r["scope_id"] == scope for r in quick)
    assert store.search_quick(rows[0]["vector"], "ef" * 16, 5, T0, -1.0) == []   # an empty scope
    assert store.search_quick(rows[0]["vector"], scopes[0], 5, T0 + 7_200, -1.0) == []   # all expired
    store._payload.clear()   # the mirror let the answers go: they are read back from the table, off the loop
    assert store.search_quick(rows[0]["vector"], scopes[0], 5, T0 + 1, -1.0) is None
    assert store.search(rows[0]["vector"], scopes[0], 5, T0 + 1, -1.0)[0]["key"] == rows[0]["key"]


def test_a_file_uri_is_a_table_that_outlives_its_store(tmp_path):
    from actors.cache import CacheStore

    uri = f"file://{tmp_path}/remote-cache"
    store = CacheStore(uri)
    assert store.uri == uri and store.path is None and store.disk_bytes() is None
    _put(store, "a1" * 16)
    reopened = CacheStore(uri)
    assert reopened.lookup_exact("a1" * 16, T0) is not None
    assert (tmp_path / "remote-cache").is_dir()


def test_an_object_store_uri_goes_to_lancedb_not_to_a_local_folder(tmp_path, monkeypatch):
    from actors.cache import CacheStore

    monkeypatch.chdir(tmp_path)
    mem = CacheStore("memory://claude-runtime-test")   # an object store that needs no network
    _put(mem, "b2" * 16)
    assert mem.lookup_exact("b2" * 16, T0) is not None and mem.uri == "memory://claude-runtime-test"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(Exception) as exc:   # nothing reaches S3 from here: LanceDB's own error shows it tried
        CacheStore("s3://claude-runtime-no-such-bucket/cache", storage_options={"region": "us-east-1"})
    assert "AWS" in str(exc.value) or "credential" in str(exc.value).lower() or "s3" in str(exc.value).lower()
    assert list(tmp_path.iterdir()) == []   # no "s3:" or "memory:" folder was made here
