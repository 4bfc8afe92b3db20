"""``workers.operations.advance`` one call at a time: the safe-migrate state machine, step by step.

No Celery worker runs here: the follow-up messages ``advance`` publishes are never consumed, so
each test decides exactly when the next advance happens, and moves time with ``models.clock``
instead of sleeping. The receiver is a real HTTP server on loopback that counts what arrives.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update

from models import clock
from models import migration as migrations
from models import operation as operations
from models.delivery import Delivery, DeliveryKind, DeliveryState
from models.endpoint import WebhookEndpoint, create_endpoint, signing_key
from models.errors import Conflict
from models.operation import Operation, OperationKind, OperationState, OperationStep, Trigger
from models.org import ALL_SCOPES
from receiver import BadSignature, verify
from schedules.ticks import reconcile_operations
from tests.factories import Tenant
from tests.receivers import Received, ScriptedReceiver
from tests.support import overridden
from workers.operations import advance
from workers.sending import sender_for

STEP_NAMES = ["create_endpoint", "send_test_delivery", "await_success", "delete_old_endpoint"]


# --- helpers ------------------------------------------------------------------------------------


def add_source(database, tenant: Tenant, url: str) -> uuid.UUID:
    with database.session() as session:
        created = create_endpoint(
            session, tenant.org_id, url=url, events=["brand.vetted"], description="old one"
        )
        return created.endpoint.id


def start(database, tenant: Tenant, source_id: uuid.UUID, **kwargs) -> migrations.Started:
    with database.session() as session:
        return migrations.start_migration(session, tenant.org_id, source_id, **kwargs)


def load(database, operation_id: uuid.UUID) -> Operation:
    with database.session() as session:
        operation = session.get(Operation, operation_id)
        assert operation is not None
        return operation


def endpoint(database, endpoint_id: uuid.UUID | None) -> WebhookEndpoint:
    assert endpoint_id is not None
    with database.session() as session:
        row = session.get(WebhookEndpoint, endpoint_id)
        assert row is not None
        return row


def endpoint_count(database, org_id: uuid.UUID) -> int:
    with database.session() as session:
        return session.scalar(
            select(func.count())
            .select_from(WebhookEndpoint)
            .where(WebhookEndpoint.org_id == org_id)
        )


def step_states(operation: Operation) -> list[str]:
    return [step.state for step in operation.steps]


def step_attempts(operation: Operation) -> list[int]:
    return [step.attempts for step in operation.steps]


def probes_sent(database) -> int:
    """Test deliveries sent so far: counted when claimed, before the request goes out."""
    with database.session() as session:
        return int(
            session.scalar(
                select(func.coalesce(func.sum(Delivery.attempts), 0)).where(
                    Delivery.kind == DeliveryKind.PROBE
                )
            )
            or 0
        )


def arrived(receiver: ScriptedReceiver, count: int) -> list[Received]:
    """The requests the receiver got, once ``count`` have arrived (it records after replying)."""
    got = receiver.wait_for(count, timeout=5)
    assert len(got) == count, got
    return got


def cancel(database, tenant: Tenant, operation_id: uuid.UUID) -> None:
    with database.session() as session:
        operations.request_cancel(session, tenant.org_id, operation_id, scopes=ALL_SCOPES)


def waited(operation: Operation) -> float:
    """Seconds from the failed probe's outcome to the next scheduled advance."""
    assert operation.next_advance_at is not None
    return (operation.next_advance_at - operation.updated_at).total_seconds()


def to(moment: datetime | None) -> None:
    """Move the clock to just past ``moment``."""
    assert moment is not None
    clock.travel(moment - clock.now() + timedelta(milliseconds=10))


def migration_waiting(database, tenant, receiver: ScriptedReceiver) -> Operation:
    """A migration whose first test delivery was refused: awaiting the receiver."""
    source_id = add_source(database, tenant, receiver.url)
    started = start(database, tenant, source_id)
    advance(database, started.operation.id)  # create_endpoint
    advance(database, started.operation.id)  # send_test_delivery: refused
    operation = load(database, started.operation.id)
    assert operation.state == OperationState.AWAITING_RECEIVER
    assert probes_sent(database) == 1
    arrived(receiver, 1)
    return operation


