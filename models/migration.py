"""Safe migrate and the scheduled rotations as a durable state machine (docs/architecture.md,
"Safe migrate"): starting them, and the transitions the workers make.

``begin_advance`` and ``finish_probe`` are the only transitions the workers make; each locks
the operation, checks what is already done (invariant 3), changes the rows, and says when to
advance next. The HTTP request of a test delivery happens between them, outside any
transaction: ``begin_advance`` claims the attempt, ``finish_probe`` records its outcome, each in
its own transition's transaction. Each step runs its queries before it changes the operation and
step rows, so a transition writes each row once, at commit. A safe migrate ends with exactly one
live endpoint of the pair (invariant 4): deleting the old endpoint is the point of no return,
and every other way out soft-deletes the new one. The rows themselves, and what reads or
guards them, are ``models/operation.py``'s.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import Select, bindparam, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from models import attempts, clock, org_secret
from models import delivery as deliveries
from models import endpoint as endpoints
from models.db import box_of, settings_of
from models.endpoint import (
    WebhookEndpoint,
    check_description,
    check_events,
    check_url,
    create_endpoint,
    get_endpoint,
    new_secret,
    signing_key,
)
from models.errors import Conflict, LimitExceeded, NotFound, ValidationFailed, raise_if_any
from models.operation import (
    DEADLINE_DEFAULT_S,
    MIGRATE_STEPS,
    PROBE_STEPS,
    Operation,
    OperationKind,
    OperationState,
    OperationStep,
    Step,
    StepState,
    Trigger,
    busy_conflict,
    check_deadline,
    count_ended,
    count_started,
    ensure_idle,
    new_operation,
    new_secret_of,
    secret_context,
)
from models.policy import follow_migration
from models.usecases import retire_endpoint
from receiver.handoff import HANDOFF_EVENT, seal_handoff

# --- starting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    operation: Operation
    # Shown once, in the response that started it (None: revealed later); never in a repr.
    secret: str | None = field(repr=False)


def start_migration(
    session: Session,
    org_id: uuid.UUID,
    source_id: uuid.UUID,
    *,
    url: str | None = None,
    events: Sequence[str] | None = None,
    description: str | None = None,
    deadline_seconds: int | None = None,
    kind: OperationKind = OperationKind.SAFE_MIGRATE,
    trigger: Trigger = Trigger.API,
    policy_id: uuid.UUID | None = None,
    handoff: str = "none",
    reveal: bool = True,
    scheduled_for: datetime | None = None,
    parent_id: uuid.UUID | None = None,
    start: bool = True,
) -> Started:
    """Start a safe migrate of ``source_id``: mint the new secret now, let the workers do the rest.

    The new endpoint copies the source's url, events and description unless given. A second
    migrate of an endpoint whose operation has not finished is a 409 CONFLICT. A bulk
    migrate's child (``parent_id``) may wait for room (``start=False``): its deadline then
    starts when its parent starts it (models/bulk.py).
    """
    source = get_endpoint(session, org_id, source_id, for_update=True)
    deadline = DEADLINE_DEFAULT_S if deadline_seconds is None else deadline_seconds
    params = {
        "url": source.url if url is None else url,
        "events": list(source.events if events is None else events),
        "description": source.description if description is None else description,
        "deadline_seconds": deadline,
    }
    problems = {
        "url": check_url(session, params["url"]),
        "events": check_events(params["events"]),
        "description": check_description(params["description"]),
        "deadline_seconds": check_deadline(deadline),
    }
    raise_if_any(problems)
    ensure_idle(session, source.id)
    now = clock.now()
    secret = new_secret()
    operation = new_operation(
        org_id,
        kind,
        now,
        steps=MIGRATE_STEPS,
        trigger=trigger,
        policy_id=policy_id,
        scheduled_for=scheduled_for,
        source_endpoint_id=source.id,
        parent_id=parent_id,
        params=params,
        handoff=handoff,
        secret_revealed=reveal,
        deadline_seconds=deadline if start else None,
    )
    operation.new_secret_ciphertext = box_of(session).encrypt(
        base64.b64decode(secret), context=secret_context(operation.id)
    )
    session.add(operation)
    try:
        # No savepoint: the unit of work rolls back on the Conflict anyway (a caller that
        # carries on after one, as the policy tick does, wraps the call in its own).
        session.flush()
    except IntegrityError:  # a concurrent migrate of the same endpoint won the race
        raise busy_conflict(
            f"{source.id} is the source endpoint of another unfinished operation"
        ) from None
    count_started(session, kind)
    return Started(operation=operation, secret=secret if reveal else None)


def start_rotation(
    session: Session,
    org_id: uuid.UUID,
    endpoint_id: uuid.UUID | None,
    *,
    policy_id: uuid.UUID | None,
    scheduled_for: datetime | None,
) -> Operation:
    """A scheduled immediate rotation, recorded as an operation: of one endpoint's secret, or
    (``endpoint_id`` None) of the organization's. The new secret is revealed once, on request."""
    if endpoint_id is not None:
        get_endpoint(session, org_id, endpoint_id, for_update=True)
        ensure_idle(session, endpoint_id)
    now = clock.now()
    step = Step.ROTATE_SECRET if endpoint_id is not None else Step.ROTATE_ORG_SECRET
    operation = new_operation(
        org_id,
        OperationKind.SCHEDULED_ROTATION
        if endpoint_id is not None
        else OperationKind.ORG_SECRET_ROTATION,
        now,
        steps=(step,),
        trigger=Trigger.SCHEDULE,
        policy_id=policy_id,
        scheduled_for=scheduled_for,
        source_endpoint_id=endpoint_id,
        deadline_seconds=DEADLINE_DEFAULT_S,
    )
    session.add(operation)
    session.flush()
    count_started(session, operation.kind)
    return operation


