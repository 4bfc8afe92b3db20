"""Test harness: one suite, two backends.

``ROTATOR_TEST_BACKEND=embedded`` (the default) runs on a SQLite file and Celery's in-memory
broker; ``ROTATOR_TEST_BACKEND=real`` runs on the PostgreSQL and Redis named by
``ROTATOR_TEST_DATABASE_URL`` / ``ROTATOR_TEST_BROKER_URL``. The real pass fails at once, and
never skips, when either service is unreachable.

The schema is built by Alembic once per run; every test starts from empty tables.
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BACKEND = os.environ.get("ROTATOR_TEST_BACKEND", "embedded")
if BACKEND not in ("embedded", "real"):
    raise RuntimeError(f"ROTATOR_TEST_BACKEND must be 'embedded' or 'real', not {BACKEND!r}")

_DATA_DIR = Path(tempfile.mkdtemp(prefix="rotator-tests-"))
TEST_KEY = base64.b64encode(secrets.token_bytes(32)).decode()

if BACKEND == "real":
    DATABASE_URL = os.environ.get(
        "ROTATOR_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    BROKER_URL = os.environ.get("ROTATOR_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
else:
    DATABASE_URL = f"sqlite:///{_DATA_DIR / 'rotator.db'}"
    BROKER_URL = "memory://"

# Settings are read at import time by the Celery app: set them before importing the project.
os.environ.update(
    {
        "ROTATOR_ENV": "test",
        "ROTATOR_DATA_DIR": str(_DATA_DIR),
        "ROTATOR_DATABASE_URL": DATABASE_URL,
        "ROTATOR_BROKER_URL": BROKER_URL,
        "ROTATOR_ENCRYPTION_KEYS": TEST_KEY,
        "ROTATOR_ALLOW_INSECURE_URLS": "false",
    }
)

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import text  # noqa: E402

from models import Base, clock  # noqa: E402
from models.db import Database, get_database, set_database  # noqa: E402
from rotator.settings import Settings, get_settings  # noqa: E402


def _require_services() -> None:
    """Fail the run (exit code 3) when the real backend's services do not answer."""
    import redis
    from sqlalchemy import create_engine

    problems = []
    try:
        engine = create_engine(
            DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1),
            connect_args={"connect_timeout": 3},
        )
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        problems.append(f"PostgreSQL at {DATABASE_URL}: {type(exc).__name__}: {exc}")
    try:
        redis.Redis.from_url(BROKER_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        problems.append(f"Redis at {BROKER_URL}: {type(exc).__name__}: {exc}")
    if problems:
        pytest.exit("real backend unreachable:\n  " + "\n  ".join(problems), returncode=3)


def pytest_report_header(config: pytest.Config) -> str:
    where = DATABASE_URL.split("@")[-1]
    return f"rotator backend: {BACKEND} (database {where}, broker {BROKER_URL})"


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[Database]:
    if BACKEND == "real":
        _require_services()
    get_settings.cache_clear()
    db = get_database()
    if db.dialect == "postgresql":
        with db.engine.begin() as connection:
            connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    db.create_schema()
    yield db
    db.dispose()
    set_database(None)


@pytest.fixture(autouse=True)
def _clean_tables(database: Database) -> Iterator[None]:
    yield
    clock.reset()
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with database.engine.begin() as connection:
        if database.dialect == "postgresql":
            connection.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))
        else:
            for table in tables:
                connection.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - our own names


@pytest.fixture
def settings(database: Database) -> Settings:
    return database.settings


@pytest.fixture(scope="session")
def app(database: Database):
    from api.app import create_app

    return create_app()


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
