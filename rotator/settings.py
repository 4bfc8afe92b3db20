"""The one typed configuration of Rotator, read from ``ROTATOR_*`` environment variables.

Everything (API, workers, beat, the command line) reads its settings from here, Celery's
configuration included, so a value has exactly one name and one default.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger("rotator.settings")

DEFAULT_DATA_DIR = Path(".rotator")
KEY_FILE_NAME = "encryption.key"


class ConfigurationError(RuntimeError):
    """Raised when the process must not start with the given settings."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROTATOR_", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = ""
    broker_url: str = "memory://localhost/"
    # Keys that encrypt secrets at rest: standard base64 of 32 bytes, comma separated. The
    # first encrypts; every one of them decrypts, so a key can be retired gradually.
    encryption_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

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
    # The shortest rotation-policy interval accepted (CONTRACT: 60; tests shorten it).
    policy_min_interval_seconds: int = Field(default=60, ge=1)
    # How long a scheduled safe migrate waits for its receiver before rolling back.
    scheduled_migrate_deadline_seconds: int = Field(default=86_400, ge=60, le=86_400)
    # A task message overdue by this long was lost (or its worker died): the reconciler resends.
    reconcile_after_seconds: float = Field(default=30.0, gt=0)
    # Multiplies every beat period (tests shorten them; production leaves it at 1).
    beat_period_scale: float = Field(default=1.0, gt=0, le=10)

    # How long an API process trusts a key it has just authenticated, for reads (writes always
    # check): a revoked key keeps reading for at most this long. 0 checks on every request.
    auth_cache_seconds: float = Field(default=5.0, ge=0, le=300)

    # Retention (docs/operating.md, Retention): delivery attempts, finished deliveries, their
    # events and finished operations older than this many days are deleted by a beat tick.
    retention_days: int = Field(default=30, ge=1, le=36_500)

    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # A pooled connection idle longer than this is pinged before use (one round trip); busier
    # ones are not: a server restart then costs one failed unit of work, not a ping per use.
    db_ping_after_idle_seconds: float = Field(default=10.0, ge=0)

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
    """The process-wide settings, read once."""
    return Settings()


def generate_key() -> str:
    """A fresh at-rest encryption key, in the form ROTATOR_ENCRYPTION_KEYS takes."""
    return base64.b64encode(secrets.token_bytes(32)).decode()