def end_unstarted(session: Session, operation: Operation, now: datetime) -> None:
    """Cancel a bulk migrate's child that never started: nothing was created, nothing to undo."""
    _roll_back(session, operation, OperationState.CANCELED, now, None, None)
    count_ended(session, operation.kind, operation.state)


# --- advancing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedStep:
    name: str
    state: str  # succeeded or failed
    seconds: float | None  # from started_at to finished_at


@dataclass(frozen=True)
class Advance:
    """What the worker does after the transaction (deliver, probe, advance again), and what
    this transition did, for its log lines and metrics once it has committed."""

    probe_delivery_id: uuid.UUID | None = None
    # The probe's attempt, claimed in the same transaction; None when there is nothing to send
    # (a live claim by an earlier run, whose lease has not run out). Not in the repr: its
    # headers carry signatures.
    probe: attempts.AttemptPlan | None = field(default=None, repr=False)
    deliver_first: uuid.UUID | None = None  # the in-band handoff, sent before the probe
    again_in: float | None = None  # seconds until the next advance; None: nothing scheduled
    kind: str | None = None
    finished_steps: tuple[FinishedStep, ...] = ()
    current_step: str | None = None
    ended_state: str | None = None  # set when this transition ended the operation
    parent_id: uuid.UUID | None = None  # the bulk migrate to tell when this child ends
    recorded: deliveries.DeliveryAttempt | None = None  # the probe attempt ``finish_probe`` logged
    remote: bool = False  # a remote migrate: its steps are models.remote's
    # A scheduled org secret rotation: the rotation, whose previous secret expires later.
    org_rotation: org_secret.Rotation | None = field(default=None, repr=False)


NOTHING = Advance()


def reported(operation: Operation, before: dict[uuid.UUID, str], advance: Advance) -> Advance:
    """``advance`` plus what changed since ``before`` (each step's state at the lock)."""
    finished = tuple(
        FinishedStep(
            step.name,
            step.state,
            (step.finished_at - step.started_at).total_seconds()
            if step.started_at is not None and step.finished_at is not None
            else None,
        )
        for step in operation.steps
        if step.finished_at is not None and before.get(step.id) != step.state
    )
    current = operation.current_step()
    return replace(
        advance,
        kind=operation.kind,
        finished_steps=finished,
        current_step=current.name if current is not None else None,
        ended_state=operation.state if operation.finished else None,
        parent_id=operation.parent_id,
    )


def step_states(operation: Operation) -> dict[uuid.UUID, str]:
    return {step.id: step.state for step in operation.steps}


