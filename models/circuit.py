"""A circuit per endpoint: a receiver that keeps failing is backed off, not hammered.

Each event delivery whose attempt got no usable answer (no response at all, a 5xx or a 429)
counts against its endpoint; ``circuit_failure_threshold`` of them in a row open the circuit
for ``circuit_open_seconds``, doubling each time it opens again, up to
``circuit_max_open_seconds``. While it is open the data plane claims none of that endpoint's
event deliveries; they keep their place and their remaining retries (an open circuit spends
no attempt). Once the time is up the circuit is half-open: one delivery at a time goes
through, and its outcome closes the circuit or opens it again for longer. Any success closes
it, a synchronous test delivery's or a safe migrate's probe included: those are never held
back by a circuit (docs/operating.md, "Isolation").
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import ForeignKey, Integer, Table, bindparam, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models.base import Base, UTCDateTime
from models.db import settings_of


class EndpointCircuit(Base):
    """One row per endpoint that has failed since it last succeeded (no row: closed)."""

    __tablename__ = "endpoint_circuits"

    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id"), primary_key=True
    )
    # Unusable answers in a row since the last success (or since the circuit last opened).
    failures: Mapped[int] = mapped_column(Integer, default=0)
    # How many times the circuit opened without a success in between: its next open time.
    trips: Mapped[int] = mapped_column(Integer, default=0)
    # Set while open or half-open: no delivery before this time, then one at a time.
    open_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


def unusable(status: int | None) -> bool:
    """An answer that says nothing about our request: none at all, a 5xx, or a 429."""
    return status is None or status >= 500 or status == 429


def open_seconds(trips: int, first: float, longest: float) -> float:
    """How long the circuit stays open after its ``trips``-th opening in a row (1-based)."""
    return float(min(longest, first * 2.0 ** max(0, trips - 1)))


def note(
    session: Session, outcomes: Iterable[tuple[uuid.UUID, bool, bool]]
) -> dict[uuid.UUID, datetime]:
    """Count attempts' outcomes ``(endpoint_id, succeeded, counts_as_failure)``.

    Returns the endpoints whose circuit this opened (or opened again), with the time it stays
    open until. A success anywhere in the batch closes its endpoint's circuit.
    """
    succeeded: set[uuid.UUID] = set()
    failed: dict[uuid.UUID, int] = {}
    for endpoint_id, ok, failure in outcomes:
        if ok:
            succeeded.add(endpoint_id)
        elif failure:
            failed[endpoint_id] = failed.get(endpoint_id, 0) + 1
    for endpoint_id in succeeded:
        failed.pop(endpoint_id, None)
    if succeeded:
        # Core, on the session's connection: it runs for every batch the data plane records.
        session.connection().execute(_close_statement(), {"ids": list(succeeded)})
    if not failed:
        return {}
    settings = settings_of(session)
    now = clock.now()
    # Several workers may count the same endpoint at once: create missing rows without a
    # conflict, then change them under their row locks.
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(EndpointCircuit)
        .values([{"endpoint_id": e, "failures": 0, "trips": 0, "updated_at": now} for e in failed])
        .on_conflict_do_nothing(index_elements=["endpoint_id"])
    )
    rows = session.scalars(
        select(EndpointCircuit)
        .where(EndpointCircuit.endpoint_id.in_(failed))
        .order_by(EndpointCircuit.endpoint_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )
    opened: dict[uuid.UUID, datetime] = {}
    for row in rows:
        count = failed[row.endpoint_id]
        half_open = row.open_until is not None and row.open_until <= now
        row.failures += count
        row.updated_at = now
        if half_open or row.failures >= settings.circuit_failure_threshold:
            row.trips += 1
            row.failures = 0
            row.open_until = now + timedelta(
                seconds=open_seconds(
                    row.trips, settings.circuit_open_seconds, settings.circuit_max_open_seconds
                )
            )
            opened[row.endpoint_id] = row.open_until
    session.flush()
    return opened


@cache
def _close_statement() -> Any:
    """``note``'s ``DELETE`` of the circuits a success closes, built once."""
    table = cast(Table, EndpointCircuit.__table__)
    return delete(table).where(table.c.endpoint_id.in_(bindparam("ids", expanding=True)))


def open_count(session: Session) -> int:
    """Endpoints whose circuit is open now (half-open ones are not counted): for /metrics."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(EndpointCircuit)
            .where(EndpointCircuit.open_until > clock.now())
        )
        or 0
    )
