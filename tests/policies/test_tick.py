"""The policy tick (``models.policy_runs.run_due``): one operation per policy and due time, however
many beats tick, missed runs collapsed into one catch-up, and what the runs it starts do.

Time moves with ``models.clock.travel`` (the autouse fixture resets it). No Celery worker runs:
the tests call ``run_due`` and ``workers.operations.advance`` themselves.
"""

from __future__ import annotations

import base64
import io
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from models import clock, org_secret
from models import migration as migrations
from models import operation as operations
from models import policy as policies
from models.db import Database
from models.endpoint import WebhookEndpoint, create_endpoint, signing_key
from models.operation import Operation, OperationKind, OperationState, StepState, Trigger
from models.org import ALL_SCOPES
from models.org_secret import OrgSecret, SecretState
from models.policy import RotationPolicy
from models.policy_runs import Run, run_due
from receiver import DemoReceiver, serve
from tests.factories import Tenant, make_tenant
from tests.support import overridden
from workers.operations import advance

HOUR = timedelta(hours=1)
HOUR_S = 3600
MIGRATE_STEPS = ["create_endpoint", "send_test_delivery", "await_success", "delete_old_endpoint"]


@pytest.fixture
def tenant(database) -> Tenant:
    return make_tenant(database)


# --- helpers ------------------------------------------------------------------------------------


def add_endpoint(database: Database, tenant: Tenant, url: str = "https://hooks.example.com/r"):
    with database.session() as session:
        return create_endpoint(session, tenant.org_id, url=url, events=["brand.vetted"])


def add_policy(database: Database, tenant: Tenant, **fields: Any) -> RotationPolicy:
    fields.setdefault("interval_seconds", HOUR_S)
    with database.session() as session:
        return policies.create_policy(session, tenant.org_id, **fields)


def endpoint_policy(
    database: Database, tenant: Tenant, endpoint_id: uuid.UUID, **fields: Any
) -> RotationPolicy:
    return add_policy(database, tenant, target="endpoint", endpoint_id=endpoint_id, **fields)


def tick(database: Database) -> list[Run]:
    with database.session() as session:
        return run_due(session)


def load_policy(database: Database, policy_id: uuid.UUID) -> RotationPolicy:
    with database.session() as session:
        policy = session.get(RotationPolicy, policy_id)
        assert policy is not None
        return policy


def load_operation(database: Database, operation_id: uuid.UUID | None) -> Operation:
    assert operation_id is not None
    with database.session() as session:
        operation = session.get(Operation, operation_id)
        assert operation is not None
        return operation


def operations_of(database: Database, policy_id: uuid.UUID) -> list[Operation]:
    with database.session() as session:
        return list(
            session.scalars(
                select(Operation)
                .where(Operation.policy_id == policy_id)
                .order_by(Operation.scheduled_for)
            )
        )


def insert(database: Database, operation: Operation) -> None:
    with database.session() as session:
        session.add(operation)
        session.flush()


def due_times(database: Database, policy_id: uuid.UUID) -> list[datetime]:
    times = [operation.scheduled_for for operation in operations_of(database, policy_id)]
    assert all(time is not None for time in times)
    return sorted(time for time in times if time is not None)


def operation_count(database: Database) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(Operation)) or 0


def to(moment: datetime) -> None:
    """Move the clock to ``moment`` exactly (then a little: ``now`` keeps running)."""
    clock.travel(moment - clock.now())


def started(runs: list[Run]) -> list[uuid.UUID]:
    return [run.operation_id for run in runs if run.operation_id is not None]


# --- one due run --------------------------------------------------------------------------------


