"""The one typed configuration of Rotator, read from ``ROTATOR_*`` environment variables.

Everything (API, workers, beat, the command line) reads its settings from here, Celery's
configuration included, so a value has exactly one name and one default.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

log = logging.getLogger("rotator.settings")

DEFAULT_DATA_DIR = Path(".rotator")
KEY_FILE_NAME = "encryption.key"


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DATABASE_SCHEMES = ("sqlite://", "postgresql://", "postgres://", "postgresql+psycopg://")
_BROKER_SCHEMES = ("redis://", "rediss://", "redis+socket://", "sentinel://", "memory://")


class ConfigurationError(RuntimeError):
    """Raised when the process must not start with the given settings.

    One line per problem, each naming the variable and what is wrong with it, never its value
    (a malformed key may still be most of a real one).
    """

    def lines(self) -> list[str]:
        return str(self).splitlines()


def _describe(error: ValidationError) -> list[str]:
    """One line per invalid variable, without the values pydantic would quote."""
    lines = []
    for item in error.errors(include_url=False):
        loc = item.get("loc", ())
        name = f"ROTATOR_{str(loc[0]).upper()}" if loc else "ROTATOR_* settings"
        where = "".join(f" item {int(part) + 1}" for part in loc[1:] if isinstance(part, int))
        message = str(item.get("msg", "is not valid")).removeprefix("Value error, ")
        given = item.get("input")
        if isinstance(given, str) and len(given) >= 8 and given in message:
            message = "is not valid"  # never echo a value, whoever wrote the message
        lines.append(f"{name}{where}: {message}")
    return lines


def load_settings() -> Settings:
    """``Settings()`` from the environment; any problem is a ``ConfigurationError``."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError("\n".join(_describe(exc))) from None
    except SettingsError as exc:
        # "error parsing value for field "x" ...": name the variable, drop the cause (the value).
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "*"
        raise ConfigurationError(f"ROTATOR_{field.upper()}: cannot be parsed") from None


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value (an encryption key, a URL with credentials) is
    # never repeated in the error that reports it; the messages name the variable instead.
    model_config = SettingsConfigDict(
        env_prefix="ROTATOR_", extra="ignore", hide_input_in_errors=True
    )

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = Field(default="", repr=False)  # may carry a password
    broker_url: str = "memory://localhost/"
    # Keys that encrypt secrets at rest: standard base64 of 32 bytes, comma separated. The
    # first encrypts; every one of them decrypts, so a key can be retired gradually.
    encryption_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)

    org_secret_grace_seconds: int = Field(default=300, ge=0, le=86_400)
    allow_insecure_urls: bool = False
    endpoint_limit: int = Field(default=50, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    log_level: str = "INFO"
    # Prometheus multiprocess mode: a directory every process that observes histograms (API,
    # workers) shares, and /metrics reads. Empty: each process keeps its histograms in memory.
    metrics_dir: str = ""

    delivery_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Seconds to wait after each failed attempt; once used up, the delivery is dead.
    delivery_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    delivery_retry_jitter: float = Field(default=0.1, ge=0, lt=1)
    replay_limit_per_minute: int = Field(default=10, ge=1)
    # Safe migrate: test deliveries back off from the first wait, doubling up to the last.
    migrate_backoff_initial_seconds: float = Field(default=5.0, gt=0)
    migrate_backoff_max_seconds: float = Field(default=60.0, gt=0)
    # Remote providers (docs/api.md, "Remote providers"): each call to a remote
    # AgentMessage-compatible API ends within this, connect to last byte. Longer than the
    # remote's own test-delivery timeout, since its /test answers only once its receiver has.
    provider_timeout_seconds: float = Field(default=30.0, gt=0, le=120)
    # The shortest rotation-policy interval accepted (docs/api.md: 60; tests shorten it).
    policy_min_interval_seconds: int = Field(default=60, ge=1)
    # How long a scheduled safe migrate waits for its receiver before rolling back.
    scheduled_migrate_deadline_seconds: int = Field(default=86_400, ge=60, le=86_400)
    # A task message overdue by this long was lost (or its worker died): the reconciler resends.
    reconcile_after_seconds: float = Field(default=30.0, gt=0)
    # Multiplies every beat period (tests shorten them; production leaves it at 1).
    beat_period_scale: float = Field(default=1.0, gt=0, le=10)

    # Isolation (docs/operating.md, "Isolation"). Requests one delivery worker process keeps
    # in flight (its posting threads); at most this many to one endpoint and for one
    # organization, counted across every delivery worker.
    delivery_concurrency: int = Field(default=64, ge=1, le=1024)
    endpoint_max_in_flight: int = Field(default=4, ge=1, le=1000)
    org_max_in_flight: int = Field(default=64, ge=1)
    # An endpoint whose attempts get no usable answer this many times in a row is left alone
    # for circuit_open_seconds, doubling on each reopening up to circuit_max_open_seconds.
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_open_seconds: float = Field(default=30.0, gt=0)
    circuit_max_open_seconds: float = Field(default=600.0, gt=0)

    # How long an API process trusts a key it has just authenticated, for reads (writes always
    # check): a revoked key keeps reading for at most this long. 0 checks on every request.
    auth_cache_seconds: float = Field(default=5.0, ge=0, le=300)

    # Isolation (docs/operating.md, Isolation): work that waits on a receiver or a client must
    # not hold what every other request needs.
    # Synchronous test deliveries (POST /v1/webhooks/{id}/test) in flight per organization,
    # across all API processes; beyond it, 429 RATE_LIMITED.
    sync_tests_per_org: int = Field(default=5, ge=1, le=1000)
    # Threads per API process that send test deliveries: their own, never the threads every
    # other route runs on. All busy: 429 RATE_LIMITED.
    sync_test_threads: int = Field(default=20, ge=1, le=1000)
    # Open operation event streams (GET /v1/operations/{id}/events) per API key, per API
    # process; beyond it, 429 RATE_LIMITED.
    sse_streams_per_key: int = Field(default=5, ge=1, le=1000)
    # A stream is closed after this long even if its operation is still running (a client
    # reconnects); a dead client is noticed sooner, at the next keep-alive.
    sse_stream_max_seconds: float = Field(default=3600.0, ge=1, le=86_400)
    # Retention (docs/operating.md, Retention): delivery attempts, finished deliveries, their
    # events and finished operations older than this many days are deleted by a beat tick.
    retention_days: int = Field(default=30, ge=1, le=36_500)

    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # A pooled connection idle longer than this is pinged before use (one round trip); busier
    # ones are not: a server restart then costs one failed unit of work, not a ping per use.
    db_ping_after_idle_seconds: float = Field(default=10.0, ge=0)

    # Private networks (CIDRs, comma separated) that https:// deliveries may reach although
    # they are not globally routable, for receivers inside the operator's own network; checked
    # on the address connected to, like every other destination (workers/http.py).
    allowed_private_networks: Annotated[
        list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode
    ] = Field(default_factory=list)

    @field_validator("allowed_private_networks", mode="before")
    @classmethod
    def _networks_from_csv(cls, value: object) -> object:
        entries = _split_csv(value)
        if not isinstance(entries, list):
            return entries
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for index, entry in enumerate(entries):
            if isinstance(entry, ipaddress.IPv4Network | ipaddress.IPv6Network):
                networks.append(entry)
                continue
            try:
                networks.append(ipaddress.ip_network(str(entry)))
            except ValueError:
                # Named by position, never repeated: settings errors end up in logs.
                try:
                    ipaddress.ip_network(str(entry), strict=False)
                except ValueError:
                    problem = "is not an IP network in CIDR notation (like 10.0.0.0/8)"
                else:
                    problem = "has host bits set (write the network address, like 10.0.0.0/8)"
                raise ValueError(
                    f"ROTATOR_ALLOWED_PRIVATE_NETWORKS entry #{index + 1} {problem}"
                ) from None
        return networks

    @model_validator(mode="after")
    def _no_insecure_urls_in_production(self) -> Settings:
        if self.env == "production" and self.allow_insecure_urls:
            raise ValueError(
                "ROTATOR_ALLOW_INSECURE_URLS=true is refused when ROTATOR_ENV=production: it "
                "allows plain http:// and every loopback, link-local and private address. To "
                "deliver to receivers on a private network, list their networks in "
                "ROTATOR_ALLOWED_PRIVATE_NETWORKS (CIDRs, comma separated) instead"
            )
        return self

    # Log lines: "auto" writes readable lines when stderr is a terminal and JSON lines (one
    # object each) otherwise; "json" and "human" force one of them (docs/operating.md, Logs).
    log_format: Literal["auto", "json", "human"] = "auto"

    # --- hardening (docs/operating.md, "Configuration errors", "Metrics", "API docs") ---------
    # When set, GET /metrics wants "Authorization: Bearer <token>" (16+ visible characters).
    metrics_token: str = Field(default="", repr=False)
    # Swagger UI (/docs) and ReDoc (/redoc): "auto" serves them except in production.
    docs: Literal["auto", "on", "off"] = "auto"

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_fits_a_header(cls, value: str) -> str:
        if value and (len(value) < 16 or not all("!" <= char <= "~" for char in value)):
            raise ValueError("must be at least 16 visible ASCII characters, without spaces")
        return value

    @field_validator("docs", mode="before")
    @classmethod
    def _docs_switch(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return {"true": "on", "1": "on", "false": "off", "0": "off", "": "auto"}.get(
                value, value
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value.upper() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str) -> str:
        if not value:
            return value  # filled in from data_dir
        if not value.startswith(_DATABASE_SCHEMES):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        from sqlalchemy.engine import make_url

        try:
            make_url(value)
        except Exception:  # the parser's message would quote the URL, password and all
            raise ValueError("is not a well-formed database URL") from None
        return value

    @field_validator("broker_url")
    @classmethod
    def _usable_broker_url(cls, value: str) -> str:
        if not value.startswith(_BROKER_SCHEMES):
            raise ValueError("must be a redis://, rediss:// or memory:// URL")
        return value

    @property
    def docs_enabled(self) -> bool:
        """Whether /docs and /redoc are served (``ROTATOR_DOCS``)."""
        return self.docs == "on" or (self.docs == "auto" and self.env != "production")

    # --- end of hardening ---------------------------------------------------------------------

    @field_validator("encryption_keys", mode="before")
    @classmethod
    def _keys_from_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("delivery_retry_schedule", mode="before")
    @classmethod
    def _schedule_from_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("delivery_retry_schedule")
    @classmethod
    def _schedule_is_positive(cls, value: list[float]) -> list[float]:
        if any(delay <= 0 for delay in value):
            raise ValueError("retry delays must be positive seconds")
        return value

    @field_validator("encryption_keys")
    @classmethod
    def _keys_are_32_bytes(cls, value: list[str]) -> list[str]:
        for index, key in enumerate(value):
            try:
                raw = base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"encryption key #{index + 1} is not standard base64") from None
            if len(raw) != 32:
                raise ValueError(f"encryption key #{index + 1} must decode to 32 bytes")
        return value

    @model_validator(mode="after")
    def _defaults_from_data_dir(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'rotator.db'}"
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def encryption_key_bytes(self) -> list[bytes]:
        """The at-rest keys as bytes, first one encrypting.

        Outside production, a missing key is replaced by a key file kept in ``data_dir`` so
        that a local database stays readable across restarts; production refuses to start.
        """
        if self.encryption_keys:
            return [base64.b64decode(key) for key in self.encryption_keys]
        if self.env == "production":
            raise ConfigurationError(
                "ROTATOR_ENCRYPTION_KEYS is required in production "
                "(generate one with: rotator secrets genkey)"
            )
        return [_local_key(self.data_dir)]


def _local_key(data_dir: Path) -> bytes:
    path = data_dir / KEY_FILE_NAME
    if path.exists():
        return base64.b64decode(path.read_text().strip())
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode() + "\n")
    log.warning(
        "no ROTATOR_ENCRYPTION_KEYS set: generated a local at-rest key in %s; "
        "set ROTATOR_ENCRYPTION_KEYS for anything but local development",
        path,
    )
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once (``ConfigurationError`` when they are invalid)."""
    return load_settings()


def generate_key() -> str:
    """A fresh at-rest encryption key, in the form ROTATOR_ENCRYPTION_KEYS takes."""
    return base64.b64encode(secrets.token_bytes(32)).decode()
