"""Bulk migrate: one operation that safe-migrates many endpoints (docs/architecture.md,
"Bulk migrate").

The bulk operation is a row without steps; each selected endpoint gets an ordinary safe-migrate
child (``parent_id``) at once. A child waits (``started_at`` NULL, state ``pending``) until its
parent has room: at most ``max_concurrency`` children are started and unfinished at any
instant. Room is counted and children are started only under the parent's row lock, in the unit
of work that creates the parent, ends a child, or cancels the parent, so the progress lives in
the database: a lost, duplicated or replayed message can neither start a child twice nor start
one too many. A started child's first advance is due at once; if its message is lost the
reconciler finds it like any overdue operation.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import clock
from models import migration as migrations
from models import operation as operations
from models.endpoint import WebhookEndpoint
from models.errors import ValidationFailed, raise_if_any
from models.events import SUBSCRIBABLE_EVENT_TYPES
from models.operation import (
    CONCURRENCY_DEFAULT,
    DEADLINE_DEFAULT_S,
    TERMINAL_STATES,
    Operation,
    OperationKind,
    OperationState,
    Trigger,
    check_concurrency,
    check_deadline,
    new_operation,
)

MAX_NAMED = 1000  # endpoint_ids in one request
HANDOFFS = ("none", "in_band")
CHILDREN_FAILED = "CHILDREN_FAILED"
CHILD_STATES = tuple(state.value for state in OperationState)


@dataclass(frozen=True)
class BulkStarted:
    operation: Operation
    # (source endpoint id, the child's new secret), shown once; empty with in-band handoff.
    secrets: list[tuple[uuid.UUID, str]] = field(repr=False)
    started: list[uuid.UUID]  # children to advance once this unit of work commits


def select_endpoints(
    session: Session,
    org_id: uuid.UUID,
    *,
    endpoint_ids: Sequence[uuid.UUID] | None,
    events: Sequence[str] | None,
) -> list[WebhookEndpoint]:
    """The endpoints a bulk migrate would take, oldest first: every active endpoint of the
    organization, or those named; with ``events``, only those subscribed to one of them.
    Paused endpoints are never selected. A named id that is not a live endpoint of the
    organization, or an empty selection, is a 422 naming what is wrong."""
    problems: dict[str, str] = {}
    if events is not None:
        unknown = [name for name in events if name not in SUBSCRIBABLE_EVENT_TYPES]
        if not events or unknown:
            problems["events"] = (
                f"unknown event types: {', '.join(unknown)}" if unknown else "must not be empty"
            )
    query = select(WebhookEndpoint).where(
        WebhookEndpoint.org_id == org_id, WebhookEndpoint.deleted_at.is_(None)
    )
    named: list[uuid.UUID] = []
    if endpoint_ids is not None:
        named = list(dict.fromkeys(endpoint_ids))
        if not named or len(named) > MAX_NAMED:
            problems["endpoint_ids"] = f"must name 1-{MAX_NAMED} endpoints"
        query = query.where(WebhookEndpoint.id.in_(named))
    if problems:
        raise ValidationFailed(problems)
    rows = list(
        session.scalars(query.order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)).all()
    )
    missing = sorted(str(item) for item in set(named) - {row.id for row in rows})
    if missing:
        raise ValidationFailed(
            {"endpoint_ids": f"not live endpoints of this organization: {', '.join(missing)}"}
        )
    wanted = set(events or ())
    chosen = [row for row in rows if row.active and (not wanted or wanted & set(row.events))]
    if not chosen:
        raise ValidationFailed({"endpoint_ids": "no active endpoint matches the selection"})
    return chosen


def check(*, max_concurrency: int, deadline_seconds: int, handoff: str) -> None:
    """422 naming each setting of a bulk migrate that is out of range (a dry run's too)."""
    problems = {
        "max_concurrency": check_concurrency(max_concurrency),
        "deadline_seconds": check_deadline(deadline_seconds),
        "handoff": None if handoff in HANDOFFS else f"must be one of {', '.join(HANDOFFS)}",
    }
    raise_if_any(problems)


def start(
    session: Session,
    org_id: uuid.UUID,
    *,
    endpoint_ids: Sequence[uuid.UUID] | None = None,
    events: Sequence[str] | None = None,
    max_concurrency: int = CONCURRENCY_DEFAULT,
    deadline_seconds: int = DEADLINE_DEFAULT_S,
    handoff: str = "none",
    trigger: Trigger = Trigger.API,
    policy_id: uuid.UUID | None = None,
    scheduled_for: datetime | None = None,
) -> BulkStarted:
    """Start a bulk migrate: the parent, a waiting child per selected endpoint, and the first
    ``max_concurrency`` of them started. An endpoint that an unfinished migration uses (a
    waiting child included) is a 409 naming it, and nothing is started."""
    check(max_concurrency=max_concurrency, deadline_seconds=deadline_seconds, handoff=handoff)
    chosen = select_endpoints(session, org_id, endpoint_ids=endpoint_ids, events=events)
    now = clock.now()
    parent = new_operation(
        org_id,
        OperationKind.BULK_MIGRATE,
        now,
        state=OperationState.RUNNING,
        trigger=trigger,
        policy_id=policy_id,
        scheduled_for=scheduled_for,
        params={
            "max_concurrency": max_concurrency,
            "deadline_seconds": deadline_seconds,
            "endpoints": len(chosen),
        },
        handoff=handoff,
        secret_revealed=True,
        started_at=now,
    )
    session.add(parent)
    session.flush()
    secrets = []
    for endpoint in chosen:
        child = migrations.start_migration(
            session,
            org_id,
            endpoint.id,
            deadline_seconds=deadline_seconds,
            trigger=trigger,
            handoff=handoff,
            # Shown in the 202 of an API request; a scheduled run's are revealed on request.
            reveal=handoff == "none" and trigger == Trigger.API,
            parent_id=parent.id,
            start=False,
        )
        if child.secret is not None:
            secrets.append((endpoint.id, child.secret))
    operations.count_started(session, OperationKind.BULK_MIGRATE)
    return BulkStarted(operation=parent, secrets=secrets, started=start_next(session, parent))


def _lock(session: Session, parent_id: uuid.UUID) -> Operation | None:
    return session.scalars(
        select(Operation)
        .where(Operation.id == parent_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).one_or_none()


def _active(parent_id: uuid.UUID) -> tuple[Any, ...]:
    """Children started and not finished: the ones ``max_concurrency`` counts."""
    return (
        Operation.parent_id == parent_id,
        Operation.started_at.is_not(None),
        Operation.finished_at.is_(None),
    )


def _waiting(parent_id: uuid.UUID) -> tuple[Any, ...]:
    """Children waiting for room."""
    return (
        Operation.parent_id == parent_id,
        Operation.started_at.is_(None),
        Operation.finished_at.is_(None),
    )


def start_next(session: Session, parent: Operation) -> list[uuid.UUID]:
    """Start waiting children, oldest first, while the parent has room; their ids. The caller
    holds the parent's row lock (or has just created it)."""
    if parent.finished or parent.cancel_requested:
        return []
    active = (
        session.scalar(select(func.count()).select_from(Operation).where(*_active(parent.id))) or 0
    )
    room = int(parent.params["max_concurrency"]) - active
    if room <= 0:
        return []
    waiting = session.scalars(
        select(Operation)
        .where(*_waiting(parent.id))
        .order_by(Operation.created_at, Operation.id)
        .limit(room)
    ).all()
    now = clock.now()
    deadline = timedelta(seconds=int(parent.params["deadline_seconds"]))
    for child in waiting:
        child.started_at = now
        child.deadline_at = now + deadline
        child.next_advance_at = now
        child.updated_at = now
    if waiting:
        parent.updated_at = now
    return [child.id for child in waiting]


def child_ended(session: Session, parent_id: uuid.UUID) -> list[uuid.UUID]:
    """One of the parent's children has just ended, in this unit of work: start the next ones
    (their ids) and end the parent after its last child."""
    parent = _lock(session, parent_id)
    if parent is None or parent.finished:
        return []
    started = start_next(session, parent)
    _end_if_done(session, parent)
    return started


def cancel(
    session: Session, org_id: uuid.UUID, operation_id: uuid.UUID, *, scopes: Collection[str]
) -> tuple[Operation, list[uuid.UUID]]:
    """Cancel an operation; the operations to advance once this commits. For a bulk migrate:
    waiting children end canceled now, started ones roll back at their next step (a child past
    deleting its old endpoint finishes), and the bulk operation ends after its last child."""
    operation = operations.request_cancel(session, org_id, operation_id, scopes=scopes)
    if operation.kind != OperationKind.BULK_MIGRATE:
        return operation, [operation.id]
    now = clock.now()
    # Only waiting children are locked here: a started child locks itself, then this parent,
    # when it ends (``child_ended``); locking it from here could deadlock with that.
    waiting = session.scalars(
        select(Operation).where(*_waiting(operation.id)).with_for_update(key_share=True)
    ).all()
    for child in waiting:
        migrations.end_unstarted(session, child, now)
    wake = list(session.scalars(select(Operation.id).where(*_active(operation.id))))
    _end_if_done(session, operation)
    return operation, wake


def _end_if_done(session: Session, parent: Operation) -> None:
    counts = children_counts(session, [parent.id]).get(parent.id, _empty())
    now = clock.now()
    parent.updated_at = now
    if counts["total"] == sum(counts[state] for state in TERMINAL_STATES):
        if counts["succeeded"] == counts["total"]:
            state, code, message = OperationState.SUCCEEDED, None, None
        elif parent.cancel_requested:
            state, code, message = OperationState.CANCELED, None, None
        else:
            failed = counts["total"] - counts["succeeded"]
            state, code, message = (
                OperationState.FAILED,
                CHILDREN_FAILED,
                f"{failed} of {counts['total']} children did not succeed; each that rolled back "
                "or failed kept its old endpoint",
            )
        parent.state = state
        parent.error_code, parent.error_message = code, message
        parent.finished_at = now
        operations.count_ended(session, parent.kind, state)


def _empty() -> dict[str, int]:
    return {"total": 0, **dict.fromkeys(CHILD_STATES, 0)}


def children_counts(
    session: Session, parent_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, dict[str, int]]:
    """Per bulk operation: its children, in all and by state."""
    out: dict[uuid.UUID, dict[str, int]] = {}
    if not parent_ids:
        return out
    rows = session.execute(
        select(Operation.parent_id, Operation.state, func.count())
        .where(Operation.parent_id.in_(list(parent_ids)))
        .group_by(Operation.parent_id, Operation.state)
    ).all()
    for parent_id, state, count in rows:
        if parent_id is None:
            continue
        counts = out.setdefault(parent_id, _empty())
        counts[state] = counts.get(state, 0) + int(count)
        counts["total"] += int(count)
    return out
