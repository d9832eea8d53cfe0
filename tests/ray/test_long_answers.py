"""Answers that take longer than the base request timeout finish: long requests are streamed, and short ones get
a timeout sized to their max_tokens (tests/api/test_transport_timeouts.py has the timeout that does fire)."""

import pytest
import ray

from tests.runtime_fixtures import fake_post, fast_settings, read_billing, start_local, user_msg

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    settings = fast_settings(tmp_path_factory.mktemp("long"), cache={"enabled": False},
                             retry={"request_timeout_s": 1.0, "min_output_tokens_per_s": 10.0,
                                    "stream_above_max_tokens": 4_096, "attempts_per_model": 1,
                                    "backoff_base_s": 0.02, "backoff_max_s": 0.1})
    rt = start_local(settings)
    # 128 output tokens at 40 tokens/s: about 3 s per answer, three times the base timeout
    fake_post(rt, "/_fake/config", {"output_tokens_per_s": 40.0, "output_tokens": 128})
    yield rt
    rt.shutdown()
    ray.shutdown()


def test_a_streamed_long_request_outlives_the_base_timeout(rt):
    res = ray.get(rt.submit(user_msg("Write at length about rivers.", 8_000, model="claude-haiku-5-5")))
    assert res.message.usage.output_tokens == 128 and res.attempts == 1 and res.latency_s > 2.0
    bill = [b for b in read_billing(rt.settings) if b["runtime_request_id"] == res.request_id]
    assert [b["id"] for b in bill] == [res.message.id]


def test_a_short_request_gets_a_timeout_sized_to_its_max_tokens(rt):
    # not streamed (max_tokens under the threshold), but allowed 1 s + 200 / 10 s
    res = ray.get(rt.submit(user_msg("Describe a river delta.", 200, model="claude-haiku-5-5")))
    assert res.message.usage.output_tokens == 128 and res.latency_s > 2.0