def lock_for_advance(session: Session, operation_id: uuid.UUID) -> Operation | None:
    """The operation row and its step rows, locked and loaded by one query.

    The steps are locked too, not only joined: a query that waited for another transition's
    lock reads the newest version of the rows it locks, but the rows it only joins as they
    were when it started, so it would see the operation after that transition and its steps
    before it. Every operation has steps, hence the inner join (PostgreSQL refuses to lock the
    nullable side of an outer join).
    """
    return (
        session.scalars(_lock_for_advance(), {"operation_id": operation_id}).unique().one_or_none()
    )


# The transitions' statements are built once: building one costs more CPU than running it
# (docs/performance.md, "Safe-migrate benchmark").
@cache
def _lock_for_advance() -> Select[Operation]:
    return (
        select(Operation)
        .options(joinedload(Operation.steps, innerjoin=True))
        .where(Operation.id == bindparam("operation_id"))
        .with_for_update(key_share=True)
    )


_HELD = "rotator.operation.held"


@contextmanager
def holding(session: Session) -> Iterator[None]:
    """Keep every row the transition loads or inserts until it returns.

    The session's identity map holds rows weakly: a row a helper loaded and let go of (the new
    endpoint, the probe's event and delivery) is gone by the time the next helper looks it up by
    primary key, which then costs a query. Held, ``session.get`` finds it in memory.
    """
    session.info[_HELD] = []
    try:
        yield
    finally:
        session.info.pop(_HELD, None)


@event.listens_for(Session, "loaded_as_persistent")
@event.listens_for(Session, "pending_to_persistent")
def _hold(session: Session, instance: object) -> None:
    held: list[object] | None = session.info.get(_HELD)
    if held is not None:
        held.append(instance)


def begin_advance(session: Session, operation_id: uuid.UUID) -> Advance:
    """Run the operation's current step if it is due. Safe to call any number of times."""
    with holding(session):
        operation = lock_for_advance(session, operation_id)
        if operation is None or operation.finished:
            return NOTHING
        if operation.kind == OperationKind.REMOTE_MIGRATE:
            return Advance(kind=operation.kind, remote=True)  # models.remote drives it
        before = step_states(operation)
        return reported(operation, before, _begin(session, operation))


def _begin(session: Session, operation: Operation) -> Advance:
    now = clock.now()
    if operation.started_at is None:
        return NOTHING  # a bulk migrate's child waiting for room: its parent starts it
    if _parent_canceled(session, operation):
        # The bulk migrate was canceled: the cancel wakes each started child, early or not.
        return _roll_back(session, operation, OperationState.CANCELED, now, None, None)
    if operation.next_advance_at is not None and operation.next_advance_at > now + timedelta(
        seconds=1
    ):
        return NOTHING  # a duplicate or early message; the scheduled one will come
    step = operation.current_step()
    if step is None:  # pragma: no cover - the last step finishes the operation
        return finish(operation, OperationState.SUCCEEDED, now)
    if operation.cancel_requested:  # the old endpoint is still live: roll back
        return _roll_back(session, operation, OperationState.CANCELED, now, None, None)
    if (
        operation.deadline_at is not None
        and now >= operation.deadline_at
        and step.name != Step.DELETE_OLD_ENDPOINT
    ):
        return _roll_back(
            session,
            operation,
            OperationState.ROLLED_BACK,
            now,
            "DEADLINE_EXCEEDED",
            "the receiver did not accept a test delivery before the deadline",
        )
    if step.name == Step.CREATE_ENDPOINT:
        advance = _create_endpoint(session, operation, step, now)
    elif step.name in PROBE_STEPS:
        advance = _start_probe(session, operation, step, now)
    elif step.name == Step.DELETE_OLD_ENDPOINT:
        advance = _delete_old_endpoint(session, operation, step, now)
    else:
        advance = _rotate_now(session, operation, step, now)
    # After the step's own queries: each of them would flush these changes (autoflush), and
    # the commit would write the rows a second time.
    if operation.state == OperationState.PENDING:
        operation.state = OperationState.RUNNING
    operation.updated_at = now
    return advance


