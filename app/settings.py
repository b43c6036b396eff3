"""All settings of the service, read from the environment in this one place (API.md, Settings)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from app import stack

ROOT = Path(__file__).resolve().parent.parent
# `inventory run` keeps its embedded stores under ./var of the directory it runs in (the checkout
# for `make run`; anywhere for an installed package), and the other commands find them there.
VAR_DIR = Path.cwd() / "var"
ROLES = ("admin", "storefront")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-.~+/=]{8,256}$")


class SettingsError(ValueError):
    """A setting has a bad value; the message is one line naming the setting."""


@dataclass(frozen=True)
class Settings:
    app_env: str = "development"
    database_url: str = ""
    redis_url: str = ""
    redis_cluster: bool = False
    # The rq queue's Redis (rq cannot use a cluster); defaults to REDIS_URL on a single Redis.
    rq_redis_url: str = ""
    # Redis Sentinel (REDIS_SENTINELS): ((host, port), ...) of the sentinels and the name of the
    # primary they watch; REDIS_URL then only gives the db number, user, password and TLS.
    redis_sentinels: tuple = ()
    redis_sentinel_service: str = "inventory"
    # HOLD_DURABILITY=replicated: an add answers only once a replica has its hold (WAIT 1 <ms>).
    hold_durability: str = "local"
    hold_replica_timeout_ms: int = 100
    port: int = 8000
    # The web server's address: loopback unless asked (with auth off in development, it must not
    # serve the network); the container sets 0.0.0.0.
    host: str = "127.0.0.1"
    api_keys: Mapping[str, str] = field(default_factory=dict)  # key -> role
    hold_ttl_seconds: int = 900
    sweep_interval_seconds: int = 30
    reconcile_interval_seconds: int = 300
    pricing_stacking: str = "multiplicative"
    max_units_per_customer: int = 0
    currency: str = "USD"
    # Not in API.md's table, documented in the README.
    checkout_grace_seconds: int = 120
    max_body_bytes: int = 64 * 1024
    log_level: str = "INFO"
    # Test-only: stop at a named fault point (app/faults.py). Ignored in production.
    fault_pause_at: str = ""
    fault_pause_file: str = ""
    # The record of a local `inventory run` the stores were taken from (app/stack.py), "" if none.
    stack_file: str = ""

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    def redacted_database_url(self) -> str:
        return redact_url(self.database_url)

    def redacted_redis_url(self) -> str:
        if self.redis_sentinels:
            where = ",".join(f"{h}:{p}" for h, p in self.redis_sentinels)
            return f"sentinel {self.redis_sentinel_service} at {where}" + (
                f" ({redact_url(self.redis_url)})" if self.redis_url else "")
        return redact_url(self.redis_url)

    @property
    def redis_configured(self) -> bool:
        """A Redis is named: REDIS_URL or REDIS_SENTINELS."""
        return bool(self.redis_url or self.redis_sentinels)


def redact_url(url: str) -> str:
    """Hide the password of a URL so it can be logged."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url or "")


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer setting of `env` within its bounds, `default` when unset; SettingsError naming it."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SettingsError(f"{name} must be {bound}, got {value}")
    return value


_int = env_int


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 0 or 1, got {raw!r}")


def parse_api_keys(raw: str) -> dict[str, str]:
    """Parse `admin:<key>,storefront:<key>,...` into {key: role}."""
    keys: dict[str, str] = {}
    for part in (p.strip() for p in (raw or "").split(",")):
        if not part:
            continue
        role, sep, key = part.partition(":")
        role, key = role.strip(), key.strip()
        if not sep or role not in ROLES:
            raise SettingsError(f"API_KEYS entries must look like admin:<key> or storefront:<key>, got role {role!r}")
        if not _KEY_RE.fullmatch(key):
            raise SettingsError("API_KEYS: each key must be 8-256 characters of [A-Za-z0-9_-.~+/=]")
        if key in keys and keys[key] != role:
            raise SettingsError("API_KEYS: the same key is given two roles")
        keys[key] = role
    return keys