def assert_rolled_back_pair(database, operation: Operation) -> None:
    """Invariant 4 for a way out other than success: the old endpoint live, the new one gone."""
    assert operation.source_endpoint_id is not None
    assert endpoint(database, operation.source_endpoint_id).deleted_at is None
    if operation.new_endpoint_id is not None:
        new = endpoint(database, operation.new_endpoint_id)
        assert new.deleted_at is not None
        assert new.active is False


# --- the path through -------------------------------------------------------------------------


def test_each_advance_runs_one_step(database, tenant, accepting):
    source_id = add_source(database, tenant, accepting.url)
    started = start(database, tenant, source_id)
    op_id = started.operation.id
    operation = load(database, op_id)
    assert operation.state == OperationState.PENDING
    assert [step.name for step in operation.steps] == STEP_NAMES
    assert step_states(operation) == ["pending"] * 4
    assert step_attempts(operation) == [0, 0, 0, 0]
    assert operation.new_endpoint_id is None

    advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.RUNNING
    assert step_states(operation) == ["succeeded", "pending", "pending", "pending"]
    assert step_attempts(operation) == [1, 0, 0, 0]
    new = endpoint(database, operation.new_endpoint_id)
    assert new.deleted_at is None
    assert (new.url, new.events, new.description) == (accepting.url, ["brand.vetted"], "old one")
    assert accepting.received == []  # creating the endpoint sends nothing
    assert started.secret is not None
    with database.session() as session:
        new_key = signing_key(session, new)
        old_key = signing_key(session, endpoint(database, source_id))
    assert new_key == base64.b64decode(started.secret)  # the secret minted at the start

    advance(database, op_id)
    operation = load(database, op_id)
    assert probes_sent(database) == 1
    (probe,) = arrived(accepting, 1)
    assert probe.event["type"] == "webhook.test"
    assert probe.event["data"]["endpoint_id"] == str(new.id)
    # Signed with the secret minted when the migration started, not the old one.
    assert verify(probe.headers, probe.body, [started.secret]).secret_index == 0
    assert new_key != old_key
    with pytest.raises(BadSignature):
        verify(probe.headers, probe.body, [old_key])
    assert operation.state == OperationState.RUNNING
    assert step_states(operation) == ["succeeded", "succeeded", "succeeded", "pending"]
    assert step_attempts(operation) == [1, 1, 0, 0]
    assert endpoint(database, source_id).deleted_at is None  # not yet: one step per advance

    advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.SUCCEEDED
    assert step_states(operation) == ["succeeded"] * 4
    assert step_attempts(operation) == [1, 1, 0, 1]
    assert operation.finished_at is not None
    assert operation.next_advance_at is None
    assert operation.error_code is None
    assert endpoint(database, source_id).deleted_at is not None
    assert endpoint(database, operation.new_endpoint_id).deleted_at is None

    advance(database, op_id)  # a late duplicate: the operation has ended
    assert load(database, op_id).updated_at == operation.updated_at
    assert probes_sent(database) == 1
    arrived(accepting, 1)
    assert endpoint_count(database, tenant.org_id) == 2


