"""The policy tick (docs/api.md, "Rotation policies"): each due policy starts its run, with
nobody at the keyboard.

Each due policy starts exactly one operation per due time: the tick locks due rows with
``FOR NO KEY UPDATE SKIP LOCKED`` and the operation carries (policy, due time) under a unique
constraint, so even two beats cannot start a run twice. Missed runs collapse into one
catch-up run, after which the schedule moves forward from now. The policies themselves are
``models/policy.py``'s; what a run starts is ``models/migration.py``'s, ``models/bulk.py``'s and
``models/remote.py``'s.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import bulk, clock, remote
from models import migration as migrations
from models import operation as operations
from models.db import settings_of
from models.endpoint import WebhookEndpoint
from models.errors import Conflict, NotFound, ValidationFailed
from models.operation import CONCURRENCY_DEFAULT
from models.policy import RotationPolicy, Strategy, Target


@dataclass(frozen=True)
class Run:
    policy_id: uuid.UUID
    operation_id: uuid.UUID | None  # None: skipped (the target is busy)
    advance: tuple[uuid.UUID, ...] = ()  # operations to advance once the run commits


def run_due(session: Session, *, limit: int = 100) -> list[Run]:
    """Start one operation per due policy; safe with several beats ticking at once."""
    now = clock.now()
    due = session.scalars(
        select(RotationPolicy)
        .where(
            RotationPolicy.deleted_at.is_(None),
            RotationPolicy.paused.is_(False),
            RotationPolicy.next_run_at <= now,
        )
        .order_by(RotationPolicy.next_run_at)
        .limit(limit)
        .with_for_update(key_share=True, skip_locked=True)
    ).all()
    runs = []
    for policy in due:
        started: list[uuid.UUID] = []
        due_at = policy.next_run_at
        interval = timedelta(seconds=policy.interval_seconds)
        # On time: keep the cadence. Missed runs (beat was down): one catch-up run, now.
        following = due_at + interval
        policy.next_run_at = following if following > now else now + interval
        policy.updated_at = now
        try:
            with session.begin_nested():
                operation, started = _start(session, policy, due_at)
        except (Conflict, NotFound, ValidationFailed):
            # The last run is still going, (org_endpoints) no endpoint is active, or
            # (remote_endpoint) its provider was deleted: skip.
            runs.append(Run(policy.id, None))
            continue
        except IntegrityError:
            runs.append(Run(policy.id, None))  # another beat started this due time already
            continue
        policy.last_run_at = now
        policy.last_operation_id = operation.id
        runs.append(Run(policy.id, operation.id, tuple(started)))
    return runs


def _start(
    session: Session, policy: RotationPolicy, due_at: datetime
) -> tuple[operations.Operation, list[uuid.UUID]]:
    """The run's operation, and the operations to advance once it commits."""
    if policy.target == Target.ORG_ENDPOINTS:
        started = bulk.start(
            session,
            policy.org_id,
            max_concurrency=policy.max_concurrency or CONCURRENCY_DEFAULT,
            deadline_seconds=settings_of(session).scheduled_migrate_deadline_seconds,
            handoff=policy.handoff,
            trigger=operations.Trigger.SCHEDULE,
            policy_id=policy.id,
            scheduled_for=due_at,
        )
        return started.operation, started.started
    operation = _start_operation(session, policy, due_at)
    return operation, [operation.id]


def _start_operation(
    session: Session, policy: RotationPolicy, due_at: datetime
) -> operations.Operation:
    if policy.target == Target.REMOTE_ENDPOINT:
        if policy.provider_id is None or policy.remote_endpoint_id is None:  # pragma: no cover
            raise Conflict("policy has no remote endpoint")
        return remote.start(
            session,
            policy.org_id,
            policy.provider_id,
            policy.remote_endpoint_id,
            trigger=operations.Trigger.SCHEDULE,
            policy_id=policy.id,
            scheduled_for=due_at,
            deadline_seconds=settings_of(session).scheduled_migrate_deadline_seconds,
        )
    if policy.target == Target.ORG_SECRET:
        return migrations.start_rotation(
            session, policy.org_id, None, policy_id=policy.id, scheduled_for=due_at
        )
    if policy.endpoint_id is None:  # pragma: no cover - validated on write
        raise Conflict("policy has no endpoint")
    endpoint = session.get(WebhookEndpoint, policy.endpoint_id)
    if endpoint is None or not endpoint.active:
        # A paused endpoint is not rotated: a new endpoint would start receiving again.
        raise Conflict("the endpoint is paused")
    if policy.strategy == Strategy.ROTATE:
        return migrations.start_rotation(
            session, policy.org_id, policy.endpoint_id, policy_id=policy.id, scheduled_for=due_at
        )
    return migrations.start_migration(
        session,
        policy.org_id,
        policy.endpoint_id,
        kind=operations.OperationKind.SCHEDULED_ROTATION,
        trigger=operations.Trigger.SCHEDULE,
        policy_id=policy.id,
        handoff=policy.handoff,
        reveal=False,
        scheduled_for=due_at,
        deadline_seconds=settings_of(session).scheduled_migrate_deadline_seconds,
    ).operation
