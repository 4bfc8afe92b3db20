"""Two units of work racing from two connection pools, as two processes would (the command line
next to ``rotator dev``): each check-then-write still lets exactly one through. On PostgreSQL the
row locks see to it; on SQLite, which has none, every unit of work begins ``BEGIN IMMEDIATE``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select, text

from models import endpoint as endpoints
from models import migration as migrations
from models import operation as operations
from models.db import Database
from models.endpoint import WebhookEndpoint
from models.errors import Conflict, LimitExceeded
from models.org import ALL_SCOPES
from models.reads import Query
from rotator.settings import Settings
from tests.factories import Tenant, make_tenant

URL = "https://hooks.example.com/rotator"
# How long a unit of work that reached its write waits for the other to reach its own. With the
# locking right, the other is still waiting to begin: the wait runs out and the first goes on.
RENDEZVOUS_S = 1.0


@contextmanager
def two_pools(settings: Settings) -> Iterator[tuple[Database, Database]]:
    """Two Databases on the same database: separate engines, separate connections."""
    first, second = Database(settings), Database(settings)
    try:
        yield first, second
    finally:
        first.dispose()
        second.dispose()


@contextmanager
def meeting_before(pools: tuple[Database, ...], statement_prefix: str) -> Iterator[None]:
    """Each pool's first ``statement_prefix`` waits until both reached it (or RENDEZVOUS_S
    passed): both have made their checks by then, unless the first one's lock kept the other
    from starting."""
    barrier = threading.Barrier(len(pools))

    def wait(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith(statement_prefix):
            try:
                barrier.wait(timeout=RENDEZVOUS_S)
            except threading.BrokenBarrierError:
                pass

    for pool in pools:
        event.listen(pool.engine, "before_cursor_execute", wait)
    try:
        yield
    finally:
        for pool in pools:
            event.remove(pool.engine, "before_cursor_execute", wait)


def race(*units: Callable[[], Any]) -> list[Any]:
    """Run the units at once, each in its own thread; their results or exceptions, in order."""
    results: list[Any] = [None] * len(units)

    def run(index: int, unit: Callable[[], Any]) -> None:
        try:
            results[index] = unit()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=item) for item in enumerate(units)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def _source(database: Database, tenant: Tenant) -> Any:
    with database.session() as session:
        return endpoints.create_endpoint(session, tenant.org_id, url=URL, events=["brand.vetted"])


def test_a_secret_is_revealed_once_when_two_processes_ask_at_once(database, settings):
    tenant = make_tenant(database)
    source = _source(database, tenant).endpoint
    with database.session() as session:
        started = migrations.start_migration(session, tenant.org_id, source.id, reveal=False)
    operation_id = started.operation.id

    with two_pools(settings) as pools, meeting_before(pools, "UPDATE operations"):

        def reveal(pool: Database) -> Callable[[], str]:
            def unit() -> str:
                with pool.session() as session:
                    return operations.reveal_secret(
                        session, tenant.org_id, operation_id, scopes=ALL_SCOPES
                    )[1]

            return unit

        results = race(reveal(pools[0]), reveal(pools[1]))

    revealed = [result for result in results if isinstance(result, str)]
    refused = [result for result in results if isinstance(result, Conflict)]
    assert len(revealed) == 1, results
    assert len(refused) == 1, results


def test_two_creates_cannot_both_take_the_last_endpoint_slot(database, settings):
    tenant = make_tenant(database)
    capped = settings.model_copy(update={"endpoint_limit": 1})

    with two_pools(capped) as pools, meeting_before(pools, "INSERT INTO webhook_endpoints"):

        def create(pool: Database) -> Callable[[], Any]:
            def unit() -> Any:
                with pool.session() as session:
                    return endpoints.create_endpoint(
                        session, tenant.org_id, url=URL, events=["brand.vetted"]
                    ).endpoint.id

            return unit

        results = race(create(pools[0]), create(pools[1]))

    assert sum(isinstance(result, LimitExceeded) for result in results) == 1, results
    with database.session() as session:
        live = session.scalar(
            select(func.count())
            .select_from(WebhookEndpoint)
            .where(WebhookEndpoint.org_id == tenant.org_id)
        )
    assert live == 1


def test_reads_go_on_while_another_process_holds_the_write_lock(database, settings):
    if database.dialect != "sqlite":
        pytest.skip("the write lock and its deferred readers are SQLite's")
    tenant = make_tenant(database)
    endpoint_id = _source(database, tenant).endpoint.id
    query = Query(select(WebhookEndpoint.url).where(WebhookEndpoint.id == endpoint_id))
    with two_pools(settings) as (writer, reader):
        with writer.session() as session:  # BEGIN IMMEDIATE: the file's write lock is taken
            session.execute(select(WebhookEndpoint.id).limit(1)).all()

            async def read() -> Any:
                try:
                    return await reader.reads.one(query, endpoint_id=endpoint_id)
                finally:
                    await reader.reads.close()

            row = asyncio.run(asyncio.wait_for(read(), timeout=10))
    assert row == {"url": URL}


def test_a_write_in_flight_does_not_hold_up_endpoint_creation_or_a_migrate(database, settings):
    """Every insert that references the organization or an endpoint (an event, a delivery, an
    operation) takes ``FOR KEY SHARE`` on those rows for its foreign-key check until it commits.
    Rotator's own row locks are ``FOR NO KEY UPDATE`` (docs/architecture.md, "Row locks"), which
    that lock does not block: with ``FOR UPDATE``, creating an endpoint would wait for every
    unfinished write of its organization, and every write of the organization for it."""
    if database.dialect != "postgresql":
        pytest.skip("row lock modes are PostgreSQL's")
    tenant = make_tenant(database)
    source = _source(database, tenant).endpoint
    with two_pools(settings) as (writer, other):
        with writer.engine.connect() as held:
            held.begin()
            held.execute(
                text("SELECT id FROM organizations WHERE id = :id FOR KEY SHARE"),
                {"id": tenant.org_id},
            )
            held.execute(
                text("SELECT id FROM webhook_endpoints WHERE id = :id FOR KEY SHARE"),
                {"id": source.id},
            )

            # Each unit of work gives up on a lock it waits 5 s for, instead of the test hanging.
            with other.session() as session:
                session.execute(text("SET LOCAL lock_timeout = '5s'"))
                endpoints.create_endpoint(session, tenant.org_id, url=URL, events=["brand.vetted"])
            with other.session() as session:
                session.execute(text("SET LOCAL lock_timeout = '5s'"))
                started = migrations.start_migration(session, tenant.org_id, source.id)
            with other.session() as session:
                session.execute(text("SET LOCAL lock_timeout = '5s'"))
                migrations.begin_advance(session, started.operation.id)  # create_endpoint
            held.rollback()

    with database.session() as session:
        operation = session.get(operations.Operation, started.operation.id)
        assert operation is not None
        assert operation.new_endpoint_id is not None
