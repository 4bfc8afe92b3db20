"""Reads on the event loop (``models.reads``): the values a unit of work would see, on both
backends; never a write; a connection the server closed costs no error."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import fields
from datetime import timedelta
from typing import TypeVar

import psycopg
import pytest
from sqlalchemy import Float, bindparam, func, select, text, update

from models.db import Database
from models.endpoint import (
    EndpointView,
    create_endpoint,
    get_endpoint,
    read_endpoint,
)
from models.errors import NotFound
from models.org import Organization
from models.reads import APPLICATION_NAME, Query
from models.usecases import delete_endpoint
from tests.factories import make_tenant
from tests.support import BACKEND

T = TypeVar("T")

postgres_only = pytest.mark.skipif(BACKEND != "real", reason="PostgreSQL behaviour")


def _run(database: Database, read: Callable[[], Awaitable[T]]) -> T:
    """One event loop for ``read``; the read pool closes with it."""

    async def run() -> T:
        try:
            return await read()
        finally:
            await database.reads.close()

    return asyncio.run(run())


def _endpoint(database: Database) -> tuple[uuid.UUID, uuid.UUID]:
    tenant = make_tenant(database)
    with database.session() as session:
        created = create_endpoint(
            session,
            tenant.org_id,
            url="https://example.com/hook",
            events=["campaign.approved", "brand.vetted"],
            description="reads",
            api_version=None,
        )
    return tenant.org_id, created.endpoint.id


def test_a_read_shows_what_a_unit_of_work_sees(database: Database) -> None:
    org_id, endpoint_id = _endpoint(database)
    view = _run(database, lambda: read_endpoint(database.reads, org_id, endpoint_id))
    with database.session() as session:
        orm = get_endpoint(session, org_id, endpoint_id)
        for field in fields(EndpointView):
            value = getattr(view, field.name)
            assert value == getattr(orm, field.name), field.name
            assert type(value) is type(getattr(orm, field.name)), field.name
    assert view.created_at.utcoffset() == timedelta(0)
    assert not hasattr(view, "secret_ciphertext")


def test_a_read_finds_only_live_endpoints_of_the_caller(database: Database) -> None:
    org_id, endpoint_id = _endpoint(database)
    other = make_tenant(database, name="Other")
    with pytest.raises(NotFound):
        _run(database, lambda: read_endpoint(database.reads, other.org_id, endpoint_id))
    with database.session() as session:
        delete_endpoint(session, org_id, endpoint_id)
    with pytest.raises(NotFound):
        _run(database, lambda: read_endpoint(database.reads, org_id, endpoint_id))


def test_reads_asked_for_together_each_get_their_own_answer(database: Database) -> None:
    """Concurrent reads share round trips (a pipeline on PostgreSQL), never answers."""
    asks: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID | None]] = []
    for _ in range(3):
        org_id, endpoint_id = _endpoint(database)
        asks.append((org_id, endpoint_id, endpoint_id))
    asks += [(asks[0][0], asks[1][1], None), (asks[2][0], uuid.uuid4(), None)]  # not theirs
    asks = asks * 8

    async def read(org_id: uuid.UUID, endpoint_id: uuid.UUID) -> uuid.UUID | None:
        try:
            return (await read_endpoint(database.reads, org_id, endpoint_id)).id
        except NotFound:
            return None

    async def read_all() -> list[uuid.UUID | None]:
        await read(*asks[0][:2])  # the pool is open: the rest go as one batch
        return await asyncio.gather(*(read(org_id, endpoint_id) for org_id, endpoint_id, _ in asks))

    assert _run(database, read_all) == [expected for _, _, expected in asks]


@postgres_only
def test_a_read_that_fails_fails_alone(database: Database) -> None:
    org_id, endpoint_id = _endpoint(database)
    root = Query(select(func.sqrt(bindparam("x", type_=Float)).label("root")))

    async def together() -> tuple[object, ...]:
        await read_endpoint(database.reads, org_id, endpoint_id)  # the pool is open: one batch
        return tuple(
            await asyncio.gather(
                read_endpoint(database.reads, org_id, endpoint_id),
                database.reads.one(root, x=-1.0),
                database.reads.one(root, x=4.0),
                read_endpoint(database.reads, org_id, endpoint_id),
                return_exceptions=True,
            )
        )

    first, failed, rooted, last = _run(database, together)
    assert isinstance(failed, psycopg.errors.InvalidArgumentForPowerFunction), failed
    assert rooted == {"root": 2.0}
    assert isinstance(first, EndpointView)
    assert isinstance(last, EndpointView)
    assert first.id == last.id == endpoint_id


@postgres_only
def test_reads_cannot_write(database: Database) -> None:
    tenant = make_tenant(database, name="Before")
    renamed = (
        update(Organization)
        .where(Organization.id == tenant.org_id)
        .values(name="After")
        .returning(Organization.id)
        .cte("renamed")
    )
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        _run(database, lambda: database.reads.one(Query(select(renamed.c.id))))
    with database.session() as session:
        assert session.get(Organization, tenant.org_id).name == "Before"  # type: ignore[union-attr]


@postgres_only
def test_a_read_on_a_connection_the_server_closed_is_retried(database: Database) -> None:
    org_id, endpoint_id = _endpoint(database)

    def read_connections(action: str) -> int:
        with database.engine.begin() as connection:
            return len(
                connection.execute(
                    text(
                        f"SELECT {action} FROM pg_stat_activity"  # noqa: S608 - our own SQL
                        " WHERE application_name = :name AND datname = current_database()"
                    ),
                    {"name": APPLICATION_NAME},
                ).all()
            )

    async def read_kill_read() -> EndpointView:
        await asyncio.gather(
            *(read_endpoint(database.reads, org_id, endpoint_id) for _ in range(4))
        )
        assert read_connections("pg_terminate_backend(pid)") >= 1
        for _ in range(200):
            if not read_connections("pid"):
                break
            await asyncio.sleep(0.05)
        return await read_endpoint(database.reads, org_id, endpoint_id)

    assert _run(database, read_kill_read).id == endpoint_id
