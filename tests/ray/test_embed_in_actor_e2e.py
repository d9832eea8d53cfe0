"""The whole request path with ``cache.embed_in_actor``: real Ray, the embedded API through the real SDK, the
in-process caller and the caller actors, judged against the API's billing log."""

import pytest
import ray

from tests.runtime_fixtures import fake_stats, fast_settings, read_billing, start_local, user_msg, wait_for


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    settings = fast_settings(tmp_path_factory.mktemp("embed-in-actor"), cache={"embed_in_actor": True},
                             callers={"num_callers": 1, "in_process": True})
    rt = start_local(settings)
    wait_for(lambda: rt.stats()["cache"]["embedding"]["loaded"], "the cache actor's model", timeout_s=120)
    yield rt
    rt.shutdown()
    ray.shutdown()


def _billed(rt) -> int:
    rt.flush()
    return len(read_billing(rt.settings))


def test_miss_exact_and_paraphrase_are_billed_once_in_process_and_through_an_actor(rt):
    before, embedded = _billed(rt), rt.stats()["cache"]["embedding"]["embedded_here"]
    q = "Explain how a hash map resolves collisions."
    first = rt.call(user_msg(q, 300), tenant="acme")
    assert first.cache == "miss" and first.attempts == 1 and first.cost_usd > 0
    # the write goes out just after the answer: the next question, at once and from another process, finds it
    near = ray.get(rt.submit(user_msg("Explain how a hash map resolves a collision.", 300), tenant="acme"))
    assert near.cache == "semantic", near
    assert near.message.content[0].text == first.message.content[0].text and near.cost_usd == 0
    again = rt.call(user_msg(q, 300), tenant="acme")
    assert again.cache == "exact" and again.attempts == 0
    other = rt.call(user_msg(q, 300), tenant="globex")   # another tenant's scope: its own answer
    assert other.cache == "miss"
    assert _billed(rt) == before + 2
    ids = {first.request_id, near.request_id, again.request_id, other.request_id}
    rows = [r for r in rt.ledger_records() if r["request_id"] in ids]
    assert sorted(r["cache"] for r in rows) == ["exact", "miss", "miss", "semantic"]
    # the miss, the paraphrase and the other tenant were embedded by the cache actor; the exact hit by nobody
    assert rt.stats()["cache"]["embedding"]["embedded_here"] == embedded + 3


def test_twenty_concurrent_identical_requests_make_one_api_call(rt):
    before = fake_stats(rt)["requests"]
    q = user_msg("Describe how tides follow the moon, for a ten year old.", 300)
    out = ray.get([rt.submit(q, tenant="single-flight") for _ in range(20)])
    assert fake_stats(rt)["requests"] == before + 1
    assert sorted(r.cache for r in out).count("miss") == 1
    assert {r.message.content[0].text for r in out} == {out[0].message.content[0].text}


def test_a_restarted_cache_actor_serves_from_disk_while_its_model_reloads(rt):
    q = "What does the Krebs cycle produce?"
    first = rt.call(user_msg(q, 300), tenant="restart")
    assert first.cache == "miss"
    rt.flush()   # the answer's write has landed on disk
    life = ray.get(rt.cache.ping.remote())
    ray.kill(rt.cache, no_restart=False)
    wait_for(lambda: _ping(rt) not in (None, life), "the cache actor's next life", timeout_s=120)
    before = _billed(rt)
    # the restarted actor reads its table back; until its model has loaded, lookups are embedded by the pool
    near = rt.call(user_msg("What does the Krebs cycle make?", 300), tenant="restart")
    assert near.cache == "semantic", near
    exact = rt.call(user_msg(q, 300), tenant="restart")
    assert exact.cache == "exact"
    assert _billed(rt) == before
    # this life's counts: the paraphrase embedded once, here or (model still loading) in the pool; the exact
    # hit not at all
    emb = rt.stats()["cache"]["embedding"]
    assert emb["embedded_here"] + emb["sent_to_pool"] == 1
    wait_for(lambda: rt.stats()["cache"]["embedding"]["loaded"], "the model loaded again", timeout_s=120)


def _ping(rt):
    try:
        return ray.get(rt.cache.ping.remote(), timeout=5)
    except Exception:  # noqa: BLE001 - dead or restarting
        return None


def test_a_hit_gives_back_the_grant_admitted_while_it_was_looked_up(rt):
    book = rt._local.caller.pipeline.ports.admission.book
    haiku = rt.settings.router.haiku_model

    def leased() -> bool:
        return any(k.endswith("/haiku") and v["expires_in_s"] > 1.0 for k, v in book.snapshot().items()
                   if k != "stats")

    # demand shows up and the in-process caller is leased a slice of haiku's buckets
    for i in range(4):
        rt.call(user_msg(f"Name a prime number above {i * 10}.", 64, model=haiku), cache=False)
    q = user_msg("Which gas do plants take in for photosynthesis?", 300, model=haiku)
    first = rt.call(q, tenant="early")
    assert first.cache == "miss"
    wait_for(leased, "a haiku lease with a second left", timeout_s=30)
    local = book.stats["local"]
    again = rt.call(q, tenant="early")
    assert again.cache == "exact" and again.attempts == 0
    # admitted on the lease while the cache looked up, and handed back when the cache answered
    assert book.stats["local"] == local + 1
    assert all(v["inflight"] == 0 for k, v in book.snapshot().items() if k != "stats")