def _rotate_now(
    session: Session, operation: Operation, step: OperationStep, now: datetime
) -> Advance:
    """The single step of a scheduled immediate rotation; its secret is kept for reveal."""
    rotation = None
    if step.name == Step.ROTATE_SECRET and operation.source_endpoint_id is not None:
        try:
            secret = endpoints.rotate_secret(
                session, operation.org_id, operation.source_endpoint_id, by=operation.id
            ).secret
        except (NotFound, Conflict) as exc:
            begin_step(step, now)
            return _roll_back(session, operation, OperationState.FAILED, now, exc.code, exc.message)
    else:
        rotation = org_secret.rotate(session, operation.org_id)
        secret = rotation.secret
    operation.new_secret_ciphertext = box_of(session).encrypt(
        base64.b64decode(secret), context=secret_context(operation.id)
    )
    begin_step(step, now)
    succeed_step(step, now)
    return replace(finish(operation, OperationState.SUCCEEDED, now), org_rotation=rotation)


def begin_step(step: OperationStep, now: datetime) -> None:
    step.state = StepState.RUNNING
    step.attempts += 1
    step.started_at = step.started_at or now
    step.next_attempt_at = None


def succeed_step(step: OperationStep, now: datetime) -> None:
    step.state = StepState.SUCCEEDED
    step.finished_at = now
    step.next_attempt_at = None
    step.started_at = step.started_at or now


def advance_now(operation: Operation, now: datetime) -> Advance:
    operation.next_advance_at = now
    return Advance(again_in=0.0)


def _create_endpoint(
    session: Session, operation: Operation, step: OperationStep, now: datetime
) -> Advance:
    if operation.new_endpoint_id is None:  # else: created by an earlier run of this step
        params = operation.params
        try:
            created = create_endpoint(
                session,
                operation.org_id,
                url=params["url"],
                events=params["events"],
                description=params["description"],
                secret=new_secret_of(session, operation),
                # Each unfinished migration's pair counts as one endpoint (docs/api.md, Limits).
                over_limit_by=lambda: 1 + _pairs_in_flight(session, operation),
            )
        except (ValidationFailed, NotFound, LimitExceeded) as exc:
            begin_step(step, now)
            return _roll_back(session, operation, OperationState.FAILED, now, exc.code, exc.message)
        operation.new_endpoint_id = created.endpoint.id
    begin_step(step, now)
    succeed_step(step, now)
    return advance_now(operation, now)


def _pairs_in_flight(session: Session, operation: Operation) -> int:
    """Other unfinished migrations of the organization whose new endpoint exists."""
    params = {"org_id": operation.org_id, "operation_id": operation.id}
    return session.scalar(_pairs_in_flight_statement(), params) or 0


@cache
def _pairs_in_flight_statement() -> Select[int]:
    return (
        select(func.count())
        .select_from(Operation)
        .where(
            Operation.org_id == bindparam("org_id"),
            Operation.finished_at.is_(None),
            Operation.new_endpoint_id.is_not(None),
            Operation.id != bindparam("operation_id"),
        )
    )


def _parent_canceled(session: Session, operation: Operation) -> bool:
    """A bulk migrate's cancel reaches each child that has started at its next step."""
    if operation.parent_id is None:
        return False
    return bool(session.scalar(_parent_canceled_statement(), {"parent_id": operation.parent_id}))


@cache
def _parent_canceled_statement() -> Select[bool]:
    return select(Operation.cancel_requested).where(Operation.id == bindparam("parent_id"))


def _start_probe(
    session: Session, operation: Operation, step: OperationStep, now: datetime
) -> Advance:
    if operation.new_endpoint_id is None:  # pragma: no cover - create_endpoint precedes
        raise RuntimeError("probe before the new endpoint exists")
    probe_id = operation.probe_delivery_id
    if probe_id is None:
        probe_id = deliveries.create_test_delivery(
            session, operation.org_id, operation.new_endpoint_id, kind=deliveries.DeliveryKind.PROBE
        ).id
    deliver_first = None
    if operation.handoff == "in_band":
        deliver_first = _ensure_handoff(session, operation)
    # Claimed with this step (locks: the operation, then its delivery, as ``finish_probe``).
    # Signing needs nothing from the handoff, which the worker sends first.
    plan = attempts.claim(session, probe_id)
    operation.probe_delivery_id = probe_id
    begin_step(step, now)
    # Leased while the test delivery is in flight, as long as the delivery itself: the
    # reconciler leaves the operation alone until then (plus its own reconcile_after).
    operation.next_advance_at = attempts.lease_end(session, now)
    return Advance(
        probe_delivery_id=operation.probe_delivery_id, probe=plan, deliver_first=deliver_first
    )


