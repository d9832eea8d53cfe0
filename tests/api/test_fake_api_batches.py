"""Message Batches in the fake API through the SDK: create, progress, results, cancel, list, delete, billing."""

from __future__ import annotations

import asyncio
import time

import anthropic
import pytest

from runtime.fake_api import read_billing
from runtime.settings import ClassLimits
from tests.fake_api_fixtures import HAIKU, SONNET, async_client, client, start_server, user


def _req(cid, text="hello", model=HAIKU, **params):
    return {"custom_id": cid, "params": {"model": model, "max_tokens": 50, "messages": user(text), **params}}


def _wait_ended(c, bid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        b = c.messages.batches.retrieve(bid)
        if b.processing_status == "ended" or time.monotonic() > deadline:
            return b
        time.sleep(0.05)


def test_lifecycle_results_and_batch_billing(tmp_path):
    # tiny per-minute limits: batch traffic must not be subject to them
    lim = {k: ClassLimits(rpm=1, itpm=10, otpm=10) for k in ("haiku", "sonnet", "opus", "fable")}
    with start_server(tmp_path, limits=lim, batch_seconds=0.3) as s:
        c = client(s)
        reqs = [_req("a", "first"), _req("b", "second", model=SONNET), _req("bad", "x", model="claude-nope"),
                _req("c", "first")]
        b = c.messages.batches.create(requests=reqs)
        assert b.processing_status == "in_progress" and b.results_url is None
        assert b.request_counts.processing == 4 and b.request_counts.succeeded == 0
        ended = _wait_ended(c, b.id)
        assert ended.processing_status == "ended" and ended.ended_at is not None
        assert ended.results_url.startswith(s.url)
        rc = ended.request_counts
        assert (rc.processing, rc.succeeded, rc.errored, rc.canceled) == (0, 3, 1, 0)
        results = {r.custom_id: r.result for r in c.messages.batches.results(b.id)}
        assert set(results) == {"a", "b", "bad", "c"}
        assert results["bad"].type == "errored" and results["bad"].error.error.type == "not_found_error"
        a = results["a"].message
        assert results["a"].type == "succeeded" and a.usage.service_tier == "batch"
        assert a.content[0].text == results["c"].message.content[0].text  # same prompt, same text
        s.configure(limits=None)
        direct = c.messages.create(model=HAIKU, max_tokens=50, messages=user("first"))
        assert direct.content[0].text == a.content[0].text
        lines = [l for l in read_billing(tmp_path / "billing.jsonl") if l["batch"]]
        assert sorted(l["custom_id"] for l in lines) == ["a", "b", "c"]
        by_id = {l["id"]: l for l in lines}
        assert by_id[a.id]["input_tokens"] == a.usage.input_tokens
        assert by_id[a.id]["output_tokens"] == a.usage.output_tokens
        assert by_id[a.id]["batch_id"] == b.id
        assert s.stats()["batch_requests"] == 4


def test_cancel_ends_with_canceled_requests(tmp_path):
    with start_server(tmp_path, batch_seconds=30) as s:
        c = client(s)
        b = c.messages.batches.create(requests=[_req(f"r{i}") for i in range(5)])
        canceled = c.messages.batches.cancel(b.id)
        assert canceled.processing_status == "canceling" and canceled.cancel_initiated_at is not None
        ended = _wait_ended(c, b.id)
        assert ended.processing_status == "ended"
        assert ended.request_counts.canceled == 5 and ended.request_counts.succeeded == 0
        assert {r.result.type for r in c.messages.batches.results(b.id)} == {"canceled"}
        assert not [l for l in read_billing(tmp_path / "billing.jsonl") if l["batch"]]


def test_list_paginates_newest_first_and_delete(tmp_path):
    with start_server(tmp_path, batch_seconds=0.05) as s:
        c = client(s)
        ids = [c.messages.batches.create(requests=[_req("x")]).id for _ in range(5)]
        page = c.messages.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
        assert [b.id for b in c.messages.batches.list(limit=2)] == ids[::-1]  # auto-pagination walks all
        running = c.messages.batches.create(requests=[_req("y")]).id
        with pytest.raises(anthropic.BadRequestError):  # an unfinished batch cannot be deleted
            c.messages.batches.delete(running)
        _wait_ended(c, ids[0])
        assert c.messages.batches.delete(ids[0]).type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            c.messages.batches.retrieve(ids[0])


def test_batch_validation(tmp_path):
    with start_server(tmp_path) as s:
        c = client(s)
        with pytest.raises(anthropic.BadRequestError):
            c.messages.batches.create(requests=[])
        with pytest.raises(anthropic.BadRequestError):
            c.messages.batches.create(requests=[_req("dup"), _req("dup")])
        with pytest.raises(anthropic.BadRequestError):
            c.messages.batches.create(requests=[_req("has space")])


async def test_async_client_batches(tmp_path):
    with start_server(tmp_path, batch_seconds=0.1) as s:
        async with async_client(s) as ac:
            b = await ac.messages.batches.create(requests=[_req("a"), _req("b", "other")])
            for _ in range(200):
                b = await ac.messages.batches.retrieve(b.id)
                if b.processing_status == "ended":
                    break
                await asyncio.sleep(0.02)
            assert b.processing_status == "ended"
            got = [r.custom_id async for r in await ac.messages.batches.results(b.id)]
            assert sorted(got) == ["a", "b"]
