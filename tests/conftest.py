"""Test harness: one suite, two backends.

``ROTATOR_TEST_BACKEND=embedded`` (the default) runs on a SQLite file and Celery's in-memory
broker; ``ROTATOR_TEST_BACKEND=real`` runs on PostgreSQL and Redis (see tests/services.py): by
default a throwaway server of each that the run starts and stops itself; with
``ROTATOR_TEST_DATABASE_URL`` / ``ROTATOR_TEST_BROKER_URL``, servers that are already running
(on PostgreSQL, in a database of the run's own, dropped at the end). The real pass fails at
once, and never skips, when a service cannot be started or reached.

The schema is built by Alembic once per run; every test starts from empty tables.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.services import ServiceError, Services
from tests.support import BACKEND, E2E_SETTINGS, overridden, settings_env

_DATA_DIR = Path(tempfile.mkdtemp(prefix="rotator-tests-"))
TEST_KEY = base64.b64encode(secrets.token_bytes(32)).decode()

SERVICES: Services | None = None
if BACKEND == "real":
    SERVICES = Services(
        database_url=os.environ.get("ROTATOR_TEST_DATABASE_URL") or None,
        broker_url=os.environ.get("ROTATOR_TEST_BROKER_URL") or None,
    )
    DATABASE_URL, BROKER_URL = SERVICES.database_url, SERVICES.broker_url
else:
    DATABASE_URL = f"sqlite:///{_DATA_DIR / 'rotator.db'}"
    BROKER_URL = "memory://localhost/"

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
from receiver import DemoReceiver  # noqa: E402
from rotator.settings import Settings, get_settings  # noqa: E402
from tests.processes import rotator_env, start_beat, start_worker, stop  # noqa: E402
from tests.receivers import loopback_demo_receiver  # noqa: E402

# Tests that touch neither the database nor the broker (the receiver kit, the HTTP sender,
# settings, compose, the browser page and the dev walk-through, which runs on its own SQLite
# file) say nothing new in the real pass: it leaves them to the embedded pass.
BACKEND_INDEPENDENT = (
    "tests/receiver/",
    "tests/workers/test_http.py",
    "tests/test_compose.py",
    "tests/test_settings.py",
    "tests/test_celery_config.py",
    "tests/e2e/test_dev_walkthrough.py",
    "tests/e2e/test_dev_logs.py",
    "tests/e2e/test_ops_page.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BACKEND != "real":
        return
    root = Path(str(config.rootpath))
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        path = Path(str(item.path)).relative_to(root).as_posix()
        (drop if path.startswith(BACKEND_INDEPENDENT) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    if SERVICES is None:
        return f"rotator backend: {BACKEND} (SQLite, in-memory broker)"
    return f"rotator backend: {BACKEND} ({SERVICES.describe()})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SERVICES is not None and SERVICES.start_seconds:
        terminalreporter.write_line(
            f"rotator test services: started in {SERVICES.start_seconds:.2f}s, "
            f"stopped in {SERVICES.stop_seconds:.2f}s"
        )


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[Database]:
    """The pass's database, schema built; in the real pass, the services started for the run
    and stopped after it, whatever the outcome (failures, Ctrl-C, pytest.exit)."""
    try:
        if SERVICES is not None:
            try:
                SERVICES.start()
            except ServiceError as exc:
                pytest.exit(f"real backend unavailable: {exc}", returncode=3)
        get_settings.cache_clear()
        db = get_database()
        db.create_schema()
        try:
            yield db
        finally:
            db.dispose()
            set_database(None)
    finally:
        if SERVICES is not None:
            SERVICES.stop()


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


# --- live processes -----------------------------------------------------------------------------


@dataclass
class Workers:
    """The worker side of an end-to-end test: a real Celery worker (and beat)."""

    settings: Settings
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def e2e_settings(database: Database, request: pytest.FixtureRequest) -> Iterator[Settings]:
    extra = getattr(request.module, "E2E_OVERRIDES", {})
    with overridden(database.settings, **{**E2E_SETTINGS, **extra}) as settings:
        yield settings


@pytest.fixture(scope="module")
def workers(e2e_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """A real Celery worker and beat on the pass's broker.

    Real pass: ``rotator worker`` and ``rotator beat`` as their own processes on Redis.
    Embedded pass: the worker thread and beat of ``rotator dev`` on the in-memory broker.
    """
    from workers.app import app as celery_app

    handle = Workers(settings=e2e_settings)
    if BACKEND == "embedded":
        from rotator.embedded import background_services

        with background_services(e2e_settings):
            yield handle
        return
    celery_app.control.purge()
    logs = tmp_path_factory.mktemp("workers")
    env = {**rotator_env(), **settings_env(e2e_settings)}
    worker_log, beat_log = logs / "worker.log", logs / "beat.log"
    worker = start_worker(env, worker_log, hostname=f"e2e-{os.getpid()}@%h")
    beat = start_beat(env, beat_log)
    handle.procs += [worker, beat]
    handle.logs += [worker_log, beat_log]
    try:
        _wait_for_log(worker, worker_log, "ready.")
        yield handle
    finally:
        for proc in handle.procs:
            stop(proc)


def _wait_for_log(
    proc: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        if marker in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{marker!r} not in {log} after {timeout}s:\n{log.read_text()}")


@pytest.fixture
def demo_receiver() -> Iterator[DemoReceiver]:
    """The demo receiver on a free loopback port (``.url``), knowing a placeholder secret until
    a test installs real ones."""
    with loopback_demo_receiver() as receiver:
        yield receiver