def _ensure_handoff(session: Session, operation: Operation) -> uuid.UUID | None:
    """Send the old endpoint the new secret, sealed under the old one (once per operation).

    Returns the handoff delivery while it still has to be sent, so the worker sends it before
    the test delivery it makes possible.
    """
    if operation.handoff_delivery_id is None:
        old = session.get(WebhookEndpoint, operation.source_endpoint_id)
        if old is None or old.deleted_at is not None or operation.new_endpoint_id is None:
            return None
        old_key, new_secret = signing_key(session, old), new_secret_of(session, operation)
        new_endpoint_id = str(operation.new_endpoint_id)
        delivery = deliveries.create_system_delivery(
            session,
            operation.org_id,
            old.id,
            HANDOFF_EVENT,
            lambda event_id: seal_handoff(
                old_secret=old_key,
                new_secret=new_secret,
                event_id=event_id,
                old_endpoint_id=str(old.id),
                new_endpoint_id=new_endpoint_id,
            ),
        )
        operation.handoff_delivery_id = delivery.id
    handoff = session.get(deliveries.Delivery, operation.handoff_delivery_id)
    if handoff is None or handoff.state != deliveries.DeliveryState.PENDING:
        return None
    return handoff.id


def finish_probe(
    session: Session,
    operation_id: uuid.UUID,
    sent: tuple[attempts.AttemptPlan, attempts.AttemptResult] | None = None,
) -> Advance:
    """Take the test delivery's outcome: move on when accepted, else wait (doubling) and retry.

    ``sent``: the attempt ``begin_advance`` claimed and what the receiver answered; it is
    recorded here, in the same transaction (whatever became of the operation meanwhile).
    """
    with holding(session):
        operation = lock_for_advance(session, operation_id)
        recorded = attempts.record(session, *sent).attempt if sent is not None else None
        if operation is None or operation.finished or operation.probe_delivery_id is None:
            return replace(NOTHING, recorded=recorded)
        before = step_states(operation)
        advance = _finish_probe(session, operation, recorded)
        return replace(reported(operation, before, advance), recorded=recorded)


def _finish_probe(
    session: Session, operation: Operation, recorded: deliveries.DeliveryAttempt | None
) -> Advance:
    now = clock.now()
    step = operation.current_step()
    if step is None or step.name not in PROBE_STEPS:
        return NOTHING  # another run already moved on
    probe = session.get(deliveries.Delivery, operation.probe_delivery_id)
    if probe is None:  # pragma: no cover - the probe row is written with the operation
        return NOTHING
    if probe.state != deliveries.DeliveryState.SUCCEEDED and recorded is None:
        recorded = deliveries.last_attempt(session, probe.id)  # before the rows change
    operation.updated_at = now
    if probe.state == deliveries.DeliveryState.SUCCEEDED:
        return probe_accepted(operation, step, now)
    step = probe_refused(operation, step, now, _describe(recorded))
    if operation.cancel_requested:  # canceled while the probe was in flight: roll back now
        return advance_now(operation, now)
    operation.state = OperationState.AWAITING_RECEIVER
    return back_off(session, operation, step, now)


def probe_accepted(operation: Operation, step: OperationStep, now: datetime) -> Advance:
    """The receiver accepted a test delivery: both probe steps are done; on to the delete."""
    succeed_step(step, now)
    if step.name == Step.SEND_TEST_DELIVERY:
        succeed_step(operation.step(Step.AWAIT_SUCCESS), now)
    operation.state = OperationState.RUNNING
    operation.wait_seconds = 0.0
    return advance_now(operation, now)


