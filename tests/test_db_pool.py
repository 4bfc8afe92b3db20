"""The connection pool pings only connections that sat idle, and heals after a server-side kill."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from models.db import Database
from rotator.settings import Settings
from tests.support import BACKEND

pytestmark = pytest.mark.skipif(
    BACKEND != "real", reason="a connection closed by the server needs PostgreSQL"
)


def _backend_pid(db: Database) -> int:
    with db.session() as session:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(database: Database, pid: int) -> None:
    with database.engine.begin() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with database.engine.begin() as connection:
            alive = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar_one()
        if not alive:
            return
        time.sleep(0.05)
    raise TimeoutError(f"backend {pid} still alive")


def _pool(settings: Settings, idle_seconds: float) -> Database:
    return Database(settings.model_copy(update={"db_ping_after_idle_seconds": idle_seconds}))


def test_an_idle_connection_the_server_closed_is_replaced_before_use(
    settings: Settings, database: Database
) -> None:
    db = _pool(settings, idle_seconds=0.0)
    try:
        pid = _backend_pid(db)
        _terminate(database, pid)
        assert _backend_pid(db) != pid  # pinged, found closed, reconnected: no error
    finally:
        db.dispose()


def test_a_connection_in_steady_use_is_not_pinged_and_the_pool_heals(
    settings: Settings, database: Database
) -> None:
    db = _pool(settings, idle_seconds=3600.0)
    try:
        pid = _backend_pid(db)
        _terminate(database, pid)
        with pytest.raises(OperationalError):
            _backend_pid(db)  # no ping: this unit of work meets the closed connection
        assert _backend_pid(db) != pid  # the pool dropped it; the next one reconnects
    finally:
        db.dispose()