@pytest.mark.parametrize("handoff", ["none", "in_band"])
def test_a_due_safe_migrate_policy_starts_one_scheduled_rotation(database, tenant, handoff):
    endpoint = add_endpoint(database, tenant).endpoint
    policy = endpoint_policy(database, tenant, endpoint.id, handoff=handoff)
    due = policy.next_run_at
    assert tick(database) == []  # not due yet

    to(due + timedelta(seconds=5))
    runs = tick(database)
    now = clock.now()

    (run,) = runs
    assert run.policy_id == policy.id
    assert run.operation_id is not None
    operation = load_operation(database, run.operation_id)
    assert operation.kind == OperationKind.SCHEDULED_ROTATION
    assert operation.trigger == Trigger.SCHEDULE
    assert operation.state == OperationState.PENDING
    assert operation.policy_id == policy.id
    assert operation.scheduled_for == due
    assert operation.source_endpoint_id == endpoint.id
    assert operation.new_endpoint_id is None
    assert operation.handoff == handoff
    assert operation.secret_revealed is False  # nobody saw it: reveal-secret hands it out
    assert operation.new_secret_ciphertext is not None
    assert [step.name for step in operation.steps] == MIGRATE_STEPS
    # Scheduled migrations get the scheduled deadline, not the API's default.
    deadline = timedelta(seconds=database.settings.scheduled_migrate_deadline_seconds)
    assert operation.deadline_at is not None
    assert operation.deadline_at - operation.created_at == deadline

    after = load_policy(database, policy.id)
    assert after.next_run_at == due + HOUR  # on time: the cadence is kept
    assert after.last_operation_id == operation.id
    assert after.last_run_at is not None
    assert due < after.last_run_at <= now

    assert tick(database) == []  # the same moment again: nothing more
    assert len(operations_of(database, policy.id)) == 1


def test_a_due_rotate_policy_starts_one_rotate_secret_operation(database, tenant):
    endpoint = add_endpoint(database, tenant).endpoint
    policy = endpoint_policy(database, tenant, endpoint.id, strategy="rotate")
    to(policy.next_run_at + timedelta(seconds=1))

    (run,) = tick(database)

    operation = load_operation(database, run.operation_id)
    assert operation.kind == OperationKind.SCHEDULED_ROTATION
    assert operation.trigger == Trigger.SCHEDULE
    assert operation.policy_id == policy.id
    assert operation.scheduled_for == policy.next_run_at
    assert operation.source_endpoint_id == endpoint.id
    assert [(step.name, step.state) for step in operation.steps] == [
        ("rotate_secret", StepState.PENDING)
    ]
    assert operation.secret_revealed is False
    assert load_policy(database, policy.id).next_run_at == policy.next_run_at + HOUR
    assert tick(database) == []
    assert len(operations_of(database, policy.id)) == 1


def test_a_due_org_secret_policy_starts_one_org_secret_rotation(database, tenant):
    policy = add_policy(database, tenant, target="org_secret")
    to(policy.next_run_at + timedelta(seconds=1))

    (run,) = tick(database)

    operation = load_operation(database, run.operation_id)
    assert operation.kind == OperationKind.ORG_SECRET_ROTATION
    assert operation.trigger == Trigger.SCHEDULE
    assert operation.policy_id == policy.id
    assert operation.org_id == tenant.org_id
    assert operation.scheduled_for == policy.next_run_at
    assert operation.source_endpoint_id is None
    assert [(step.name, step.state) for step in operation.steps] == [
        ("rotate_org_secret", StepState.PENDING)
    ]
    assert load_policy(database, policy.id).next_run_at == policy.next_run_at + HOUR
    assert tick(database) == []
    assert len(operations_of(database, policy.id)) == 1


def test_on_time_runs_keep_the_cadence(database, tenant):
    policy = add_policy(database, tenant, target="org_secret")
    first_due = policy.next_run_at
    for index in range(4):
        due = first_due + index * HOUR
        # Beat ticks a little late each time (less than an interval): the schedule does not drift.
        to(due + timedelta(seconds=7 + 3 * index))
        (run,) = tick(database)
        assert load_operation(database, run.operation_id).scheduled_for == due
        assert load_policy(database, policy.id).next_run_at == due + HOUR
        assert tick(database) == []
    assert due_times(database, policy.id) == [first_due + index * HOUR for index in range(4)]