def probe_refused(
    operation: Operation, step: OperationStep, now: datetime, error: str
) -> OperationStep:
    """The receiver refused a test delivery (or none arrived): the first one was sent, the
    waiting step runs with ``error`` as its last error. Returns the waiting step."""
    if step.name == Step.SEND_TEST_DELIVERY:
        succeed_step(step, now)  # sent; the waiting is the next step's
        step.last_error = error
        step = operation.step(Step.AWAIT_SUCCESS)
        step.started_at = now
    step.state = StepState.RUNNING
    step.last_error = error
    return step


def back_off(
    session: Session,
    operation: Operation,
    step: OperationStep | None,
    now: datetime,
    *,
    wait_s: float | None = None,
    until_deadline: bool = True,
) -> Advance:
    """Try the step again later: after ``wait_s`` when given (a Retry-After), else after the
    migrate backoff (the first wait, doubling up to the last); no later than the deadline
    unless ``until_deadline`` is False (a clean-up that must go on past it)."""
    settings = settings_of(session)
    wait = (
        settings.migrate_backoff_initial_seconds
        if operation.wait_seconds <= 0
        else min(operation.wait_seconds * 2, settings.migrate_backoff_max_seconds)
    )
    operation.wait_seconds = wait
    next_at = now + timedelta(seconds=wait if wait_s is None else wait_s)
    if operation.deadline_at is not None and until_deadline:
        next_at = min(next_at, max(operation.deadline_at, now))
    if step is not None:
        step.next_attempt_at = next_at
    operation.next_advance_at = next_at
    return Advance(again_in=max(0.0, (next_at - now).total_seconds()))


def _describe(attempt: deliveries.DeliveryAttempt | None) -> str:
    if attempt is None:
        return "no response recorded"
    if attempt.response_status is not None:
        return f"receiver answered {attempt.response_status}"
    return attempt.error or "delivery failed"


def _delete_old_endpoint(
    session: Session, operation: Operation, step: OperationStep, now: datetime
) -> Advance:
    source = (
        session.get(WebhookEndpoint, operation.source_endpoint_id)
        if operation.source_endpoint_id
        else None
    )
    if source is not None and source.deleted_at is None:
        retire_endpoint(session, source)
    if operation.source_endpoint_id is not None and operation.new_endpoint_id is not None:
        follow_migration(session, operation.source_endpoint_id, operation.new_endpoint_id)
    begin_step(step, now)
    succeed_step(step, now)
    return finish(operation, OperationState.SUCCEEDED, now)


def finish(operation: Operation, state: OperationState, now: datetime) -> Advance:
    # The workers are done with the new secret. Kept only while it is the live secret of what
    # the operation made and nobody has seen it yet: reveal-secret is then its only way out.
    if operation.secret_revealed or state != OperationState.SUCCEEDED:
        operation.new_secret_ciphertext = None
    operation.state = state
    operation.finished_at = now
    operation.updated_at = now
    operation.next_advance_at = None
    return NOTHING


def _roll_back(
    session: Session,
    operation: Operation,
    state: OperationState,
    now: datetime,
    code: str | None,
    message: str | None,
) -> Advance:
    """Undo: the new endpoint is soft-deleted, the old one stays live."""
    if operation.new_endpoint_id is not None:
        new = session.get(WebhookEndpoint, operation.new_endpoint_id)
        if new is not None and new.deleted_at is None:
            retire_endpoint(session, new)
    if operation.probe_delivery_id is not None:
        deliveries.close_probe(session, operation.probe_delivery_id)
    if operation.handoff_delivery_id is not None:
        # An unsent handoff (to the old endpoint, which stays live) must not go out later: it
        # would hand the receiver the secret of the endpoint just deleted.
        deliveries.close_probe(session, operation.handoff_delivery_id)
    close_steps(operation, now, message)
    operation.error_code, operation.error_message = code, message
    return finish(operation, state, now)


def close_steps(operation: Operation, now: datetime, message: str | None) -> None:
    """The step in progress failed (with ``message``); the ones not reached are skipped."""
    current = operation.current_step()
    for step in operation.steps:
        if step.state in (StepState.SUCCEEDED, StepState.SKIPPED, StepState.FAILED):
            continue
        if step is current and step.state == StepState.RUNNING:
            step.state = StepState.FAILED
            step.finished_at = now
            step.last_error = message or step.last_error or "canceled"
        else:
            step.state = StepState.SKIPPED
        step.next_attempt_at = None
