import pickle

import pytest
from runtime.errors import ConfigurationError, UnknownModel
from runtime.settings import PriceTier, Settings, UserLimits


def test_defaults_are_todays_prices_and_seed_numbers():
    s = Settings()
    haiku = s.models["claude-haiku-5-5"]
    assert haiku.model_class == "haiku"
    assert [t.up_to_input_tokens for t in haiku.prices] == [100_000, None]
    assert haiku.prices[0].input == 0.10 and haiku.prices[0].cache_read == 0.01
    assert s.models["claude-sonnet-5-5"].prices[0].cache_write_5m == pytest.approx(2.5)
    assert s.models["claude-sonnet-5-5"].prices[0].cache_write_1h == pytest.approx(4.0)
    assert s.user_limits == {}  # per-user caps only where configured
    assert s.cache.ttl_factual_s == 3600 and s.cache.ttl_code_s == 86400 and s.cache.ttl_analysis_s == 21600
    assert s.alerts.request_usd == 0.10 and s.alerts.day_usd == 50 and s.alerts.error_rate == 0.05
    assert not s.uses_fake_api  # opt-in only


def test_default_model_ids_exist_in_installed_sdk():
    import typing

    from anthropic.types import ModelParam

    sdk_ids = set(typing.get_args(typing.get_args(ModelParam)[0]))
    # claude-opus-4-1 is still served and priced (shared notes) but the 2.13 SDK no longer lists it
    assert set(Settings().models) - sdk_ids == {"claude-opus-4-1"}


def test_wrong_value_is_a_configuration_error_naming_the_field():
    with pytest.raises(ConfigurationError) as exc:
        Settings(limits={"haiku": {"rpm": 0, "itpm": 1, "otpm": 1}})
    assert exc.value.field == "limits.haiku.rpm" and "greater than" in exc.value.reason
    with pytest.raises(ConfigurationError) as exc:
        Settings(budgets={"daily_usd": -5})
    assert "budgets.daily_usd" in str(exc.value)
    with pytest.raises(ConfigurationError, match="upstreams.0.kind"):
        Settings(upstreams=[{"name": "x", "kind": "azure"}])


def test_unknown_router_model_is_an_error_and_partial_overrides_merge():
    with pytest.raises(ConfigurationError, match="router.sonnet_model"):
        Settings(router={"sonnet_model": "claude-nope"})
    s = Settings(limits={"haiku": {"rpm": 1, "itpm": 2, "otpm": 3}},
                 models={"my-model": {"model_class": "sonnet", "prices": [{"input": 1, "output": 2}]}})
    assert s.limits["haiku"].rpm == 1 and s.limits["sonnet"].rpm == 50
    assert "my-model" in s.models and "claude-haiku-5-5" in s.models


def test_unknown_model_is_an_error_not_zero():
    with pytest.raises(UnknownModel, match="claude-imaginary"):
        Settings().model_info("claude-imaginary")
    assert issubclass(UnknownModel, ConfigurationError)


def test_price_tiers_must_be_ordered_and_end_unbounded():
    with pytest.raises(ConfigurationError, match="unbounded"):
        Settings(models={"m": {"model_class": "haiku", "prices": [{"up_to_input_tokens": 10, "input": 1,
                                                                     "output": 1}]}})


def test_env_and_toml_loading(tmp_path, monkeypatch):
    toml = tmp_path / "cfg.toml"
    toml.write_text('environment = "staging"\n[budgets]\ndaily_usd = 12.5\n[limits.sonnet]\nrpm = 7\n'
                    'itpm = 700\notpm = 70\n')
    monkeypatch.setenv("CLAUDE_RUNTIME_CONFIG", str(toml))
    monkeypatch.setenv("CLAUDE_RUNTIME_ALERTS__DAY_USD", "99")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-" + "test-not-a-real-key-" + "0" * 12)
    s = Settings()
    assert s.environment == "staging"
    assert s.budgets.daily_usd == 12.5
    assert s.limits["sonnet"].rpm == 7
    assert s.alerts.day_usd == 99
    assert not s.uses_fake_api
    assert "sk-ant" not in repr(s) and "sk-ant" not in str(s.model_dump())
    monkeypatch.setenv("CLAUDE_RUNTIME_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match="not a file"):
        Settings()


def test_settings_pickle_round_trip():
    s = Settings(api_key="sk-ant-" + "abc-" + "x" * 28)
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.api_key.get_secret_value() == s.api_key.get_secret_value()
    assert s2.models == s.models


def test_price_tier_cache_rates_default_from_input():
    t = PriceTier(input=4.0, output=20.0)
    assert (t.cache_write_5m, t.cache_write_1h, t.cache_read) == (5.0, 8.0, pytest.approx(0.4))


def test_only_anthropic_and_claude_runtime_variables_are_read(monkeypatch):
    monkeypatch.setenv("API_KEY", "not-for-us")
    monkeypatch.setenv("BASE_URL", "http://elsewhere.invalid")
    s = Settings()
    assert s.api_key is None and s.base_url is None and s.configured_upstreams() == []
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://proxy.internal:8080")
    assert Settings().base_url == "http://proxy.internal:8080"


def test_the_local_api_is_opt_in(monkeypatch):
    assert not Settings().uses_fake_api
    assert Settings(fake_api=True).uses_fake_api
    monkeypatch.setenv("CLAUDE_RUNTIME_FAKE_API", "1")
    assert Settings().uses_fake_api and Settings().fake_api.host == "127.0.0.1"
    monkeypatch.setenv("CLAUDE_RUNTIME_FAKE_API", "0")
    assert not Settings().uses_fake_api


def test_data_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings(data_dir="rel/dir")
    assert s.data_dir.is_absolute() and s.data_dir == tmp_path / "rel" / "dir"


def test_user_caps_where_configured_with_overrides():
    s = Settings(user_limits={"*": {"rpm": 10, "tpm": 5000}, "tenant:acme": {"rpm": 100}, "vip": {"rpm": 0}})
    assert s.user_caps("anyone", None) == UserLimits(rpm=10, tpm=5000)
    assert s.user_caps("bob", "acme") == UserLimits(rpm=100)
    assert s.user_caps("vip", "acme") == UserLimits(rpm=0)
    assert Settings().user_caps("anyone", None) is None
    # one set of caps means everyone
    assert Settings(user_limits=UserLimits(rpm=3)).user_caps("x", None) == UserLimits(rpm=3)


def test_upstreams_hide_their_credentials_and_the_shorthand_is_one_upstream():
    secret = "sk-ant-" + "upstream-" + "y" * 20
    s = Settings(upstreams=[{"name": "ws-a", "api_key": secret, "limit_group": "ws"},
                            {"name": "bed", "kind": "bedrock", "aws_region": "us-east-1",
                             "aws_access_key": "AKIA" + "X" * 16, "aws_secret_key": "s" * 40}])
    assert secret not in repr(s) and "AKIA" not in repr(s) and secret not in str(s.model_dump())
    assert s.upstreams[0].group == "ws" and s.upstreams[1].group == "bed"
    assert s.upstreams[1].platform_model("claude-sonnet-5-5") == "anthropic.claude-sonnet-5-5-v1:0"
    clean = s.without_secrets()
    assert all(u.api_key is None and u.aws_secret_key is None for u in clean.upstreams)
    short = Settings(api_key=secret, base_url="http://user:hunter2xyz@gw.internal/x?token=abc987")
    (only,) = short.configured_upstreams()
    assert only.name == "anthropic" and only.api_key.get_secret_value() == secret
    assert "hunter2xyz" not in repr(short) and "abc987" not in repr(short)