def test_concurrent_duplicate_advances_create_one_endpoint_and_send_one_probe(
    database, tenant, accepting
):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id
    barrier = threading.Barrier(4)
    errors: list[Exception] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            advance(database, op_id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    operation = load(database, op_id)
    # Whichever ran first created the endpoint; at most one of the rest found the probe due.
    assert step_states(operation)[:3] == ["succeeded"] * 3
    assert step_attempts(operation)[:2] == [1, 1]
    assert probes_sent(database) == 1
    arrived(accepting, 1)
    assert endpoint_count(database, tenant.org_id) == 2
    with database.session() as session:
        probes = session.scalars(select(Delivery).where(Delivery.kind == DeliveryKind.PROBE)).all()
    assert len(probes) == 1


def test_an_advance_that_waited_for_the_lock_sees_the_steps_the_other_one_wrote(
    database, tenant, accepting
):
    """The step rows are read after the operation's lock is granted, not before it."""
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id
    errors: list[Exception] = []

    def second() -> None:
        try:
            advance(database, op_id)
        except Exception as exc:
            errors.append(exc)

    waiter = threading.Thread(target=second)
    with database.session() as session:
        migrations.begin_advance(session, op_id)  # create_endpoint, lock held until commit
        waiter.start()
        if database.dialect == "postgresql":  # SQLite: the one pooled connection serialises
            wait_for_a_lock_wait(database)
    waiter.join(timeout=30)
    assert errors == []
    operation = load(database, op_id)
    # The second advance ran the step after create_endpoint, not create_endpoint again.
    assert step_states(operation) == ["succeeded", "succeeded", "succeeded", "pending"]
    assert step_attempts(operation)[:2] == [1, 1]
    arrived(accepting, 1)


def wait_for_a_lock_wait(database) -> None:
    """Until some session of this database waits for a row lock (bounded)."""
    statement = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(1000):
        with database.engine.connect() as connection:
            if connection.scalar(statement):
                return
        threading.Event().wait(0.01)
    raise AssertionError("the second advance never waited for the lock")


# --- waiting for the receiver -----------------------------------------------------------------


def test_refused_probe_waits_with_doubling_backoff_up_to_the_max(database, tenant, refusing):
    operation = migration_waiting(database, tenant, refusing)
    op_id = operation.id
    assert step_states(operation) == ["succeeded", "succeeded", "running", "pending"]
    send, wait = operation.steps[1], operation.steps[2]
    assert send.last_error == "receiver answered 401"
    assert wait.last_error == "receiver answered 401"
    assert wait.started_at is not None
    assert wait.next_attempt_at == operation.next_advance_at

    waits = [waited(operation)]
    for sent in range(2, 6):
        # Right after a refusal the next advance is early: nothing is sent.
        advance(database, op_id)
        assert probes_sent(database) == sent - 1
        to(load(database, op_id).next_advance_at)
        advance(database, op_id)
        assert probes_sent(database) == sent
        arrived(refusing, sent)
        operation = load(database, op_id)
        assert operation.state == OperationState.AWAITING_RECEIVER
        assert operation.steps[2].attempts == sent - 1
        waits.append(waited(operation))

    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0]
    # One probe delivery, attempted again and again; each attempt carries a fresh timestamp.
    with database.session() as session:
        (probe,) = session.scalars(select(Delivery).where(Delivery.kind == DeliveryKind.PROBE))
    assert probe.attempts == 5
    assert probe.state == DeliveryState.PENDING
    assert len({got.event["id"] for got in refusing.received}) == 1


def test_receiver_accepting_later_completes_the_migration(database, tenant, refusing):
    operation = migration_waiting(database, tenant, refusing)
    refusing.default_status = 204  # the operator installed the new secret
    to(operation.next_advance_at)
    advance(database, operation.id)
    operation = load(database, operation.id)
    assert operation.state == OperationState.RUNNING
    assert step_states(operation) == ["succeeded", "succeeded", "succeeded", "pending"]
    assert operation.steps[2].last_error == "receiver answered 401"  # history of the wait
    advance(database, operation.id)
    operation = load(database, operation.id)
    assert operation.state == OperationState.SUCCEEDED
    assert endpoint(database, operation.source_endpoint_id).deleted_at is not None
    assert endpoint(database, operation.new_endpoint_id).deleted_at is None


def test_probe_in_flight_is_not_sent_again_until_its_lease_runs_out(database, tenant, accepting):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id
    advance(database, op_id)  # create_endpoint
    # A worker starts the probe (the step claims its attempt) and dies before sending it.
    with database.session() as session:
        planned = migrations.begin_advance(session, op_id)
    assert planned.probe is not None
    assert planned.probe.delivery_id == planned.probe_delivery_id
    signatures = [v for k, v in planned.probe.headers.items() if "signature" in k.lower()]
    assert signatures
    assert not any(signature in repr(planned) for signature in signatures)
    assert probes_sent(database) == 1
    leased = load(database, op_id)
    assert leased.next_advance_at is not None
    assert leased.next_advance_at > clock.now() + timedelta(seconds=1)  # so a duplicate is early

    advance(database, op_id)  # a duplicate message while the probe is "in flight"
    assert probes_sent(database) == 1
    assert load(database, op_id).steps[1].attempts == 1
    assert accepting.received == []

    to(leased.next_advance_at)  # the reconciler's message, once the lease has run out
    advance(database, op_id)
    assert probes_sent(database) == 2
    arrived(accepting, 1)
    operation = load(database, op_id)
    assert step_states(operation) == ["succeeded", "succeeded", "succeeded", "pending"]
    assert operation.steps[1].attempts == 2
    assert operation.probe_delivery_id == planned.probe_delivery_id


