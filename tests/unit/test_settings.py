"""Settings: read from the environment in one place, validated with a one-line reason."""
import pytest

from app.settings import SettingsError, load_settings, parse_api_keys, redact_url


def test_defaults_are_those_of_the_contract():
    s = load_settings({})
    assert s.app_env == "development"
    assert s.hold_ttl_seconds == 900
    assert s.sweep_interval_seconds == 30
    assert s.reconcile_interval_seconds == 300
    assert s.pricing_stacking == "multiplicative"
    assert s.max_units_per_customer == 0
    assert s.currency == "USD"
    assert s.port == 8000
    assert s.host == "127.0.0.1"
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("var/inventory.db")
    assert not s.auth_enabled


@pytest.mark.parametrize("env, fragment", [
    ({"HOLD_TTL_SECONDS": "ten"}, "HOLD_TTL_SECONDS must be an integer"),
    ({"HOLD_TTL_SECONDS": "0"}, "HOLD_TTL_SECONDS must be between"),
    ({"PORT": "70000"}, "PORT must be between"),
    ({"PRICING_STACKING": "sideways"}, "PRICING_STACKING must be"),
    ({"REDIS_CLUSTER": "maybe"}, "REDIS_CLUSTER must be 0 or 1"),
    ({"APP_ENV": "staging"}, "APP_ENV must be"),
    ({"CURRENCY": "dollars"}, "CURRENCY must be"),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must start with"),
    ({"DATABASE_URL": "not a url"}, "DATABASE_URL must be"),
    ({"API_KEYS": "root:abcdefgh12"}, "API_KEYS entries"),
    ({"API_KEYS": "admin:short"}, "API_KEYS: each key"),
    ({"MAX_UNITS_PER_CUSTOMER": "-1"}, "MAX_UNITS_PER_CUSTOMER must be"),
    ({"HOST": "0.0.0.0; rm"}, "HOST must be"),
])
def test_a_bad_value_is_refused_with_a_one_line_reason(env, fragment):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("host, bind", [(None, "127.0.0.1:8123"), ("0.0.0.0", "0.0.0.0:8123"), ("::1", "[::1]:8123")])
def test_the_web_server_binds_loopback_unless_host_says_otherwise(host, bind):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HOST"} | {"PORT": "8123", "APP_ENV": "development"}
    if host:
        env["HOST"] = host
    out = subprocess.run([sys.executable, "-c", "import app.gunicorn_conf as c; print(c.bind)"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == bind


def test_production_refuses_to_start_without_keys():
    env = {"APP_ENV": "production", "DATABASE_URL": "postgresql://u@db/x", "REDIS_URL": "redis://r:6379/0"}
    with pytest.raises(SettingsError, match="needs API_KEYS"):
        load_settings(env)
    assert load_settings({**env, "API_KEYS": "admin:k3y-for-admin"}).production


def test_production_refuses_the_embedded_defaults():
    keys = {"APP_ENV": "production", "API_KEYS": "admin:k3y-for-admin"}
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        load_settings({**keys, "REDIS_URL": "redis://r:6379/0"})
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings({**keys, "DATABASE_URL": "postgresql://u@db/x"})


def test_production_ignores_fault_points():
    env = {"APP_ENV": "production", "API_KEYS": "admin:k3y-for-admin", "DATABASE_URL": "postgresql://u@db/x",
           "REDIS_URL": "redis://r:6379/0", "FAULT_PAUSE_AT": "checkout.after_lock"}
    assert load_settings(env).fault_pause_at == ""


def test_api_keys_map_each_key_to_its_role():
    keys = parse_api_keys("admin:aaaaaaaa1, storefront:bbbbbbbb2,storefront:cccccccc3")
    assert keys == {"aaaaaaaa1": "admin", "bbbbbbbb2": "storefront", "cccccccc3": "storefront"}


def test_passwords_are_redacted_for_logs():
    assert redact_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert "s3cret" not in redact_url("redis://:s3cret@r:6379/0")


def test_each_web_worker_freezes_its_start_up_heap_out_of_the_collectors_way():
    import gc

    from app import gunicorn_conf

    assert gc.get_freeze_count() == 0
    try:
        gunicorn_conf.post_worker_init(worker=None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


# -- Redis Sentinel and hold durability -----------------------------------------------------------

def test_sentinel_and_durability_defaults():
    s = load_settings({})
    assert s.redis_sentinels == ()
    assert s.redis_sentinel_service == "inventory"
    assert s.hold_durability == "local"
    assert s.hold_replica_timeout_ms == 100


def test_sentinels_are_parsed_into_host_port_pairs():
    s = load_settings({"REDIS_SENTINELS": " 10.0.0.1:26379, sentinel-b:26380,[::1]:26381 ",
                       "REDIS_SENTINEL_SERVICE": "stock-main", "HOLD_DURABILITY": "Replicated",
                       "HOLD_REPLICA_TIMEOUT_MS": "250"})
    assert s.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert s.redis_sentinel_service == "stock-main"
    assert s.hold_durability == "replicated"
    assert s.hold_replica_timeout_ms == 250
    assert s.redacted_redis_url().startswith("sentinel stock-main at 10.0.0.1:26379,")


@pytest.mark.parametrize("env, fragment", [
    ({"REDIS_SENTINELS": "10.0.0.1"}, "REDIS_SENTINELS entries must look like host:port"),
    ({"REDIS_SENTINELS": "10.0.0.1:26379,b:port"}, "REDIS_SENTINELS entries must look like host:port"),
    ({"REDIS_SENTINELS": "a:0"}, "REDIS_SENTINELS entries"),
    ({"REDIS_SENTINELS": "a b:26379"}, "REDIS_SENTINELS entries"),
    ({"REDIS_SENTINEL_SERVICE": "my service"}, "REDIS_SENTINEL_SERVICE must be"),
    ({"HOLD_DURABILITY": "sync"}, "HOLD_DURABILITY must be local or replicated"),
    ({"HOLD_REPLICA_TIMEOUT_MS": "0"}, "HOLD_REPLICA_TIMEOUT_MS must be between 1 and 10000"),
    ({"HOLD_REPLICA_TIMEOUT_MS": "10001"}, "HOLD_REPLICA_TIMEOUT_MS must be between 1 and 10000"),
    ({"HOLD_REPLICA_TIMEOUT_MS": "soon"}, "HOLD_REPLICA_TIMEOUT_MS must be an integer"),
    ({"REDIS_SENTINELS": "a:26379", "REDIS_CLUSTER": "1"}, "REDIS_SENTINELS and REDIS_CLUSTER=1 exclude each other"),
])
def test_a_bad_sentinel_or_durability_setting_is_refused_in_one_line(env, fragment):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_production_takes_sentinels_in_place_of_redis_url():
    env = {"APP_ENV": "production", "API_KEYS": "admin:k3y-for-admin", "DATABASE_URL": "postgresql://u@db/x"}
    with pytest.raises(SettingsError, match="needs REDIS_URL or REDIS_SENTINELS"):
        load_settings(env)
    s = load_settings({**env, "REDIS_SENTINELS": "s1:26379,s2:26379"})
    assert s.production and s.redis_sentinels and s.redis_url == ""
    # a REDIS_URL beside them gives the db number and password (its host is not used)
    s = load_settings({**env, "REDIS_SENTINELS": "s1:26379", "REDIS_URL": "redis://:pw@ignored:1/3"})
    assert s.redis_url == "redis://:pw@ignored:1/3"
    assert "pw" not in s.redacted_redis_url()
