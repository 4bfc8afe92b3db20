"""Read-only queries for the API's hot paths, run without leaving the event loop.

A unit of work (``Database.session``) is the right tool for anything that changes rows, but
for a single-row read it costs far more than the query: a worker-thread hop, an ORM session,
BEGIN and COMMIT. ``Reads`` runs a ``Query`` (a Core ``SELECT`` compiled once) instead:

- on PostgreSQL, on an asyncio connection from psycopg's pool, in autocommit (one statement is
  one snapshot, which is all READ COMMITTED gives a transaction anyway) and read-only (a query
  that tried to write would fail, not commit on its own);
- on SQLite, which has no asyncio driver here, through the engine in a worker thread.

Both hand back the same values: a dict per row, typed as the ORM would type them. A read that
meets a connection the server closed is retried once on a fresh one (reads are idempotent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, Select
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.engine import make_url

Row = dict[str, Any]

APPLICATION_NAME = "rotator-reads"  # how these connections show in pg_stat_activity
_PG_DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]


class Query:
    """A Core ``SELECT`` compiled once for PostgreSQL. Its ``bindparam``s are given by name when
    it runs; values written into the statement are kept. Parameter values go to the driver as
    they are (UUIDs, strings, aware datetimes), without the column types' bind processing."""

    def __init__(self, statement: Select[*tuple[Any, ...]]):
        self.statement = statement
        compiled = statement.compile(dialect=_PG_DIALECT)
        self.sql = str(compiled)
        self.defaults = {
            name: value for name, value in compiled.params.items() if value is not None
        }
        self.names = tuple(str(column.key) for column in statement.selected_columns)
        processors: list[tuple[int, Callable[[Any], Any]]] = []
        for index, column in enumerate(statement.selected_columns):
            processor = column.type.dialect_impl(_PG_DIALECT).result_processor(_PG_DIALECT, None)
            if processor is not None:
                processors.append((index, processor))
        self._processors = tuple(processors)

    def row(self, values: Sequence[Any]) -> Row:
        row = dict(zip(self.names, values, strict=True))
        for index, processor in self._processors:
            name = self.names[index]
            row[name] = processor(row[name])
        return row


class Reads:
    """Runs ``Query`` objects (``close`` before the event loop that ran them ends)."""

    async def one(self, query: Query, **params: Any) -> Row | None:
        rows = await self.all(query, **params)
        return rows[0] if rows else None

    async def all(self, query: Query, **params: Any) -> list[Row]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class PostgresReads(Reads):
    """psycopg's asyncio pool, one per event loop (a pool's connections belong to its loop)."""

    def __init__(self, database_url: str, *, max_size: int):
        url = make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._max_size = max_size
        self._pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool] = {}
        self._opening: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    async def _open(self) -> AsyncConnectionPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is not None:
            return pool
        async with self._opening.setdefault(loop, asyncio.Lock()):
            pool = self._pools.get(loop)
            if pool is None:
                pool = AsyncConnectionPool(
                    self._conninfo,
                    min_size=1,
                    max_size=self._max_size,
                    kwargs={
                        "autocommit": True,
                        "options": "-c default_transaction_read_only=on",
                        "application_name": APPLICATION_NAME,
                    },
                    open=False,
                    name="rotator-reads",
                )
                await pool.open()
                self._pools[loop] = pool
        return pool

    async def all(self, query: Query, **params: Any) -> list[Row]:
        pool = await self._open()
        try:
            return await self._all(pool, query, params)
        except psycopg.OperationalError:
            # The pool has dropped that connection; the others may be gone too (a server
            # restart): check them all, then try once more (a read is safe to repeat).
            await pool.check()
            return await self._all(pool, query, params)

    @staticmethod
    async def _all(pool: AsyncConnectionPool, query: Query, params: dict[str, Any]) -> list[Row]:
        values = {**query.defaults, **params} if query.defaults else params
        async with pool.connection() as connection:
            cursor = await connection.execute(query.sql, values, prepare=True, binary=True)
            return [query.row(values) for values in await cursor.fetchall()]

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        self._opening.pop(loop, None)
        pool = self._pools.pop(loop, None)
        if pool is not None:
            await pool.close()


class EngineReads(Reads):
    """The same queries through a synchronous engine, off the event loop."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def _all(self, query: Query, params: dict[str, Any]) -> list[Row]:
        with self._engine.connect() as connection:
            result = connection.execute(query.statement, params).mappings()
            return [{str(key): value for key, value in row.items()} for row in result]

    async def all(self, query: Query, **params: Any) -> list[Row]:
        return await asyncio.to_thread(self._all, query, params)