def test_a_late_tick_inside_the_interval_still_keeps_the_cadence(database, tenant):
    policy = add_policy(database, tenant, target="org_secret")
    due = policy.next_run_at
    to(due + HOUR - timedelta(seconds=1))  # just before the following due time
    (run,) = tick(database)
    assert load_policy(database, policy.id).next_run_at == due + HOUR
    assert load_operation(database, run.operation_id).scheduled_for == due


# --- missed runs, pause -------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["org_secret", "rotate", "safe_migrate"])
def test_a_beat_stopped_for_three_intervals_catches_up_once(database, tenant, target):
    if target == "org_secret":
        policy = add_policy(database, tenant, target="org_secret")
    else:
        endpoint = add_endpoint(database, tenant).endpoint
        policy = endpoint_policy(database, tenant, endpoint.id, strategy=target)
    due = policy.next_run_at
    to(due + 3 * HOUR + timedelta(minutes=10))

    (run,) = tick(database)
    now = clock.now()

    assert run.operation_id is not None
    (operation,) = operations_of(database, policy.id)
    assert operation.id == run.operation_id
    assert operation.scheduled_for == due  # the one catch-up stands for the earliest missed run
    after = load_policy(database, policy.id)
    # The schedule moves forward from now, not from the missed due times.
    assert now < after.next_run_at <= clock.now() + HOUR
    assert after.next_run_at - now <= HOUR
    assert after.next_run_at - now > HOUR - timedelta(seconds=5)
    assert tick(database) == []
    assert tick(database) == []
    assert len(operations_of(database, policy.id)) == 1


def test_a_paused_policy_starts_nothing_and_catches_up_once_resumed(database, tenant):
    policy = add_policy(database, tenant, target="org_secret", paused=True)
    due = policy.next_run_at
    to(due + 5 * HOUR)
    assert tick(database) == []
    assert operation_count(database) == 0
    assert load_policy(database, policy.id).next_run_at == due  # untouched while paused

    with database.session() as session:
        policies.update_policy(session, tenant.org_id, policy.id, {"paused": False})
    (run,) = tick(database)
    now = clock.now()
    operation = load_operation(database, run.operation_id)
    assert operation.scheduled_for == due
    after = load_policy(database, policy.id)
    assert after.next_run_at - now <= HOUR
    assert after.next_run_at - now > HOUR - timedelta(seconds=5)
    assert tick(database) == []
    assert len(operations_of(database, policy.id)) == 1


def test_pausing_after_a_run_stops_the_next_one(database, tenant):
    policy = add_policy(database, tenant, target="org_secret")
    to(policy.next_run_at + timedelta(seconds=1))
    assert len(started(tick(database))) == 1
    with database.session() as session:
        policies.update_policy(session, tenant.org_id, policy.id, {"paused": True})
    to(policy.next_run_at + 4 * HOUR)
    assert tick(database) == []
    assert len(operations_of(database, policy.id)) == 1


def test_deleted_policies_and_ended_ones_start_nothing(database, tenant):
    deleted = add_policy(database, tenant, target="org_secret")
    with database.session() as session:
        policies.delete_policy(session, tenant.org_id, deleted.id)
    endpoint = add_endpoint(database, tenant).endpoint
    ended = endpoint_policy(database, tenant, endpoint.id, strategy="rotate")
    with database.session() as session:
        from models.usecases import delete_endpoint

        delete_endpoint(session, tenant.org_id, endpoint.id)
    to(clock.now() + 3 * HOUR)
    assert tick(database) == []
    assert operation_count(database) == 0
    assert load_policy(database, ended.id).deleted_at is not None


