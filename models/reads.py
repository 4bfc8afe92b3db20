"""Read-only queries for the API's hot paths, run without leaving the event loop.

A unit of work (``Database.session``) is the right tool for anything that changes rows, but
for a single-row read it costs far more than the query: a worker-thread hop, an ORM session,
BEGIN and COMMIT. ``Reads`` runs a ``Query`` (a Core ``SELECT`` compiled once) instead:

- on PostgreSQL, on an asyncio connection from psycopg's pool, in autocommit (one statement is
  one snapshot, which is all READ COMMITTED gives a transaction anyway) and read-only (a query
  that tried to write would fail, not commit on its own); reads asked for together are sent
  together, in one pipeline;
- on SQLite, which has no asyncio driver here, through the engine in a worker thread.

Both hand back the same values: a dict per row, typed as the ORM would type them. A read that
meets a connection the server closed is retried once on a fresh one (reads are idempotent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, Select
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.types import TypeDecorator

Row = dict[str, Any]

# An execution option: a SQLite connection carrying it begins a deferred transaction
# (models.db._sqlite_begin), so a read never waits for SQLite's write lock.
READ_ONLY_OPTION = "rotator_read_only"
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
            # psycopg hands back native values for the standard types; a TypeDecorator (such as
            # UTCDateTime) has its own processing to apply.
            if isinstance(column.type, TypeDecorator):
                processor = column.type.result_processor(_PG_DIALECT, None)
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


@dataclass
class _Waiting:
    query: Query
    values: dict[str, Any]
    future: asyncio.Future[list[Row]]

    def resolve(self, values: Sequence[Sequence[Any]]) -> None:
        if not self.future.done():  # the request may have gone away
            self.future.set_result([self.query.row(row) for row in values])

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class _LoopReads:
    """One event loop's pool, the reads waiting for the next batch, the batches in flight."""

    pool: AsyncConnectionPool
    waiting: list[_Waiting] = field(default_factory=list)
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)


class PostgresReads(Reads):
    """psycopg's asyncio pool, one per event loop (a pool's connections belong to its loop).

    Reads asked for in the same turn of the event loop go to PostgreSQL together, as one
    pipeline on one connection: under load, one round trip serves many requests instead of one
    each. Every read still gets its own statement and its own answer, or its own error.
    """

    def __init__(self, database_url: str, *, max_size: int):
        url = make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._max_size = max_size
        self._loops: dict[asyncio.AbstractEventLoop, _LoopReads] = {}
        self._opening: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _LoopReads:
        async with self._opening.setdefault(loop, asyncio.Lock()):
            reads = self._loops.get(loop)
            if reads is None:
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
                reads = self._loops[loop] = _LoopReads(pool)
        return reads

    async def all(self, query: Query, **params: Any) -> list[Row]:
        loop = asyncio.get_running_loop()
        reads = self._loops.get(loop) or await self._open(loop)
        values = {**query.defaults, **params} if query.defaults else params
        waiting = _Waiting(query, values, loop.create_future())
        reads.waiting.append(waiting)
        if len(reads.waiting) == 1:  # the first of this turn: send the batch on the next one
            loop.call_soon(self._send, reads)
        return await waiting.future

    def _send(self, reads: _LoopReads) -> None:
        batch, reads.waiting = reads.waiting, []
        task = asyncio.ensure_future(self._run(reads.pool, batch))
        reads.in_flight.add(task)
        task.add_done_callback(reads.in_flight.discard)

    async def _run(self, pool: AsyncConnectionPool, batch: list[_Waiting]) -> None:
        try:
            try:
                await self._execute(pool, batch)
            except psycopg.OperationalError:
                # The pool has dropped that connection; the others may be gone too (a server
                # restart): check them all, then try once more (reads are safe to repeat).
                await pool.check()
                await self._execute(pool, [item for item in batch if not item.future.done()])
        except Exception as error:
            for item in batch:
                item.fail(error)

    @staticmethod
    async def _execute(pool: AsyncConnectionPool, batch: list[_Waiting]) -> None:
        async with pool.connection() as connection:
            if len(batch) > 1:
                try:
                    async with connection.pipeline() as pipeline:
                        cursors = [
                            await connection.execute(
                                item.query.sql, item.values, prepare=True, binary=True
                            )
                            for item in batch
                        ]
                        await pipeline.sync()
                    results = [await cursor.fetchall() for cursor in cursors]
                except psycopg.OperationalError:
                    raise
                except psycopg.Error:
                    pass  # one statement failed, aborting the others: run them one by one
                else:
                    for item, rows in zip(batch, results, strict=True):
                        item.resolve(rows)
                    return
            for item in batch:
                try:
                    cursor = await connection.execute(
                        item.query.sql, item.values, prepare=True, binary=True
                    )
                    item.resolve(await cursor.fetchall())
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as error:
                    item.fail(error)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        self._opening.pop(loop, None)
        reads = self._loops.pop(loop, None)
        if reads is not None:
            await asyncio.gather(*reads.in_flight, return_exceptions=True)
            await reads.pool.close()


class EngineReads(Reads):
    """The same queries through a synchronous engine, off the event loop."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def _all(self, query: Query, params: dict[str, Any]) -> list[Row]:
        with self._engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as connection:
            result = connection.execute(query.statement, params).mappings()
            return [{str(key): value for key, value in row.items()} for row in result]

    async def all(self, query: Query, **params: Any) -> list[Row]:
        return await asyncio.to_thread(self._all, query, params)
