"""Prompt-cache savings from ledger rows: what `rt.prompt_cache_savings` and `claude-runtime report` show."""

import io

import pytest

from runtime import prompt_cache as pc
from runtime.pricing import price
from runtime.records import Record
from runtime.report import render, summarize
from runtime.settings import Settings
from runtime.usage import Usage

S = Settings()
SONNET, HAIKU = "claude-sonnet-5-5", "claude-haiku-5-5"


def row(model, usage, *, ts=1_000.0, billed=True, batch=False, i=[0]):
    i[0] += 1
    return Record(request_id=f"r{i[0]}", attempt=1, message_id=f"msg_{i[0]}" if billed else None, ts=ts,
                  user_id=None, tenant=None, priority="normal", model=model, usage=usage,
                  cost=price(usage, model, S, batch=batch) if billed else None, batch=batch).to_row()


def test_reads_writes_and_savings_per_model_and_in_total():
    write = Usage(input_tokens=20, output_tokens=10, cache_write_5m_tokens=5_000)
    read = Usage(input_tokens=20, output_tokens=10, cache_read_tokens=5_000)
    rows = [row(SONNET, write)] + [row(SONNET, read) for _ in range(9)] + [row(HAIKU, Usage(30, 5))]
    rows.append(row(SONNET, read, billed=False))     # an error row: not a call, never counted
    s = pc.savings_summary(rows, S)
    assert (s["calls"], s["reads"], s["writes"]) == (11, 9, 1)
    assert (s["read_tokens"], s["write_tokens"]) == (45_000, 5_000)
    expected = pc.savings(write, SONNET, S) + 9 * pc.savings(read, SONNET, S)
    assert s["saved_usd"] == pytest.approx(expected)
    # $2/M input: 50k cached tokens would have cost $0.10; they cost one 1.25x write and nine 0.1x reads
    assert s["as_input_usd"] == pytest.approx(0.10)
    assert s["write_usd"] == pytest.approx(5_000 * 2.5e-6) and s["read_usd"] == pytest.approx(45_000 * 0.2e-6)
    assert s["by_model"][HAIKU]["calls"] == 1 and s["by_model"][HAIKU]["saved_usd"] == 0
    assert s["by_model"][SONNET]["saved_usd"] == pytest.approx(s["saved_usd"])


def test_a_write_never_read_is_a_negative_saving_and_batch_rows_are_half_price():
    w = Usage(input_tokens=10, cache_write_5m_tokens=4_000)
    assert pc.savings_summary([row(SONNET, w)], S)["saved_usd"] == pytest.approx(-4_000 * 0.5e-6)
    r = Usage(input_tokens=10, cache_read_tokens=4_000)
    assert pc.savings_summary([row(SONNET, r, batch=True)], S)["saved_usd"] == pytest.approx(
        pc.savings(r, SONNET, S, batch=True))


def test_a_model_no_longer_configured_is_counted_but_not_priced():
    r = row(SONNET, Usage(input_tokens=10, cache_read_tokens=4_000))
    r["model"] = "claude-retired-1"
    s = pc.savings_summary([r], S)
    assert s["reads"] == 1 and s["unpriced_calls"] == 1 and s["saved_usd"] == 0


def test_the_report_prints_prompt_cache_reads_writes_and_savings():
    from rich.console import Console

    rows = [row(SONNET, Usage(20, 10, cache_write_5m_tokens=5_000))] + [
        row(SONNET, Usage(20, 10, cache_read_tokens=5_000)) for _ in range(3)]
    out = io.StringIO()
    s = render(rows, 0.0, None, console=Console(file=out, width=200), settings=S)
    text = out.getvalue()
    assert "prompt cache: 3 of 4 billed calls read a cached prefix" in text and "1 wrote one" in text
    assert f"saved ${s['prompt_cache']['saved_usd']:.4f}" in text
    assert summarize(rows, 0.0)["prompt_cache"] is None   # without prices, no dollars claimed
    assert summarize(rows, 2_000.0, S)["prompt_cache"]["calls"] == 0   # since filters


def test_an_upstreams_price_factor_applies_to_its_savings_as_to_its_bill():
    from runtime.settings import UpstreamSettings

    s = Settings(upstreams=[UpstreamSettings(name="eu", kind="bedrock", aws_region="eu-west-1", price_factor=1.1)])
    u = Usage(input_tokens=10, cache_read_tokens=4_000)
    r = row(SONNET, u)
    r["upstream"] = "eu"
    assert pc.savings_summary([r], s)["saved_usd"] == pytest.approx(1.1 * pc.savings(u, SONNET, s))
    r["upstream"] = "unknown"
    assert pc.savings_summary([r], s)["saved_usd"] == pytest.approx(pc.savings(u, SONNET, s))
