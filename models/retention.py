"""Retention: history older than ``ROTATOR_RETENTION_DAYS`` is deleted, in small batches.

What goes, and what never does (docs/operating.md, Retention):

- a delivery attempt once it occurred before the cutoff, unless its delivery is unfinished
  (``pending``) or an unfinished operation still uses that delivery (its probe or handoff);
- a delivery once it was created before the cutoff, is finished, is not used by an unfinished
  operation, and has no attempt left (attempts reference deliveries);
- an event once it was created before the cutoff and no delivery references it any more;
- an operation, with its steps, once it finished before the cutoff, unless it is the last
  operation of a live rotation policy (the policy shows its id);
- an ``Idempotency-Key`` once its 24 hours are over (``models.idempotency.RETENTION``),
  whatever the setting.

Endpoints (deleted ones too), policies, organizations and org secrets are kept: an endpoint's
history goes by age like everyone else's, the endpoint row stays.

Each batch is one short transaction of at most ``batch_size`` rows per table (a few
statements), so no lock is held for long and a crash loses at most one batch's progress. The
candidate rows are locked with ``SKIP LOCKED`` on PostgreSQL: two ticks running at once (two
beats) split the work instead of waiting on each other. Deleting is idempotent: a tick that
runs again finds less, or nothing, to do.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Index, Select, Table, delete, exists, select, union_all
from sqlalchemy.orm import Session, aliased

from models import clock, idempotency
from models.db import Database
from models.delivery import (
    ATTEMPTS,
    DELIVERIES,
    EVENTS,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Event,
)
from models.idempotency import IdempotencyKey
from models.operation import Operation, OperationStep
from models.policy import RotationPolicy

log = logging.getLogger("rotator.retention")

BATCH_SIZE = 2000
# Operations are deleted with their steps (up to four each): a smaller batch of operations
# keeps each transaction near BATCH_SIZE rows.
OPERATIONS_PER_BATCH = BATCH_SIZE // 4
# A tick stops starting batches after this long; the next tick goes on where it stopped.
TICK_BUDGET_S = 20.0

_KEYS = cast(Table, IdempotencyKey.__table__)

# The indexes the prune queries walk. Declared here, beside the queries that need them (the
# migration 20261203_0007 creates them); each attaches itself to its table.
INDEXES = (
    Index("ix_delivery_attempts_occurred", ATTEMPTS.c.occurred_at),
    Index("ix_deliveries_created", DELIVERIES.c.created_at),
    # Deleting an event checks the deliveries that reference it (the foreign key), and the
    # prune asks the same question: without it, each is a scan of every delivery.
    Index("ix_deliveries_event", DELIVERIES.c.event_id),
    Index("ix_events_created", EVENTS.c.created_at),
    Index("ix_idempotency_keys_created", _KEYS.c.created_at),
)


@dataclass
class Pruned:
    """Rows deleted, per table."""

    delivery_attempts: int = 0
    deliveries: int = 0
    events: int = 0
    operations: int = 0
    operation_steps: int = 0
    idempotency_keys: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, field.name) for field in fields(self))

    def add(self, other: Pruned) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def cutoff(days: int, now: datetime | None = None) -> datetime:
    """Rows older than this are history to delete."""
    return (now or clock.now()) - timedelta(days=days)


def _locked(session: Session, query: Select[Any]) -> Select[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def _in_use_by_unfinished_operations() -> Select[Any]:
    """Deliveries an unfinished operation still reads (its probe and its handoff)."""
    unfinished = Operation.finished_at.is_(None)
    return cast(
        Select[Any],
        union_all(
            select(Operation.probe_delivery_id).where(
                unfinished, Operation.probe_delivery_id.is_not(None)
            ),
            select(Operation.handoff_delivery_id).where(
                unfinished, Operation.handoff_delivery_id.is_not(None)
            ),
        ),
    )


def _delete_ids(session: Session, table: Table, ids: Select[Any]) -> int:
    result = session.execute(delete(table).where(table.c.id.in_(ids.scalar_subquery())))
    return int(getattr(result, "rowcount", 0) or 0)


# The checks on the row a candidate references are correlated scalar subqueries, not
# EXISTS: PostgreSQL turns EXISTS into a hash join that reads the whole other table for every
# batch (half a second per batch on a million attempts); a scalar subquery stays a primary-key
# or index lookup per candidate, and a batch stops after ``limit`` of them.


def _delivery_state() -> Any:
    return (
        select(Delivery.state).where(Delivery.id == DeliveryAttempt.delivery_id).scalar_subquery()
    )


def _none_left(query: Select[Any]) -> Any:
    return query.limit(1).scalar_subquery().is_(None)


def prune_attempts(session: Session, before: datetime, limit: int = BATCH_SIZE) -> int:
    ids = (
        select(DeliveryAttempt.id)
        .where(
            DeliveryAttempt.occurred_at < before,
            _delivery_state() != DeliveryState.PENDING,
            DeliveryAttempt.delivery_id.not_in(_in_use_by_unfinished_operations()),
        )
        .limit(limit)
    )
    return _delete_ids(session, ATTEMPTS, _locked(session, ids))


def prune_deliveries(session: Session, before: datetime, limit: int = BATCH_SIZE) -> int:
    ids = (
        select(Delivery.id)
        .where(
            Delivery.created_at < before,
            Delivery.state != DeliveryState.PENDING,
            _none_left(
                select(DeliveryAttempt.id).where(DeliveryAttempt.delivery_id == Delivery.id)
            ),
            Delivery.id.not_in(_in_use_by_unfinished_operations()),
        )
        .limit(limit)
    )
    return _delete_ids(session, DELIVERIES, _locked(session, ids))


def prune_events(session: Session, before: datetime, limit: int = BATCH_SIZE) -> int:
    ids = (
        select(Event.id)
        .where(
            Event.created_at < before,
            _none_left(select(Delivery.id).where(Delivery.event_id == Event.id)),
        )
        .limit(limit)
    )
    return _delete_ids(session, EVENTS, _locked(session, ids))


def prune_operations(
    session: Session, before: datetime, limit: int = OPERATIONS_PER_BATCH
) -> tuple[int, int]:
    """(operations, steps) deleted: finished before ``before``, not a live policy's last, and
    not a bulk migrate whose children are still kept (they go first)."""
    last_of_a_policy = exists().where(
        RotationPolicy.last_operation_id == Operation.id, RotationPolicy.deleted_at.is_(None)
    )
    child = aliased(Operation)
    has_children = exists().where(child.parent_id == Operation.id)
    ids: list[uuid.UUID] = list(
        session.scalars(
            _locked(
                session,
                select(Operation.id)
                .where(Operation.finished_at < before, ~last_of_a_policy, ~has_children)
                .limit(limit),
            )
        )
    )
    if not ids:
        return 0, 0
    steps = session.execute(delete(OperationStep).where(OperationStep.operation_id.in_(ids)))
    operations = session.execute(delete(Operation).where(Operation.id.in_(ids)))
    return (
        int(getattr(operations, "rowcount", 0) or 0),
        int(getattr(steps, "rowcount", 0) or 0),
    )


def prune_idempotency_keys(session: Session, now: datetime, limit: int = BATCH_SIZE) -> int:
    """Keys past their 24 hours (``recall`` already treats them as unused)."""
    ids = (
        select(IdempotencyKey.id)
        .where(IdempotencyKey.created_at <= now - idempotency.RETENTION)
        .limit(limit)
    )
    return _delete_ids(session, _KEYS, _locked(session, ids))


@dataclass(frozen=True)
class _Kind:
    """One kind of batch, run until it deletes fewer rows than its limit."""

    limit: int
    run: Callable[[Session], Pruned]
    count: Callable[[Pruned], int]


def _kinds(now: datetime, days: int, batch_size: int) -> list[_Kind]:
    before = cutoff(days, now)
    operations_limit = max(1, batch_size // 4)

    def operations(session: Session) -> Pruned:
        deleted, steps = prune_operations(session, before, operations_limit)
        return Pruned(operations=deleted, operation_steps=steps)

    # Attempts, then the deliveries they leave empty, then the events those leave unreferenced
    # (the foreign keys' order); then operations and idempotency keys.
    return [
        _Kind(
            batch_size,
            lambda s: Pruned(delivery_attempts=prune_attempts(s, before, batch_size)),
            lambda pruned: pruned.delivery_attempts,
        ),
        _Kind(
            batch_size,
            lambda s: Pruned(deliveries=prune_deliveries(s, before, batch_size)),
            lambda pruned: pruned.deliveries,
        ),
        _Kind(
            batch_size,
            lambda s: Pruned(events=prune_events(s, before, batch_size)),
            lambda pruned: pruned.events,
        ),
        _Kind(operations_limit, operations, lambda pruned: pruned.operations),
        _Kind(
            batch_size,
            lambda s: Pruned(idempotency_keys=prune_idempotency_keys(s, now, batch_size)),
            lambda pruned: pruned.idempotency_keys,
        ),
    ]


def prune(
    db: Database,
    *,
    days: int | None = None,
    batch_size: int = BATCH_SIZE,
    budget_seconds: float = TICK_BUDGET_S,
) -> Pruned:
    """Delete what retention allows, one short transaction per batch, for at most about
    ``budget_seconds`` (the next call goes on). Safe to run concurrently and repeatedly."""
    days = db.settings.retention_days if days is None else days
    now = clock.now()
    started = time.monotonic()
    total = Pruned()
    for kind in _kinds(now, days, batch_size):
        while time.monotonic() - started < budget_seconds:
            with db.session() as session:
                pruned = kind.run(session)
            total.add(pruned)
            if kind.count(pruned) < kind.limit:
                break
    return total