def parse_sentinels(raw: str) -> tuple[tuple[str, int], ...]:
    """Parse `host:port,host:port,...` (REDIS_SENTINELS) into ((host, port), ...)."""
    out = []
    for part in (p.strip() for p in (raw or "").split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        if not sep or not re.fullmatch(r"[0-9A-Za-z.:\-]{1,255}", host) or not port.isdigit() \
                or not 1 <= int(port) <= 65535:
            raise SettingsError(f"REDIS_SENTINELS entries must look like host:port, got {part!r}")
        out.append((host, int(port)))
    return tuple(out)


def _names_redis(env: Mapping[str, str]) -> bool:
    return bool((env.get("REDIS_URL") or "").strip() or (env.get("REDIS_SENTINELS") or "").strip())


def stack_path() -> Path:
    """Where a local `inventory run` records its stack (app/stack.py): ./var/stack.json."""
    return stack.stack_file(VAR_DIR)


def load_settings(env: Mapping[str, str] | None = None, *, use_stack: bool = True, **overrides) -> Settings:
    """Read and validate every setting; raise SettingsError with a one-line reason.

    REDIS_URL or DATABASE_URL unset (outside production): the stores of the `inventory run` recorded as
    running in ./var/stack.json, if any (use_stack=False for `inventory run`, which makes its own)."""
    env = os.environ if env is None else env
    recorded_in = stack_path()
    recorded = None
    # Production never takes them from a record: its stores are named, never the embedded defaults.
    if use_stack and (env.get("APP_ENV") or "").strip() != "production" \
            and not ((env.get("DATABASE_URL") or "").strip() and _names_redis(env)):
        recorded = stack.running_stores(recorded_in)
    if recorded:
        # The variables win; what is unset comes from the record (the cluster and the queue's Redis
        # belong to the recorded Redis, so they come with it).
        fallback = {"DATABASE_URL": recorded.get("database_url") or ""}
        if not _names_redis(env):
            fallback.update(REDIS_URL=recorded.get("redis_url") or "",
                            REDIS_CLUSTER="1" if recorded.get("redis_cluster") else "0",
                            RQ_REDIS_URL=recorded.get("rq_redis_url") or "")
        env = {**env, **{k: v for k, v in fallback.items() if not (env.get(k) or "").strip()}}
    app_env = (env.get("APP_ENV") or "development").strip()
    if app_env not in ("development", "production", "test"):
        raise SettingsError(f"APP_ENV must be development, production or test, got {app_env!r}")
    stacking = (env.get("PRICING_STACKING") or "multiplicative").strip().lower()
    if stacking not in ("multiplicative", "additive"):
        raise SettingsError(f"PRICING_STACKING must be multiplicative or additive, got {stacking!r}")
    currency = (env.get("CURRENCY") or "USD").strip().upper()
    if not re.fullmatch(r"[A-Z]{3}", currency):
        raise SettingsError(f"CURRENCY must be a three-letter code, got {currency!r}")
    database_url = (env.get("DATABASE_URL") or "").strip()
    if not database_url:
        database_url = f"sqlite:///{VAR_DIR / 'inventory.db'}"
    elif "://" not in database_url:
        raise SettingsError("DATABASE_URL must be an SQLAlchemy URL such as postgresql://user@host/db")
    redis_url = (env.get("REDIS_URL") or "").strip()
    if redis_url and not re.match(r"^(redis|rediss|unix)://", redis_url):
        raise SettingsError("REDIS_URL must start with redis://, rediss:// or unix://")
    rq_redis_url = (env.get("RQ_REDIS_URL") or "").strip()
    if rq_redis_url and not re.match(r"^(redis|rediss|unix)://", rq_redis_url):
        raise SettingsError("RQ_REDIS_URL must start with redis://, rediss:// or unix://")
    sentinels = parse_sentinels(env.get("REDIS_SENTINELS", ""))
    sentinel_service = (env.get("REDIS_SENTINEL_SERVICE") or "inventory").strip()
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", sentinel_service):
        raise SettingsError(f"REDIS_SENTINEL_SERVICE must be a name of [A-Za-z0-9_.-], got {sentinel_service!r}")
    durability = (env.get("HOLD_DURABILITY") or "local").strip().lower()
    if durability not in ("local", "replicated"):
        raise SettingsError(f"HOLD_DURABILITY must be local or replicated, got {durability!r}")
    host = (env.get("HOST") or "127.0.0.1").strip()
    if not re.fullmatch(r"[0-9A-Za-z.:\-\[\]]{1,255}", host):
        raise SettingsError(f"HOST must be an address or host name to bind, got {host!r}")
    log_level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    settings = Settings(
        app_env=app_env,
        database_url=database_url,
        redis_url=redis_url,
        redis_cluster=_bool(env, "REDIS_CLUSTER", False),
        rq_redis_url=rq_redis_url,
        redis_sentinels=sentinels,
        redis_sentinel_service=sentinel_service,
        hold_durability=durability,
        hold_replica_timeout_ms=_int(env, "HOLD_REPLICA_TIMEOUT_MS", 100, 1, 10_000),
        port=_int(env, "PORT", 8000, 1, 65535),
        host=host,
        api_keys=parse_api_keys(env.get("API_KEYS", "")),
        hold_ttl_seconds=_int(env, "HOLD_TTL_SECONDS", 900, 1, 7 * 24 * 3600),
        sweep_interval_seconds=_int(env, "SWEEP_INTERVAL_SECONDS", 30, 1, 24 * 3600),
        reconcile_interval_seconds=_int(env, "RECONCILE_INTERVAL_SECONDS", 300, 1, 7 * 24 * 3600),
        pricing_stacking=stacking,
        max_units_per_customer=_int(env, "MAX_UNITS_PER_CUSTOMER", 0, 0, 10**9),
        currency=currency,
        checkout_grace_seconds=_int(env, "CHECKOUT_GRACE_SECONDS", 120, 1, 24 * 3600),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 64 * 1024, 1024, 64 * 1024 * 1024),
        log_level=log_level,
        fault_pause_at="" if app_env == "production" else (env.get("FAULT_PAUSE_AT") or "").strip(),
        fault_pause_file=(env.get("FAULT_PAUSE_FILE") or "").strip(),
        stack_file=str(recorded_in) if recorded else "",
    )
    if overrides:
        settings = replace(settings, **overrides)
    if settings.redis_sentinels and settings.redis_cluster:
        raise SettingsError("REDIS_SENTINELS and REDIS_CLUSTER=1 exclude each other (a cluster fails over by itself)")
    check_production(settings)
    return settings


def check_production(settings: Settings) -> None:
    """Production mode refuses to start without keys or on the embedded defaults."""
    if not settings.production:
        return
    if not settings.api_keys:
        raise SettingsError("APP_ENV=production needs API_KEYS (admin:<key>,storefront:<key>)")
    if settings.database_url.startswith("sqlite"):
        raise SettingsError("APP_ENV=production needs DATABASE_URL (the embedded SQLite is for development)")
    if not settings.redis_configured:
        raise SettingsError("APP_ENV=production needs REDIS_URL or REDIS_SENTINELS "
                            "(the embedded Redis is for development)")