# --- busy endpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["safe_migrate", "rotate"])
def test_a_busy_endpoint_skips_the_run_and_moves_the_schedule(database, tenant, strategy):
    endpoint = add_endpoint(database, tenant).endpoint
    policy = endpoint_policy(database, tenant, endpoint.id, strategy=strategy)
    org_policy = add_policy(database, tenant, target="org_secret")
    with database.session() as session:  # an operator's migration is still running
        migration = migrations.start_migration(session, tenant.org_id, endpoint.id).operation
    due = policy.next_run_at
    to(due + timedelta(seconds=2))

    runs = tick(database)

    by_policy = {run.policy_id: run.operation_id for run in runs}
    assert by_policy.keys() == {policy.id, org_policy.id}
    assert by_policy[policy.id] is None  # skipped
    assert by_policy[org_policy.id] is not None  # the other due policy is not held up
    assert operations_of(database, policy.id) == []
    after = load_policy(database, policy.id)
    assert after.next_run_at == due + HOUR  # still moves: no retry storm every tick
    assert after.last_run_at is None
    assert after.last_operation_id is None
    assert tick(database) == []

    # Once the migration has ended, the next due time runs.
    with database.session() as session:
        operations.request_cancel(session, tenant.org_id, migration.id, scopes=ALL_SCOPES)
    advance(database, migration.id)
    assert load_operation(database, migration.id).finished
    to(due + HOUR + timedelta(seconds=2))
    runs = tick(database)
    (operation,) = operations_of(database, policy.id)
    assert operation.id in started(runs)
    assert operation.scheduled_for == due + HOUR


# --- two beats ----------------------------------------------------------------------------------