# --- the ways out that keep the old endpoint ------------------------------------------------------


def test_deadline_while_waiting_rolls_back(database, tenant, refusing):
    source_id = add_source(database, tenant, refusing.url)
    op_id = start(database, tenant, source_id, deadline_seconds=60).operation.id
    advance(database, op_id)
    advance(database, op_id)
    operation = load(database, op_id)
    deadline = operation.deadline_at
    assert deadline is not None
    assert operation.state == OperationState.AWAITING_RECEIVER

    to(deadline - timedelta(seconds=2))  # still inside the deadline: probe again, refused
    advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.AWAITING_RECEIVER
    assert probes_sent(database) == 2
    # The next wait would pass the deadline: the next advance is due at the deadline itself.
    assert operation.next_advance_at == deadline

    to(deadline)
    advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.ROLLED_BACK
    assert operation.error_code == "DEADLINE_EXCEEDED"
    assert operation.error_message
    assert step_states(operation) == ["succeeded", "succeeded", "failed", "skipped"]
    assert operation.steps[2].finished_at is not None
    assert operation.finished_at is not None
    assert probes_sent(database) == 2  # the deadline sends nothing
    assert_rolled_back_pair(database, operation)
    with database.session() as session:
        probe = session.get(Delivery, operation.probe_delivery_id)
        assert probe is not None
        # Closed with the new endpoint: no later message can send it again.
        assert probe.state in (DeliveryState.DEAD, DeliveryState.ABANDONED)
    assert endpoint_count(database, tenant.org_id) == 2


def test_deadline_before_the_new_endpoint_exists_creates_nothing(database, tenant, accepting):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id, deadline_seconds=60).operation.id
    clock.travel(timedelta(seconds=61))  # every message was lost until after the deadline
    advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.ROLLED_BACK
    assert operation.error_code == "DEADLINE_EXCEEDED"
    assert operation.new_endpoint_id is None
    assert step_states(operation) == ["skipped"] * 4
    assert endpoint_count(database, tenant.org_id) == 1
    assert accepting.received == []


def test_cancel_before_create_endpoint_creates_nothing(database, tenant, accepting):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id
    cancel(database, tenant, op_id)
    assert load(database, op_id).state == OperationState.PENDING  # the worker rolls back
    advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.CANCELED
    assert operation.error_code is None
    assert operation.new_endpoint_id is None
    assert step_states(operation) == ["skipped"] * 4
    assert endpoint_count(database, tenant.org_id) == 1
    assert endpoint(database, source_id).deleted_at is None
    assert accepting.received == []
    advance(database, op_id)  # a duplicate after the end creates nothing either
    assert endpoint_count(database, tenant.org_id) == 1


def test_cancel_while_waiting_rolls_back_at_once(database, tenant, refusing):
    operation = migration_waiting(database, tenant, refusing)
    cancel(database, tenant, operation.id)
    advance(database, operation.id)  # due now, although the backoff had not run out
    operation = load(database, operation.id)
    assert operation.state == OperationState.CANCELED
    assert step_states(operation) == ["succeeded", "succeeded", "failed", "skipped"]
    assert probes_sent(database) == 1
    assert_rolled_back_pair(database, operation)
    with pytest.raises(Conflict):
        cancel(database, tenant, operation.id)


def test_cancel_while_a_refused_probe_is_in_flight_is_not_held_back_by_the_backoff(
    database, tenant, refusing
):
    operation = migration_waiting(database, tenant, refusing)
    to(operation.next_advance_at)
    with database.session() as session:  # a worker starts the next test delivery...
        planned = migrations.begin_advance(session, operation.id)
    assert planned.probe is not None
    cancel(database, tenant, operation.id)  # ...the operator cancels meanwhile...
    probe = planned.probe  # ...and the receiver refuses it again
    sent = (probe, sender_for(database).post(probe.url, probe.body, probe.headers))
    with database.session() as session:
        after = migrations.finish_probe(session, operation.id, sent)
    assert after.again_in == 0.0  # the cancel is due now, not after the next wait
    assert after.recorded is not None
    assert after.recorded.response_status == 401

    advance(database, operation.id)  # the message the cancel request published
    operation = load(database, operation.id)
    assert operation.state == OperationState.CANCELED
    assert_rolled_back_pair(database, operation)


