"""Pricing: every token kind, cache TTLs, long-context tiers, batch discount, unknown models."""

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from runtime.errors import UnknownModel
from runtime.pricing import CostBreakdown, max_cost, price
from runtime.settings import ModelInfo, PriceTier, Settings
from runtime.usage import Usage

pytestmark = pytest.mark.pure

S = Settings()
M = 1_000_000


def test_sonnet_all_four_token_kinds():
    # $2 / $10, writes 1.25x (5 m) and 2x (1 h) input, reads 0.1x input
    c = price(Usage(input_tokens=M, output_tokens=M, cache_write_5m_tokens=M, cache_write_1h_tokens=M,
                    cache_read_tokens=M), "claude-sonnet-5-5", S)
    assert c.input_usd == pytest.approx(2.0)
    assert c.output_usd == pytest.approx(10.0)
    assert c.cache_write_usd == pytest.approx(2.5 + 4.0)
    assert c.cache_read_usd == pytest.approx(0.2)
    assert c.total_usd == pytest.approx(2 + 10 + 6.5 + 0.2)
    assert c.batch is False


def test_five_minute_and_one_hour_writes_are_priced_apart():
    five = price(Usage(cache_write_5m_tokens=1000), "claude-opus-5-5", S)
    hour = price(Usage(cache_write_1h_tokens=1000), "claude-opus-5-5", S)
    assert five.cache_write_usd == pytest.approx(1000 * 4.0 * 1.25 / M)
    assert hour.cache_write_usd == pytest.approx(1000 * 4.0 * 2.0 / M)
    assert hour.total_usd > five.total_usd


def test_haiku_55_published_cache_rates_in_low_tier():
    c = price(Usage(input_tokens=1000, output_tokens=1000, cache_write_5m_tokens=1000,
                    cache_write_1h_tokens=1000, cache_read_tokens=1000), "claude-haiku-5-5", S)
    assert c.input_usd == pytest.approx(0.10e-3)
    assert c.output_usd == pytest.approx(0.50e-3)
    assert c.cache_write_usd == pytest.approx(0.125e-3 + 0.20e-3)
    assert c.cache_read_usd == pytest.approx(0.01e-3)


def test_haiku_55_long_context_tier_switches_above_100k_prompt_tokens():
    at = price(Usage(input_tokens=100_000, output_tokens=1000), "claude-haiku-5-5", S)
    above = price(Usage(input_tokens=100_001, output_tokens=1000), "claude-haiku-5-5", S)
    assert at.input_usd == pytest.approx(100_000 * 0.10 / M)
    assert at.output_usd == pytest.approx(1000 * 0.50 / M)
    assert above.input_usd == pytest.approx(100_001 * 0.50 / M)
    assert above.output_usd == pytest.approx(1000 * 2.50 / M)
    # the tier is chosen by the whole prompt: cache reads push a small uncached input into the high tier
    mixed = price(Usage(input_tokens=10, cache_read_tokens=100_000), "claude-haiku-5-5", S)
    assert mixed.input_usd == pytest.approx(10 * 0.50 / M)
    assert mixed.cache_read_usd == pytest.approx(100_000 * 0.05 / M)  # high tier's default 0.1x


def test_batch_halves_every_component():
    u = Usage(input_tokens=12_345, output_tokens=6_789, cache_write_5m_tokens=111, cache_write_1h_tokens=222,
              cache_read_tokens=333)
    full = price(u, "claude-sonnet-5-5", S)
    half = price(u, "claude-sonnet-5-5", S, batch=True)
    assert half.batch is True
    for f in ("input_usd", "output_usd", "cache_write_usd", "cache_read_usd", "total_usd"):
        assert getattr(half, f) == pytest.approx(getattr(full, f) / 2)


def test_unknown_model_is_an_error_never_zero():
    with pytest.raises(UnknownModel) as e:
        price(Usage(input_tokens=10), "claude-imaginary-9", S)
    assert "claude-imaginary-9" in str(e.value)
    with pytest.raises(UnknownModel):
        max_cost("claude-imaginary-9", 10, 10, S)


def test_configured_model_prices_come_from_settings():
    s = Settings(models={**S.models, "my-model": ModelInfo(model_class="sonnet",
                                                            prices=(PriceTier(input=1.0, output=3.0),))})
    assert price(Usage(input_tokens=M, output_tokens=M), "my-model", s).total_usd == pytest.approx(4.0)


def test_breakdown_round_trips():
    c = price(Usage(input_tokens=5, output_tokens=7), "claude-opus-4-1", S, batch=True)
    assert CostBreakdown.from_dict(c.to_dict()) == c


def test_max_cost_bounds_the_real_cost():
    # whatever the prompt's split into uncached / written / read tokens, the reservation covers it
    est, out = 50_000, 2_000
    worst = max_cost("claude-haiku-5-5", est, out, S)
    for u in (Usage(input_tokens=est, output_tokens=out), Usage(cache_write_1h_tokens=est, output_tokens=out),
              Usage(cache_write_5m_tokens=est, output_tokens=out), Usage(cache_read_tokens=est, output_tokens=out)):
        assert price(u, "claude-haiku-5-5", S).total_usd <= worst + 1e-12


def test_max_cost_near_a_tier_boundary_uses_the_higher_tier():
    # 90k estimated could really be 117k: reserve 117k tokens at long-context rates
    assert max_cost("claude-haiku-5-5", 90_000, 0, S) == pytest.approx(117_000 * 0.50 * 2.0 / M)
    assert max_cost("claude-haiku-5-5", 10_000, 1_000, S) == pytest.approx((13_000 * 0.20 + 1_000 * 0.50) / M)
    # 80k estimated, really 101k (within the 30 % the estimate may be low): the reservation covers the real
    # long-context price
    real = price(Usage(input_tokens=101_000, output_tokens=8_000), "claude-haiku-5-5", S).total_usd
    assert max_cost("claude-haiku-5-5", 80_000, 8_000, S) >= real
    assert max_cost("claude-sonnet-5-5", 1000, 1000, S, batch=True) == pytest.approx(
        max_cost("claude-sonnet-5-5", 1000, 1000, S) / 2)


counts = st.integers(min_value=0, max_value=400_000)
KINDS = ("input_tokens", "output_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_read_tokens")


@hsettings(max_examples=300, deadline=None)
@given(base=st.fixed_dictionaries({k: counts for k in KINDS}), kind=st.sampled_from(KINDS),
       extra=st.integers(min_value=1, max_value=200_000),
       model=st.sampled_from(sorted(S.models)), batch=st.booleans())
def test_price_is_monotone_in_each_count(base, kind, extra, model, batch):
    u1 = Usage(**base)
    u2 = Usage(**{**base, kind: base[kind] + extra})
    c1, c2 = price(u1, model, S, batch=batch), price(u2, model, S, batch=batch)
    assert c2.total_usd > c1.total_usd
    assert c1.total_usd == pytest.approx(c1.input_usd + c1.output_usd + c1.cache_write_usd + c1.cache_read_usd)


@hsettings(max_examples=200, deadline=None)
@given(est=st.integers(0, 300_000), extra=st.integers(1, 100_000), out=st.integers(0, 64_000),
       model=st.sampled_from(sorted(S.models)))
def test_max_cost_is_monotone(est, extra, out, model):
    assert max_cost(model, est + extra, out, S) > max_cost(model, est, out, S)
    assert max_cost(model, est, out + extra, S) > max_cost(model, est, out, S)
