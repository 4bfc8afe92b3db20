"""Engines, sessions, and the one place a unit of work commits.

``Database.session()`` is the unit of work for API requests and worker tasks alike: it commits
on success and rolls back on error. Work to do *after* a commit (publishing task messages) is
registered with ``after_commit`` and runs only once the commit succeeded; a rollback drops it
(docs/architecture.md, invariant 2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from models.crypto import SecretBox
from models.reads import READ_ONLY_OPTION, EngineReads, PostgresReads, Reads
from rotator.settings import Settings, get_settings

log = logging.getLogger("rotator.db")

_AFTER_COMMIT = "rotator.after_commit"
_TRANSACTION_STATE = "rotator.transaction_state"
_IDLE_SINCE = "rotator.idle_since"


def make_engine(settings: Settings) -> Engine:
    """The engine for ``settings.database_url``. ``hide_parameters``: an error (or SQL logging)
    shows a statement but never its bound values, which can be ciphertexts, key hashes or an
    event's data (docs/operating.md, "Logs")."""
    url = settings.database_url
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            engine = create_engine(
                url,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
                hide_parameters=True,
            )
        else:
            # One connection: SQLite serialises writers anyway, and queueing in the pool is
            # fairer and faster than queueing in SQLite's busy handler.
            _ensure_sqlite_dir(url)
            engine = create_engine(
                url,
                pool_size=1,
                max_overflow=0,
                pool_timeout=60,
                connect_args={"check_same_thread": False, "timeout": 30},
                hide_parameters=True,
            )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    engine = create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        hide_parameters=True,
    )
    ping_after_idle(engine, settings.db_ping_after_idle_seconds)
    return engine


def ping_after_idle(engine: Engine, idle_seconds: float) -> None:
    """Ping a pooled connection before use only when it sat idle longer than ``idle_seconds``.

    ``pool_pre_ping`` would ping on every checkout: one more round trip per unit of work. A
    connection in steady use is known to be alive; one that sat idle may have been closed by
    the server, a restart or a firewall. A failed ping invalidates the whole pool (a restart
    killed them all) and the checkout retries on a fresh connection.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since < idle_seconds:
            return  # a new connection, or one in steady use
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            raise exc.InvalidatePoolError(str(type(error).__name__)) from error


def _ensure_sqlite_dir(url: str) -> None:
    from pathlib import Path

    path = url.split(":///", 1)[1]
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling issues a deferred BEGIN only before DML, so a unit of
    # work reads, then takes the write lock when it first writes: two processes could both read
    # "not revealed yet" and both write. SQLAlchemy emits the BEGIN instead (_sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    """Every unit of work on SQLite takes the database's write lock as it begins.

    SQLite has no row locks (``FOR UPDATE`` is not even parsed), so the checks that PostgreSQL
    makes under a row lock (reveal a secret once, the endpoint cap, the replay limit) would race
    between processes, e.g. the command line next to ``rotator dev``. ``BEGIN IMMEDIATE`` makes
    every unit of work run alone against the file, as on PostgreSQL's locked rows; readers
    (``EngineReads``, WAL mode) are not held up (docs/operating.md, "SQLite").
    """
    if connection.get_execution_options().get(READ_ONLY_OPTION):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """An engine, its session factory, the at-rest key box sessions carry, and ``reads``: the
    same database for read-only queries on the event loop (``models.reads``)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = make_engine(settings)
        self.box = SecretBox(settings.encryption_key_bytes())
        self._sessions = sessionmaker(
            self.engine, expire_on_commit=False, info={"box": self.box, "settings": settings}
        )
        self.reads: Reads = (
            PostgresReads(settings.database_url, max_size=settings.db_pool_size)
            if self.dialect == "postgresql"
            else EngineReads(self.engine)
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commit on success, roll back on any exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def create_schema(self) -> None:
        """Bring the schema to the newest migration."""
        from rotator.migrations import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def box_of(session: Session) -> SecretBox:
    box = session.info.get("box")
    if not isinstance(box, SecretBox):
        raise RuntimeError("session was not created by models.db.Database")
    return box


def settings_of(session: Session) -> Settings:
    settings = session.info.get("settings")
    return settings if isinstance(settings, Settings) else get_settings()


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the session's current transaction has committed."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def transaction_state(session: Session) -> dict[str, Any]:
    """A dict that lives until the session's current transaction commits or rolls back."""
    state: dict[str, Any] = session.info.setdefault(_TRANSACTION_STATE, {})
    return state


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    session.info.pop(_TRANSACTION_STATE, None)
    callbacks: list[Callable[[], None]] = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:
            # The row is committed; the reconciler re-derives the lost message from it.
            log.exception("after-commit callback failed")


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)
    session.info.pop(_TRANSACTION_STATE, None)


_database: Database | None = None


def get_database() -> Database:
    """The process's database, built from settings on first use."""
    global _database
    if _database is None:
        _database = Database(get_settings())
    return _database


def set_database(database: Database | None) -> None:
    """Install ``database`` as the process's database (the dev runner and tests)."""
    global _database
    _database = database