def test_a_probe_answered_after_its_operation_rolled_back_is_still_logged(
    database, tenant, accepting
):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id
    advance(database, op_id)  # create_endpoint
    with database.session() as session:  # a worker claims the test delivery...
        planned = migrations.begin_advance(session, op_id)
    assert planned.probe is not None
    cancel(database, tenant, op_id)
    to(load(database, op_id).deadline_at)  # ...and meanwhile the rollback runs (the lease is
    advance(database, op_id)  # long gone at the deadline)
    assert load(database, op_id).state == OperationState.CANCELED

    probe = planned.probe  # the receiver accepts it, too late
    sent = (probe, sender_for(database).post(probe.url, probe.body, probe.headers))
    with database.session() as session:
        after = migrations.finish_probe(session, op_id, sent)
    assert after.again_in is None
    assert after.recorded is not None
    assert after.recorded.response_status == 200
    assert after.recorded.outcome == "success"
    operation = load(database, op_id)
    assert operation.state == OperationState.CANCELED  # the rollback stands
    assert_rolled_back_pair(database, operation)
    with database.session() as session:
        delivery = session.get(Delivery, planned.probe_delivery_id)
        assert delivery is not None
        assert delivery.state == DeliveryState.ABANDONED  # its endpoint is gone: not revived


def test_cancel_is_refused_once_the_old_endpoint_is_deleted(database, tenant, accepting):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id
    for _ in range(3):
        advance(database, op_id)
    assert load(database, op_id).state == OperationState.SUCCEEDED
    with pytest.raises(Conflict):
        cancel(database, tenant, op_id)
    operation = load(database, op_id)
    assert operation.cancel_requested is False
    assert endpoint(database, operation.new_endpoint_id).deleted_at is None


def test_new_endpoint_refused_fails_the_migration_and_keeps_the_old(
    database, tenant, accepting, settings
):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id
    with overridden(settings, allow_insecure_urls=False):  # http:// is no longer acceptable
        advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.FAILED
    assert operation.error_code == "VALIDATION_FAILED"
    assert operation.new_endpoint_id is None
    assert step_states(operation) == ["failed", "skipped", "skipped", "skipped"]
    assert endpoint_count(database, tenant.org_id) == 1
    assert endpoint(database, source_id).deleted_at is None


# --- the reconciler's selection ----------------------------------------------------------------


def test_overdue_selects_unfinished_operations_late_by_more_than_the_threshold(
    database, tenant, refusing
):
    threshold = timedelta(seconds=30)
    fresh = start(database, tenant, add_source(database, tenant, refusing.url)).operation
    waiting = migration_waiting(database, tenant, refusing)  # due after the first backoff
    ended = start(database, tenant, add_source(database, tenant, refusing.url)).operation
    cancel(database, tenant, ended.id)
    advance(database, ended.id)
    assert load(database, ended.id).finished_at is not None
    # A finished operation with a stale due time must still never be picked up.
    with database.session() as session:
        session.execute(
            update(Operation)
            .where(Operation.id == ended.id)
            .values(next_advance_at=clock.now() - timedelta(hours=1))
        )

    def due() -> list[uuid.UUID]:
        with database.session() as session:
            return operations.overdue(session, older_than=threshold)

    fresh_due, waiting_due = fresh.next_advance_at, waiting.next_advance_at
    assert fresh_due is not None
    assert waiting_due is not None
    assert due() == []
    to(fresh_due + threshold - timedelta(seconds=1))
    assert due() == []  # late, but not by more than the threshold
    to(fresh_due + threshold)
    assert due() == [fresh.id]
    to(waiting_due + threshold)
    assert due() == [fresh.id, waiting.id]  # most overdue first
    with overridden(database.settings, reconcile_after_seconds=threshold.total_seconds()):
        assert reconcile_operations() == 2
    assert probes_sent(database) == 1  # selecting them re-sends messages, never a probe


