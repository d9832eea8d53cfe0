"""The batch path: Message Batches at half price, progress, results in order, every billed result in the ledger."""

import pytest
import ray

from runtime.errors import InvalidRequest, UpstreamError
from runtime.pricing import price
from runtime.result import Result
from runtime.usage import Usage
from tests.runtime_fixtures import fast_settings, read_billing, start_local, user_msg


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    rt = start_local(fast_settings(tmp_path_factory.mktemp("batch"), cache={"enabled": False}),
                     fake_api_overrides={"batch_seconds": 1.0})
    yield rt
    rt.shutdown()
    ray.shutdown()


def test_batch_results_are_half_price_in_order_and_in_the_ledger(rt):
    reqs = [user_msg(f"Summarize document number {i} in one line.", 64) for i in range(12)]
    out = rt.submit_batch(reqs, user_id="offline", tenant="acme", poll_s=0.2, progress=False)
    assert len(out) == 12 and all(isinstance(r, Result) for r in out)
    for r in out:
        usage = Usage.from_api(r.message.usage)
        full = price(usage, r.model, rt.settings).total_usd
        assert r.cost_usd == pytest.approx(full / 2)
    billing = [b for b in read_billing(rt.settings) if b["batch"]]
    rows = [x for x in rt.ledger_records() if x["batch"]]
    assert {b["id"] for b in billing} == {x["message_id"] for x in rows} == {r.message.id for r in out}
    assert sum(x["cost_usd"] for x in rows) == pytest.approx(sum(r.cost_usd for r in out))
    # the batch id was recorded as soon as it was known, with the requests it carries
    (recorded,) = [b for b in ray.get(rt.ledger.batches.remote()) if set(b["request_ids"]) == {r.request_id for r in out}]
    assert recorded["batch_id"] in {b["batch_id"] for b in billing}
    # same prompt through the batch and the real-time path: same text, half the price
    live = ray.get(rt.submit(reqs[0], cache=False))
    assert live.message.content[0].text == out[0].message.content[0].text
    assert out[0].cost_usd == pytest.approx(live.cost_usd / 2)


def test_bad_input_refuses_the_whole_batch_before_sending(rt):
    with pytest.raises(InvalidRequest):
        rt.submit_batch([user_msg("fine", 16), user_msg("bad", 16, temperature=1.0)], progress=False)


def test_a_batch_the_api_never_created_leaves_no_reservation_and_no_open_intent(rt):
    # last in this module: it stops the API
    before = ray.get(rt.ledger.stats.remote())["outstanding_reservations"]
    ray.get(rt.fake_api.stop.remote())
    with pytest.raises(UpstreamError):
        rt.submit_batch([user_msg(f"never sent {i}", 16) for i in range(3)], progress=False, poll_s=0.1)
    assert ray.get(rt.ledger.stats.remote())["outstanding_reservations"] == before
    assert ray.get(rt.ledger.pending_intents.remote()) == []