def _race(database: Database, threads: int = 2) -> list[list[Run]]:
    """``threads`` ticks at once, each in its own session, released together by a barrier."""
    barrier = threading.Barrier(threads)
    results: list[list[Run]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def beat(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            with database.session() as session:
                results[index] = run_due(session)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=beat, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not any(worker.is_alive() for worker in workers)
    if errors:
        raise errors[0]
    return results


def test_two_beats_at_once_start_exactly_one_operation_per_due_time(database, tenant):
    tenants = [tenant] + [make_tenant(database, name=f"Org {index}") for index in range(4)]
    org_policies = [add_policy(database, t, target="org_secret") for t in tenants]
    endpoint_policies = [
        endpoint_policy(
            database,
            tenant,
            add_endpoint(database, tenant, f"https://hooks.example.com/{strategy}").endpoint.id,
            strategy=strategy,
        )
        for strategy in ("safe_migrate", "rotate")
    ]
    every = org_policies + endpoint_policies
    first_due = {policy.id: policy.next_run_at for policy in every}

    rounds = 3
    for round_index in range(rounds):
        to(max(first_due.values()) + round_index * HOUR + timedelta(seconds=5))
        results = _race(database)
        starts = [op_id for runs in results for op_id in started(runs)]
        assert len(starts) == len(set(starts))
        expected = len(org_policies) + (len(endpoint_policies) if round_index == 0 else 0)
        assert len(starts) == expected, results
        assert _race(database) == [[], []]  # the same moment again: nothing

    with database.session() as session:
        rows = session.execute(select(Operation.policy_id, Operation.scheduled_for)).all()
    per_key = Counter((row.policy_id, row.scheduled_for) for row in rows)
    assert all(count == 1 for count in per_key.values()), per_key
    per_policy = Counter(row.policy_id for row in rows)
    for policy in org_policies:
        assert per_policy[policy.id] == rounds
        assert due_times(database, policy.id) == [
            first_due[policy.id] + index * HOUR for index in range(rounds)
        ]
    for policy in endpoint_policies:
        assert per_policy[policy.id] == 1  # later rounds: its first run is still going (busy)
    assert operation_count(database) == len(org_policies) * rounds + len(endpoint_policies)


def test_many_beats_at_once_still_start_one_run_each(database, tenant):
    tenants = [tenant] + [make_tenant(database, name=f"Org {index}") for index in range(7)]
    org_policies = [add_policy(database, t, target="org_secret") for t in tenants]
    to(max(policy.next_run_at for policy in org_policies) + timedelta(seconds=1))
    results = _race(database, threads=4)
    starts = [op_id for runs in results for op_id in started(runs)]
    assert len(starts) == len(set(starts)) == len(org_policies)
    for policy in org_policies:
        assert len(operations_of(database, policy.id)) == 1


def test_a_run_another_beat_already_started_is_skipped(database, tenant):
    """The unique key is the backstop: a tick that read the policy before the other beat's
    commit (or ran without row locks) finds the due time taken and starts nothing."""
    policy = add_policy(database, tenant, target="org_secret")
    due = policy.next_run_at
    with database.session() as session:  # the other beat's run, for this very due time
        theirs = migrations.start_rotation(
            session, tenant.org_id, None, policy_id=policy.id, scheduled_for=due
        )
    to(due + timedelta(seconds=1))

    assert tick(database) == [Run(policy.id, None)]

    (operation,) = operations_of(database, policy.id)
    assert operation.id == theirs.id
    assert load_policy(database, policy.id).next_run_at == due + HOUR


def test_the_unique_key_refuses_a_second_operation_for_one_due_time(database, tenant):
    policy = add_policy(database, tenant, target="org_secret")
    due = policy.next_run_at
    with database.session() as session:
        migrations.start_rotation(
            session, tenant.org_id, None, policy_id=policy.id, scheduled_for=due
        )

    with pytest.raises(IntegrityError), database.session() as session:
        migrations.start_rotation(
            session, tenant.org_id, None, policy_id=policy.id, scheduled_for=due
        )

    # A second row with the same key, written directly, is refused too.
    now = clock.now()
    duplicate = Operation(
        id=uuid.uuid4(),
        org_id=tenant.org_id,
        kind=OperationKind.ORG_SECRET_ROTATION,
        state=OperationState.PENDING,
        trigger=Trigger.SCHEDULE,
        policy_id=policy.id,
        scheduled_for=due,
        params={},
        handoff="none",
        secret_revealed=False,
        cancel_requested=False,
        wait_seconds=0.0,
        deadline_at=now + HOUR,
        created_at=now,
        updated_at=now,
    )
    with pytest.raises(IntegrityError):
        insert(database, duplicate)

    # Another due time, or another policy at the same time, is fine.
    with database.session() as session:
        migrations.start_rotation(
            session, tenant.org_id, None, policy_id=policy.id, scheduled_for=due + HOUR
        )
        migrations.start_rotation(
            session, tenant.org_id, None, policy_id=uuid.uuid4(), scheduled_for=due
        )
    assert len(operations_of(database, policy.id)) == 2
    assert operation_count(database) == 3


# --- what the runs do ---------------------------------------------------------------------------


def reveal(client, tenant: Tenant, operation_id: uuid.UUID):
    return client.post(f"/v1/operations/{operation_id}/reveal-secret", headers=tenant.headers)


def run_now(database: Database, policy: RotationPolicy) -> uuid.UUID:
    """Tick once the policy is due (made due by its next_run_at, without moving the clock, so
    deliveries are signed with the receiver's idea of now)."""
    (run,) = tick(database)
    assert run.policy_id == policy.id
    assert run.operation_id is not None
    return run.operation_id


def past() -> datetime:
    return clock.now() - timedelta(seconds=1)


def test_a_rotate_run_rotates_the_secret_at_once_and_reveals_it_once(client, database, tenant):
    created = add_endpoint(database, tenant)
    endpoint = created.endpoint
    policy = endpoint_policy(database, tenant, endpoint.id, strategy="rotate", next_run_at=past())
    operation_id = run_now(database, policy)

    # Nothing to reveal before the run has rotated anything; asking does not use up the reveal.
    before = reveal(client, tenant, operation_id)
    assert before.status_code == 409
    assert before.json()["error"]["code"] == "CONFLICT"

    advance(database, operation_id)

    operation = load_operation(database, operation_id)
    assert operation.state == OperationState.SUCCEEDED
    assert operation.finished_at is not None
    assert [(step.name, step.state) for step in operation.steps] == [
        ("rotate_secret", StepState.SUCCEEDED)
    ]
    with database.session() as session:
        row = session.get(WebhookEndpoint, endpoint.id)
        assert row is not None
        assert row.deleted_at is None
        key = signing_key(session, row)
    assert key != base64.b64decode(created.secret)

    revealed = reveal(client, tenant, operation_id)
    assert revealed.status_code == 200, revealed.text
    body = revealed.json()
    assert body["operation_id"] == str(operation_id)
    assert body["secret_displayed_once"] is True
    assert base64.b64decode(body["secret"], validate=True) == key
    again = reveal(client, tenant, operation_id)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "CONFLICT"
    assert body["secret"] not in again.text

    # The API shows the run on the policy, and a second advance does nothing.
    shown = client.get(f"/v1/rotation-policies/{policy.id}", headers=tenant.headers).json()
    assert shown["last_operation_id"] == str(operation_id)
    assert shown["last_run_at"] is not None
    assert shown["endpoint_id"] == str(endpoint.id)
    advance(database, operation_id)
    with database.session() as session:
        row = session.get(WebhookEndpoint, endpoint.id)
        assert row is not None
        assert signing_key(session, row) == key


def test_an_other_organization_cannot_reveal_a_scheduled_secret(client, database, tenant):
    policy = add_policy(database, tenant, target="org_secret", next_run_at=past())
    operation_id = run_now(database, policy)
    advance(database, operation_id)
    other = make_tenant(database, name="Other")
    response = reveal(client, other, operation_id)
    assert response.status_code == 404
    assert reveal(client, tenant, operation_id).status_code == 200


def test_an_org_secret_run_rotates_the_org_secret(client, database, tenant):
    first = client.post("/v1/webhook-secret/rotate", headers=tenant.headers)
    assert first.status_code == 200, first.text
    first_secret = first.json()["webhook_secret"]
    policy = add_policy(database, tenant, target="org_secret", next_run_at=past())
    operation_id = run_now(database, policy)

    advance(database, operation_id)

    operation = load_operation(database, operation_id)
    assert operation.state == OperationState.SUCCEEDED
    assert operation.kind == OperationKind.ORG_SECRET_ROTATION
    assert [(step.name, step.state) for step in operation.steps] == [
        ("rotate_org_secret", StepState.SUCCEEDED)
    ]
    with database.session() as session:
        rows = session.scalars(select(OrgSecret).where(OrgSecret.org_id == tenant.org_id)).all()
        states = Counter(row.state for row in rows)
        keys = org_secret.signing_keys(session, tenant.org_id)
    assert states == Counter({SecretState.PREVIOUS: 1, SecretState.CURRENT: 1})
    (previous,) = [row for row in rows if row.state == SecretState.PREVIOUS]
    assert previous.valid_until is not None
    assert previous.valid_until > clock.now()
    assert len(keys) == 2
    assert keys[1] == base64.b64decode(first_secret)  # the old one signs for the grace window

    revealed = reveal(client, tenant, operation_id)
    assert revealed.status_code == 200, revealed.text
    new_secret = revealed.json()["secret"]
    assert new_secret != first_secret
    assert base64.b64decode(new_secret) == keys[0]  # the new current org secret
    assert reveal(client, tenant, operation_id).status_code == 409


def test_an_org_secret_run_without_an_org_secret_mints_the_first(client, database, tenant):
    policy = add_policy(database, tenant, target="org_secret", next_run_at=past())
    operation_id = run_now(database, policy)
    advance(database, operation_id)
    with database.session() as session:
        keys = org_secret.signing_keys(session, tenant.org_id)
    assert len(keys) == 1
    revealed = reveal(client, tenant, operation_id).json()
    assert base64.b64decode(revealed["secret"]) == keys[0]


@pytest.fixture
def demo_receiver(settings) -> Iterator[tuple[DemoReceiver, str]]:
    """A DemoReceiver on loopback (allowed for this test) and its URL."""
    placeholder = base64.b64encode(b"p" * 32).decode()
    receiver = DemoReceiver([placeholder], out=io.StringIO())
    server = serve(receiver, "127.0.0.1", 0)
    with overridden(settings, allow_insecure_urls=True, delivery_timeout_seconds=5.0):
        try:
            yield receiver, f"http://127.0.0.1:{server.server_address[1]}/hooks"
        finally:
            server.shutdown()
            server.server_close()


def _drive(database: Database, operation_id: uuid.UUID, limit: int = 6) -> Operation:
    for _ in range(limit):
        advance(database, operation_id)
        operation = load_operation(database, operation_id)
        if operation.finished:
            return operation
    raise AssertionError(f"operation still {operation.state} after {limit} advances")


def test_after_a_scheduled_safe_migrate_the_policy_follows_the_new_endpoint(
    client, database, tenant, demo_receiver
):
    receiver, url = demo_receiver
    created = add_endpoint(database, tenant, url)
    receiver.set_secrets([created.secret])
    old_id = created.endpoint.id
    policy = endpoint_policy(database, tenant, old_id, next_run_at=past())
    operation_id = run_now(database, policy)

    # Out of band: the operator reveals the new secret and gives it to the receiver.
    revealed = reveal(client, tenant, operation_id)
    assert revealed.status_code == 200, revealed.text
    receiver.add_secret(revealed.json()["secret"])

    operation = _drive(database, operation_id)

    assert operation.state == OperationState.SUCCEEDED, (operation.error_code, operation.steps)
    assert [step.state for step in operation.steps] == [StepState.SUCCEEDED] * 4
    new_id = operation.new_endpoint_id
    assert new_id is not None
    assert new_id != old_id
    after = load_policy(database, policy.id)
    assert after.endpoint_id == new_id
    assert after.deleted_at is None
    assert client.get(f"/v1/webhooks/{old_id}", headers=tenant.headers).status_code == 404
    assert client.get(f"/v1/webhooks/{new_id}", headers=tenant.headers).status_code == 200
    shown = client.get(f"/v1/rotation-policies/{policy.id}", headers=tenant.headers).json()
    assert shown["endpoint_id"] == str(new_id)
    with database.session() as session:
        new_row = session.get(WebhookEndpoint, new_id)
        assert new_row is not None
        assert signing_key(session, new_row) == base64.b64decode(revealed.json()["secret"])

    # The next due time migrates the new endpoint.
    to(after.next_run_at + timedelta(seconds=1))
    (run,) = tick(database)
    assert load_operation(database, run.operation_id).source_endpoint_id == new_id


def test_after_a_manual_safe_migrate_the_policy_follows_the_new_endpoint(
    client, database, tenant, demo_receiver
):
    """The policy moves with any migrate that succeeds, not only its own runs: left on the
    deleted endpoint, its tick would skip it forever."""
    receiver, url = demo_receiver
    created = add_endpoint(database, tenant, url)
    receiver.set_secrets([created.secret])
    old_id = created.endpoint.id
    policy = endpoint_policy(database, tenant, old_id)
    response = client.post(f"/v1/webhooks/{old_id}/migrate", headers=tenant.headers)
    assert response.status_code == 202, response.text
    receiver.add_secret(response.json()["secret"])

    operation = _drive(database, uuid.UUID(response.json()["id"]))

    assert operation.state == OperationState.SUCCEEDED, (operation.error_code, operation.steps)
    assert operation.policy_id is None  # a manual migrate, not a run of the policy
    new_id = operation.new_endpoint_id
    assert new_id is not None
    after = load_policy(database, policy.id)
    assert (after.endpoint_id, after.deleted_at) == (new_id, None)
    assert after.next_run_at == policy.next_run_at  # the schedule is the policy's own
    shown = client.get(f"/v1/rotation-policies/{policy.id}", headers=tenant.headers).json()
    assert shown["endpoint_id"] == str(new_id)

    to(after.next_run_at + timedelta(seconds=1))
    (run,) = tick(database)
    assert run.operation_id is not None  # not skipped as the deleted endpoint's would be
    assert load_operation(database, run.operation_id).source_endpoint_id == new_id


def test_a_new_endpoint_with_a_policy_of_its_own_keeps_it_and_the_old_policy_ends(
    client, database, tenant, demo_receiver
):
    receiver, url = demo_receiver
    created = add_endpoint(database, tenant, url)
    receiver.set_secrets([created.secret])
    old_policy = endpoint_policy(database, tenant, created.endpoint.id)
    response = client.post(f"/v1/webhooks/{created.endpoint.id}/migrate", headers=tenant.headers)
    assert response.status_code == 202, response.text
    receiver.add_secret(response.json()["secret"])
    operation_id = uuid.UUID(response.json()["id"])
    advance(database, operation_id)  # create_endpoint
    new_id = load_operation(database, operation_id).new_endpoint_id
    assert new_id is not None
    own = endpoint_policy(database, tenant, new_id, interval_seconds=2 * HOUR_S)

    operation = _drive(database, operation_id)

    assert operation.state == OperationState.SUCCEEDED, (operation.error_code, operation.steps)
    assert load_policy(database, own.id).endpoint_id == new_id
    assert load_policy(database, own.id).deleted_at is None
    ended = load_policy(database, old_policy.id)
    assert ended.endpoint_id == created.endpoint.id
    assert ended.deleted_at is not None


def test_an_in_band_scheduled_safe_migrate_hands_the_secret_to_the_receiver(
    client, database, tenant, demo_receiver
):
    receiver, url = demo_receiver
    created = add_endpoint(database, tenant, url)
    receiver.set_secrets([created.secret])  # it knows the old secret only
    policy = endpoint_policy(
        database, tenant, created.endpoint.id, handoff="in_band", next_run_at=past()
    )
    operation_id = run_now(database, policy)

    operation = _drive(database, operation_id)

    assert operation.state == OperationState.SUCCEEDED, (operation.error_code, operation.steps)
    assert operation.handoff_delivery_id is not None
    secrets = receiver.secrets()
    assert len(secrets) == 2
    assert secrets[1] == created.secret
    new_id = operation.new_endpoint_id
    assert new_id is not None
    with database.session() as session:
        new_row = session.get(WebhookEndpoint, new_id)
        assert new_row is not None
        assert signing_key(session, new_row) == base64.b64decode(secrets[0])
    assert load_policy(database, policy.id).endpoint_id == new_id
    types = [event["type"] for event in receiver.events() if event["status"] == 200]
    assert types[:2] == ["webhook.secret_handoff", "webhook.test"]
    # Nobody revealed it, and it still can be revealed once.
    assert reveal(client, tenant, operation_id).json()["secret"] == secrets[0]


def test_a_scheduled_safe_migrate_the_receiver_cannot_verify_does_not_follow(
    client, database, tenant, demo_receiver, settings
):
    """Without the new secret the receiver refuses every test delivery: past the deadline the
    migration rolls back and the policy stays on the old endpoint."""
    receiver, url = demo_receiver
    created = add_endpoint(database, tenant, url)
    receiver.set_secrets([created.secret])
    policy = endpoint_policy(database, tenant, created.endpoint.id, next_run_at=past())
    with overridden(settings, scheduled_migrate_deadline_seconds=60):
        operation_id = run_now(database, policy)
    advance(database, operation_id)  # create_endpoint
    advance(database, operation_id)  # test delivery: refused (401)
    assert load_operation(database, operation_id).state == OperationState.AWAITING_RECEIVER
    clock.travel(timedelta(seconds=61))
    advance(database, operation_id)
    operation = load_operation(database, operation_id)
    assert operation.state == OperationState.ROLLED_BACK
    assert load_policy(database, policy.id).endpoint_id == created.endpoint.id
    assert (
        client.get(f"/v1/webhooks/{created.endpoint.id}", headers=tenant.headers).status_code == 200
    )


@pytest.mark.parametrize("strategy", ["safe_migrate", "rotate"])
def test_a_paused_endpoint_is_not_rotated(database, tenant, strategy):
    """A new endpoint from a scheduled migrate would start receiving again: skip the run."""
    endpoint = add_endpoint(database, tenant).endpoint
    policy = endpoint_policy(database, tenant, endpoint.id, strategy=strategy)
    with database.session() as session:
        session.get(WebhookEndpoint, endpoint.id).active = False
    due = policy.next_run_at
    to(due + timedelta(seconds=2))

    assert tick(database) == [Run(policy.id, None)]
    assert operations_of(database, policy.id) == []
    assert load_policy(database, policy.id).next_run_at == due + HOUR