def test_scheduled_rotation_keeps_its_secret_until_revealed(database, tenant, accepting):
    source_id = add_source(database, tenant, accepting.url)
    with database.session() as session:
        started = migrations.start_migration(
            session,
            tenant.org_id,
            source_id,
            kind=OperationKind.SCHEDULED_ROTATION,
            trigger=Trigger.SCHEDULE,
            reveal=False,
        )
    assert started.secret is None
    op_id = started.operation.id
    for _ in range(3):
        advance(database, op_id)
    operation = load(database, op_id)
    assert operation.state == OperationState.SUCCEEDED
    assert operation.kind == OperationKind.SCHEDULED_ROTATION
    with database.session() as session:
        _, secret = operations.reveal_secret(session, tenant.org_id, op_id, scopes=ALL_SCOPES)
    (probe,) = arrived(accepting, 1)
    assert verify(probe.headers, probe.body, [secret]).secret_index == 0
    with pytest.raises(Conflict), database.session() as session:
        operations.reveal_secret(session, tenant.org_id, op_id, scopes=ALL_SCOPES)


# --- what one advance costs the database -----------------------------------------------------
# Each transition locks the operation with its steps in one query and writes each operation and
# step row at most once (a step runs its queries before it changes them, so autoflush does not
# write them early); the test delivery takes two transactions: the step that claims its attempt,
# and the one that records the outcome with the operation's next move.


@dataclass
class Seen:
    commits: int = 0
    statements: list[str] = field(default_factory=list)
    # Row writes per transaction: (table, id) -> how many UPDATEs the flushes made of it.
    writes: list[Counter[tuple[str, uuid.UUID]]] = field(default_factory=lambda: [Counter()])

    def twice_written(self) -> list[tuple[str, uuid.UUID]]:
        return [row for counts in self.writes for row, count in counts.items() if count > 1]


@contextmanager
def watched(database) -> Iterator[Seen]:
    seen = Seen()

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE: not a query
            seen.statements.append(" ".join(statement.split()))

    def on_commit(_conn: Any) -> None:
        seen.commits += 1
        seen.writes.append(Counter())

    def on_update(_mapper: Any, _conn: Any, target: Any) -> None:
        seen.writes[-1][(type(target).__tablename__, target.id)] += 1

    listeners: list[tuple[Any, str, Callable[..., Any]]] = [
        (database.engine, "before_cursor_execute", on_statement),
        (database.engine, "commit", on_commit),
        (Operation, "before_update", on_update),
        (OperationStep, "before_update", on_update),
    ]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    try:
        yield seen
    finally:
        for target, name, listener in listeners:
            event.remove(target, name, listener)


def steps_queried(seen: Seen) -> int:
    """SELECTs of the step rows on their own (not joined to the locked operation)."""
    return sum(
        1
        for statement in seen.statements
        if statement.startswith("SELECT") and "FROM operation_steps" in statement
    )


def test_each_step_of_a_migration_writes_each_row_once(database, tenant, accepting):
    source_id = add_source(database, tenant, accepting.url)
    op_id = start(database, tenant, source_id).operation.id

    commits = []
    for _ in range(3):  # create_endpoint, send_test_delivery (accepted), delete_old_endpoint
        with watched(database) as seen:
            advance(database, op_id)
        assert seen.twice_written() == []
        assert steps_queried(seen) == 0
        commits.append(seen.commits)

    assert commits == [1, 2, 1]  # the test delivery: claimed with its step, recorded with the next
    assert load(database, op_id).state == OperationState.SUCCEEDED


def test_a_refused_test_delivery_and_the_retry_write_each_row_once(database, tenant, refusing):
    source_id = add_source(database, tenant, refusing.url)
    op_id = start(database, tenant, source_id).operation.id
    advance(database, op_id)  # create_endpoint

    for _ in range(2):  # the first test delivery, then a retry once the wait is over
        with watched(database) as seen:
            advance(database, op_id)
        assert seen.twice_written() == []
        assert steps_queried(seen) == 0
        assert seen.commits == 2
        operation = load(database, op_id)
        assert operation.state == OperationState.AWAITING_RECEIVER
        assert operation.steps[2].last_error == "receiver answered 401"
        to(operation.next_advance_at)


def test_a_duplicate_advance_writes_nothing(database, tenant, refusing):
    source_id = add_source(database, tenant, refusing.url)
    op_id = start(database, tenant, source_id).operation.id
    advance(database, op_id)
    advance(database, op_id)  # refused: the next advance is seconds away

    with watched(database) as seen:
        advance(database, op_id)  # early: a duplicate message
    assert seen.commits == 1
    assert [s.split()[0] for s in seen.statements] == ["SELECT"]  # the lock, nothing else
