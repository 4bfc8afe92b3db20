"""Retention (models.retention): old finished history goes, in bounded batches; anything
unfinished, recent, or still referenced stays; the beat tick can run any number of times.

Rows are written with explicit timestamps (``clock.travel`` would move every row at once).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from models import clock, idempotency, retention
from models.db import Database
from models.delivery import Delivery, DeliveryAttempt, DeliveryState, Event
from models.endpoint import WebhookEndpoint, create_endpoint
from models.heartbeat import Heartbeat
from models.idempotency import IdempotencyKey
from models.ids import new_event_id, new_id
from models.operation import Operation, OperationState, OperationStep, StepState
from models.policy import create_policy
from models.usecases import retire_endpoint
from rotator.settings import Settings
from schedules.ticks import prune_history
from tests.factories import Tenant, make_tenant
from workers.names import TaskName

DAY = timedelta(days=1)
OLD = 40 * DAY  # beyond the default 30 days
RECENT = 2 * DAY


@pytest.fixture
def tenant(database: Database) -> Tenant:
    return make_tenant(database)


@pytest.fixture
def endpoint_id(database: Database, tenant: Tenant) -> uuid.UUID:
    with database.session() as session:
        created = create_endpoint(
            session, tenant.org_id, url="https://hooks.example.com/r", events=["brand.vetted"]
        )
    return created.endpoint.id


def add_delivery(
    database: Database,
    tenant: Tenant,
    endpoint_id: uuid.UUID,
    *,
    age: timedelta,
    state: str = DeliveryState.SUCCEEDED,
    attempts: int = 1,
) -> tuple[str, uuid.UUID, list[uuid.UUID]]:
    """An event, one delivery of it and ``attempts`` attempts, all ``age`` old."""
    at = clock.now() - age
    event_id = new_event_id()
    delivery_id = new_id()
    attempt_ids = [new_id() for _ in range(attempts)]
    with database.session() as session:
        session.add(
            Event(id=event_id, org_id=tenant.org_id, type="brand.vetted", data={}, created_at=at)
        )
        session.flush()
        session.add(
            Delivery(
                id=delivery_id,
                org_id=tenant.org_id,
                event_id=event_id,
                endpoint_id=endpoint_id,
                kind="event",
                state=state,
                attempts=attempts,
                next_attempt_at=at if state == DeliveryState.PENDING else None,
                created_at=at,
                updated_at=at,
            )
        )
        session.flush()
        for number, attempt_id in enumerate(attempt_ids, start=1):
            session.add(
                attempt_row(tenant, endpoint_id, delivery_id, event_id, at, attempt_id, number)
            )
    return event_id, delivery_id, attempt_ids


def attempt_row(
    tenant: Tenant,
    endpoint_id: uuid.UUID,
    delivery_id: uuid.UUID,
    event_id: str,
    at: datetime,
    attempt_id: uuid.UUID,
    number: int,
) -> DeliveryAttempt:
    return DeliveryAttempt(
        id=attempt_id,
        org_id=tenant.org_id,
        delivery_id=delivery_id,
        endpoint_id=endpoint_id,
        event_id=event_id,
        event_type="brand.vetted",
        url="https://hooks.example.com/r",
        attempt=number,
        outcome="success",
        response_status=200,
        response_time_ms=5,
        request_body_sha256="0" * 64,
        request_body_bytes=2,
        response_body_excerpt="",
        request_headers={},
        error=None,
        occurred_at=at,
    )


def add_operation(
    database: Database,
    tenant: Tenant,
    *,
    age: timedelta,
    finished: bool = True,
    probe_delivery_id: uuid.UUID | None = None,
) -> uuid.UUID:
    at = clock.now() - age
    operation_id = new_id()
    with database.session() as session:
        session.add(
            Operation(
                id=operation_id,
                org_id=tenant.org_id,
                kind="org_secret_rotation",
                state=OperationState.SUCCEEDED if finished else OperationState.RUNNING,
                trigger="schedule",
                params={},
                handoff="none",
                secret_revealed=False,
                cancel_requested=False,
                wait_seconds=0.0,
                probe_delivery_id=probe_delivery_id,
                deadline_at=at + DAY,
                next_advance_at=None if finished else at,
                created_at=at,
                updated_at=at,
                finished_at=at if finished else None,
                steps=[
                    OperationStep(
                        id=new_id(), position=0, name="rotate_org_secret", state=StepState.SUCCEEDED
                    )
                ],
            )
        )
    return operation_id


def add_key(database: Database, tenant: Tenant, *, age: timedelta) -> uuid.UUID:
    key_id = new_id()
    with database.session() as session:
        session.add(
            IdempotencyKey(
                id=key_id,
                org_id=tenant.org_id,
                key=f"k-{key_id}",
                request_sha256="0" * 64,
                response_ciphertext=b"x",
                created_at=clock.now() - age,
            )
        )
    return key_id


def ids(database: Database, model: Any) -> set[Any]:
    with database.session() as session:
        return set(session.scalars(select(model.id)))


def count(database: Database, model: Any) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# --- what goes, what stays ---------------------------------------------------------------------


def test_old_finished_history_goes_and_everything_unfinished_or_recent_stays(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID
) -> None:
    old_event, old_delivery, old_attempts = add_delivery(
        database, tenant, endpoint_id, age=OLD, attempts=3
    )
    dead_event, dead_delivery, _ = add_delivery(
        database, tenant, endpoint_id, age=OLD, state=DeliveryState.DEAD
    )
    pending = add_delivery(database, tenant, endpoint_id, age=OLD, state=DeliveryState.PENDING)
    recent = add_delivery(database, tenant, endpoint_id, age=RECENT)
    probe = add_delivery(database, tenant, endpoint_id, age=OLD)
    lonely_event = new_event_id()  # published to nobody
    with database.session() as session:
        session.add(
            Event(
                id=lonely_event,
                org_id=tenant.org_id,
                type="brand.vetted",
                data={},
                created_at=clock.now() - OLD,
            )
        )
    finished_old = add_operation(database, tenant, age=OLD)
    finished_recent = add_operation(database, tenant, age=RECENT)
    unfinished_old = add_operation(
        database, tenant, age=OLD, finished=False, probe_delivery_id=probe[1]
    )
    policy_last = add_operation(database, tenant, age=OLD)
    with database.session() as session:
        policy = create_policy(session, tenant.org_id, target="org_secret", interval_seconds=3600)
        policy.last_operation_id = policy_last
    expired_key = add_key(database, tenant, age=idempotency.RETENTION + timedelta(minutes=1))
    live_key = add_key(database, tenant, age=timedelta(hours=23))

    pruned = retention.prune(database)

    assert pruned == retention.Pruned(
        delivery_attempts=4,
        deliveries=2,
        events=3,
        operations=1,
        operation_steps=1,
        idempotency_keys=1,
    )
    attempts = ids(database, DeliveryAttempt)
    assert attempts.isdisjoint(old_attempts)
    assert {pending[2][0], recent[2][0], probe[2][0]} <= attempts
    assert ids(database, Delivery) == {pending[1], recent[1], probe[1]}
    assert ids(database, Event) == {pending[0], recent[0], probe[0]}
    assert {old_event, dead_event}.isdisjoint(ids(database, Event))
    assert {old_delivery, dead_delivery}.isdisjoint(ids(database, Delivery))
    assert ids(database, Operation) == {finished_recent, unfinished_old, policy_last}
    assert finished_old not in ids(database, Operation)
    assert count(database, OperationStep) == 3
    assert ids(database, IdempotencyKey) == {live_key}
    assert expired_key not in ids(database, IdempotencyKey)
    assert ids(database, WebhookEndpoint) == {endpoint_id}


def test_a_deleted_endpoints_history_goes_by_age_and_the_endpoint_row_stays(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID
) -> None:
    old = add_delivery(database, tenant, endpoint_id, age=OLD)
    recent = add_delivery(database, tenant, endpoint_id, age=RECENT)
    with database.session() as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        retire_endpoint(session, endpoint)

    retention.prune(database)

    assert ids(database, Delivery) == {recent[1]}
    assert old[0] not in ids(database, Event)
    assert ids(database, WebhookEndpoint) == {endpoint_id}


def test_the_setting_moves_the_cutoff(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID
) -> None:
    kept = add_delivery(database, tenant, endpoint_id, age=5 * DAY)
    assert retention.prune(database).total == 0
    assert retention.prune(database, days=4).deliveries == 1
    assert kept[1] not in ids(database, Delivery)


# --- batches ------------------------------------------------------------------------------------


def test_each_statement_deletes_at_most_one_batch(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID
) -> None:
    add_delivery(database, tenant, endpoint_id, age=OLD, attempts=7)
    before = retention.cutoff(30)
    deleted = []
    for _ in range(4):
        with database.session() as session:
            deleted.append(retention.prune_attempts(session, before, limit=3))
    assert deleted == [3, 3, 1, 0]


def test_a_prune_in_small_batches_still_deletes_everything_due(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID
) -> None:
    for _ in range(5):
        add_delivery(database, tenant, endpoint_id, age=OLD, attempts=2)
    for _ in range(9):
        add_operation(database, tenant, age=OLD)
    pruned = retention.prune(database, batch_size=4)
    assert (pruned.delivery_attempts, pruned.deliveries, pruned.events) == (10, 5, 5)
    assert pruned.operations == 9
    assert count(database, DeliveryAttempt) == count(database, Operation) == 0


def test_a_prune_out_of_time_stops_and_the_next_one_goes_on(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID
) -> None:
    add_delivery(database, tenant, endpoint_id, age=OLD, attempts=2)
    assert retention.prune(database, budget_seconds=0).total == 0
    assert retention.prune(database).delivery_attempts == 2


# --- the tick -----------------------------------------------------------------------------------


def test_the_tick_runs_again_harmlessly_and_records_its_heartbeat(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID
) -> None:
    add_delivery(database, tenant, endpoint_id, age=OLD, attempts=2)
    add_operation(database, tenant, age=OLD)
    assert prune_history() == 2 + 1 + 1 + 1 + 1  # attempts, delivery, event, operation, step
    assert prune_history() == 0
    with database.session() as session:
        assert session.get(Heartbeat, str(TaskName.RETENTION_PRUNE)) is not None


def test_retention_days_must_be_at_least_one() -> None:
    with pytest.raises(ValidationError):
        Settings(retention_days=0)
    assert Settings().retention_days == 30
