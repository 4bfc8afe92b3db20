"""Remote migrate: safe migrate of an endpoint that lives at a remote provider
(docs/architecture.md, "Remote migrate"; docs/api.md, "Remote providers").

The same four steps as a safe migrate, each a call to the remote's AgentMessage-compatible API
made by a worker outside any transaction: ``begin`` decides the next call and records that it
is about to be made (committed before it is made), ``record`` takes what the remote answered.
The calls, in order:

- ``lookup`` (GET the old endpoint: the new one copies its url, events and description unless
  given) and ``snapshot`` (list the account: the ids that already had the new url);
- ``create``; its answer is the only place the remote shows the new secret. A create sent but
  not recorded (a crash, a timeout) is followed by ``find``: the account listed again, an
  endpoint with the new url that the snapshot did not have is the one created, and ``rotate``
  gives it a secret Rotator knows. So a retry never leaves two new endpoints;
- ``test`` (the remote's ``POST /v1/webhooks/{new}/test``) until its outcome is ``success``,
  with the safe migrate's backoff;
- ``delete_old``, recorded as sent before it is sent: past that point the migration only goes
  forward, and a 404 on a resend means it is done.

Deadline or cancel before ``delete_old``: ``delete_new`` (after a ``find`` when a create's
answer was lost), then the operation ends. Remote failures are normal: 429 waits its
``Retry-After``, 5xx and no answer back off until the deadline, 401/403 fail the operation
with ``PROVIDER_UNAUTHORIZED``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import clock
from models import provider as providers
from models.db import box_of, settings_of
from models.endpoint import check_description, check_events, check_url
from models.errors import Conflict, raise_if_any
from models.migration import (
    NOTHING,
    Advance,
    advance_now,
    back_off,
    begin_step,
    close_steps,
    finish,
    holding,
    lock_for_advance,
    probe_accepted,
    probe_refused,
    reported,
    step_states,
    succeed_step,
)
from models.operation import (
    DEADLINE_DEFAULT_S,
    MIGRATE_STEPS,
    PROBE_STEPS,
    Operation,
    OperationKind,
    OperationState,
    Step,
    StepState,
    Trigger,
    check_deadline,
    count_started,
    new_operation,
    secret_context,
)
from models.provider import Account, Provider

# A cleanup call (deleting the old endpoint once sent, or the new one on a roll back) that the
# remote keeps failing is given up after this many tries, naming what it left behind.
CLEANUP_TRIES = 10
# The longest a remote's Retry-After is followed.
RETRY_AFTER_MAX_S = 3600.0


class Call(StrEnum):
    LOOKUP = "lookup"
    SNAPSHOT = "snapshot"
    CREATE = "create"
    FIND = "find"
    ROTATE = "rotate"
    TEST = "test"
    DELETE_OLD = "delete_old"
    DELETE_NEW = "delete_new"


class Reply(Protocol):
    """What the remote answered (``workers.remote.Answer``)."""

    @property
    def status(self) -> int | None: ...
    @property
    def retry_after_s(self) -> float | None: ...
    @property
    def ok(self) -> bool: ...
    @property
    def unauthorized(self) -> bool: ...
    @property
    def transient(self) -> bool: ...
    def data(self) -> dict[str, Any]: ...
    def items(self) -> list[dict[str, Any]]: ...
    def message(self) -> str: ...


@dataclass(frozen=True)
class RemoteCall:
    """The one call the worker makes next, and what it needs to make it."""

    call: Call
    account: Account = field(repr=False)
    remote_id: str | None = None  # the endpoint the call is about
    url: str = ""
    events: tuple[str, ...] = ()
    description: str = ""
    first_send: bool = False  # delete_old: never sent before, so a 404 means it was gone


def _params(operation: Operation, **changes: Any) -> None:
    operation.params = {**operation.params, **changes}  # a new dict: JSON changes are seen


# --- starting ---------------------------------------------------------------------------------


def start(
    session: Session,
    org_id: uuid.UUID,
    provider_id: uuid.UUID,
    remote_id: str,
    *,
    url: str | None = None,
    events: Sequence[str] | None = None,
    description: str | None = None,
    deadline_seconds: int | None = None,
    trigger: Trigger = Trigger.API,
    policy_id: uuid.UUID | None = None,
    scheduled_for: datetime | None = None,
) -> Operation:
    """Start a remote migrate of ``remote_id`` at the provider. 409 while another unfinished
    one migrates the same remote endpoint; what is given is checked now, what is copied from
    the old endpoint is the remote's to judge."""
    providers.check_remote_id(remote_id)
    provider = providers.get(session, org_id, provider_id, for_update=True)
    deadline = DEADLINE_DEFAULT_S if deadline_seconds is None else deadline_seconds
    problems = {
        "url": None if url is None else check_url(session, url),
        "events": None if events is None else check_events(list(events)),
        "description": None if description is None else check_description(description),
        "deadline_seconds": check_deadline(deadline),
    }
    raise_if_any(problems)
    _ensure_idle(session, provider.id, remote_id)
    now = clock.now()
    operation = new_operation(
        org_id,
        OperationKind.REMOTE_MIGRATE,
        now,
        steps=MIGRATE_STEPS,
        trigger=trigger,
        policy_id=policy_id,
        scheduled_for=scheduled_for,
        provider_id=provider.id,
        remote_source_id=remote_id,
        params={
            "url": url,
            "events": None if events is None else list(events),
            "description": description,
            "deadline_seconds": deadline,
        },
        deadline_seconds=deadline,
    )
    session.add(operation)
    try:
        session.flush()
    except IntegrityError:  # a concurrent migrate of the same remote endpoint won the race
        raise _busy(remote_id, None) from None
    count_started(session, operation.kind)
    return operation


def active_for_remote(
    session: Session, provider_id: uuid.UUID, remote_id: str | None = None
) -> Operation | None:
    """The unfinished remote migrate using the provider (and, given, that remote endpoint as
    its source or its new endpoint)."""
    query = select(Operation).where(
        Operation.provider_id == provider_id, Operation.finished_at.is_(None)
    )
    if remote_id is not None:
        query = query.where(
            (Operation.remote_source_id == remote_id) | (Operation.remote_new_id == remote_id)
        )
    return session.scalars(query.limit(1)).first()


def _ensure_idle(session: Session, provider_id: uuid.UUID, remote_id: str) -> None:
    busy = active_for_remote(session, provider_id, remote_id)
    if busy is not None:
        raise _busy(remote_id, busy.id)


def _busy(remote_id: str, operation_id: uuid.UUID | None) -> Conflict:
    by = f" {operation_id}" if operation_id is not None else ""
    return Conflict(
        "a migration is running on this remote endpoint",
        details={"endpoint_id": f"{remote_id} is used by unfinished operation{by}"},
    )


def delete_provider(session: Session, org_id: uuid.UUID, provider_id: uuid.UUID) -> Provider:
    """Forget a provider; 409 while a remote migration uses it."""
    busy = active_for_remote(session, provider_id)
    return providers.delete(
        session, org_id, provider_id, busy=busy.id if busy is not None else None
    )


# --- advancing --------------------------------------------------------------------------------


def begin(session: Session, operation_id: uuid.UUID) -> tuple[RemoteCall | None, Advance]:
    """The next call to make, recorded as about to be made; None when there is none now (a
    duplicate or early message, or the operation ended in this transition)."""
    with holding(session):
        operation = lock_for_advance(session, operation_id)
        if (
            operation is None
            or operation.finished
            or operation.kind != OperationKind.REMOTE_MIGRATE
        ):
            return None, NOTHING
        before = step_states(operation)
        call = _plan(session, operation, clock.now())
        return call, reported(operation, before, NOTHING)


def _plan(session: Session, operation: Operation, now: datetime) -> RemoteCall | None:
    if operation.next_advance_at is not None and operation.next_advance_at > now + timedelta(
        seconds=1
    ):
        return None  # a duplicate or early message; the scheduled one will come
    provider = session.get(Provider, operation.provider_id)
    if provider is None or provider.key_ciphertext is None:  # pragma: no cover - 409 on delete
        _fail(operation, now, "NOT_FOUND", "the provider was deleted", None)
        return None
    account = providers.account_of(session, provider)
    rollback = operation.params.get("rollback")
    if rollback is None and not operation.old_endpoint_deleted:
        if operation.cancel_requested:
            rollback = _start_rollback(operation, now, OperationState.CANCELED, None, None)
        elif operation.deadline_at is not None and now >= operation.deadline_at:
            rollback = _start_rollback(
                operation,
                now,
                OperationState.ROLLED_BACK,
                "DEADLINE_EXCEEDED",
                "the receiver did not accept a test delivery before the deadline",
            )
    create = operation.step(Step.CREATE_ENDPOINT)
    lost_create = create.attempts > operation.params.get("searched", 0)
    if rollback is not None:
        if operation.remote_new_id is not None:
            call = RemoteCall(Call.DELETE_NEW, account, operation.remote_new_id)
        elif lost_create and create.state != StepState.SUCCEEDED:
            call = RemoteCall(Call.FIND, account)
        else:
            _end_rollback(operation, now)
            return None
        return _making(session, operation, now, call)
    step = operation.current_step()
    if step is None:  # pragma: no cover - the last step finishes the operation
        finish(operation, OperationState.SUCCEEDED, now)
        return None
    source = operation.remote_source_id
    if step.name == Step.CREATE_ENDPOINT:
        if "old" not in operation.params:
            call = RemoteCall(Call.LOOKUP, account, source)
        elif "known_ids" not in operation.params:
            call = RemoteCall(Call.SNAPSHOT, account)
        elif operation.remote_new_id is not None:
            call = RemoteCall(Call.ROTATE, account, operation.remote_new_id)
        elif lost_create:
            call = RemoteCall(Call.FIND, account)
        else:
            begin_step(step, now)  # counts the send: a crash from here on is a lost create
            params = operation.params
            call = RemoteCall(
                Call.CREATE,
                account,
                url=params["url"],
                events=tuple(params["events"]),
                description=params["description"],
            )
    elif step.name in PROBE_STEPS:
        begin_step(step, now)
        call = RemoteCall(Call.TEST, account, operation.remote_new_id)
    else:
        first_send = step.attempts == 0
        begin_step(step, now)  # recorded as sent before it is sent
        call = RemoteCall(Call.DELETE_OLD, account, source, first_send=first_send)
    if operation.state == OperationState.PENDING:
        operation.state = OperationState.RUNNING
    return _making(session, operation, now, call)


def _making(session: Session, operation: Operation, now: datetime, call: RemoteCall) -> RemoteCall:
    """Leased while the call is in flight (a listing may take two call timeouts): the
    reconciler resends only once the lease and its own wait have passed."""
    lease = 2 * settings_of(session).provider_timeout_seconds + 5
    operation.next_advance_at = now + timedelta(seconds=lease)
    operation.updated_at = now
    _params(operation, calling=str(call.call))  # a cancel meanwhile waits for the answer
    return call


def record(session: Session, operation_id: uuid.UUID, call: RemoteCall, reply: Reply) -> Advance:
    """Take the remote's answer to ``call``: move on, wait and retry, roll back or fail."""
    with holding(session):
        operation = lock_for_advance(session, operation_id)
        if operation is None or operation.finished:
            return NOTHING
        before = step_states(operation)
        now = clock.now()
        operation.updated_at = now
        _params(operation, calling=None)
        advance = _record(session, operation, call, reply, now)
        if (
            operation.cancel_requested
            and not operation.finished
            and operation.params.get("rollback") is None
            and not operation.old_endpoint_deleted
        ):
            advance = advance_now(operation, now)  # canceled during the call: roll back now
        return reported(operation, before, advance)


def _record(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    if reply.unauthorized:
        return _fail(
            operation,
            now,
            "PROVIDER_UNAUTHORIZED",
            f"the provider refused the API key ({reply.status})",
            _left_behind(operation, call),
        )
    if reply.transient:
        return _retry(session, operation, call, reply, now)
    handle = {
        Call.LOOKUP: _looked_up,
        Call.SNAPSHOT: _snapshot,
        Call.CREATE: _created,
        Call.FIND: _found,
        Call.ROTATE: _rotated,
        Call.TEST: _tested,
        Call.DELETE_OLD: _deleted_old,
        Call.DELETE_NEW: _deleted_new,
    }[call.call]
    return handle(session, operation, call, reply, now)


def _looked_up(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    if reply.status == 404:
        return _fail(
            operation, now, "NOT_FOUND", f"the remote endpoint {call.remote_id} does not exist"
        )
    old = reply.data()
    if not reply.ok or not isinstance(old.get("url"), str):
        return _fail(operation, now, "PROVIDER_REJECTED", reply.message())
    params = operation.params
    events = params["events"] if params["events"] is not None else old.get("events")
    _params(
        operation,
        old=True,
        url=params["url"] if params["url"] is not None else old["url"],
        events=list(events) if isinstance(events, list) else [],
        description=params["description"]
        if params["description"] is not None
        else str(old.get("description") or ""),
    )
    return _next(operation, now)


def _snapshot(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    if not reply.ok:
        return _fail(operation, now, "PROVIDER_REJECTED", reply.message())
    _params(operation, known_ids=[item["id"] for item in _with_new_url(operation, reply)])
    return _next(operation, now)


def _with_new_url(operation: Operation, reply: Reply) -> list[dict[str, Any]]:
    """The listed endpoints that have the url the new endpoint gets."""
    url = operation.params.get("url")
    return [
        item for item in reply.items() if item.get("url") == url and isinstance(item.get("id"), str)
    ]


def _created(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    created = reply.data()
    remote_id, secret = created.get("id"), created.get("secret")
    if not reply.ok:
        # 4xx: the remote refused it (limit, validation); nothing was created.
        return _fail(operation, now, "PROVIDER_REJECTED", reply.message())
    if not isinstance(remote_id, str) or not isinstance(secret, str):
        # Created, most likely, but not understood: found again and rotated, like a lost answer.
        return _wait(session, operation, call, now, "the provider's answer had no id or secret")
    return _adopt(session, operation, remote_id, secret, now)


def _adopt(
    session: Session, operation: Operation, remote_id: str, secret: str, now: datetime
) -> Advance:
    operation.remote_new_id = remote_id[:64]
    # Kept as the provider wrote it: reveal-secret hands out that very string.
    operation.new_secret_ciphertext = box_of(session).encrypt(
        secret.encode(), context=secret_context(operation.id)
    )
    succeed_step(operation.step(Step.CREATE_ENDPOINT), now)
    return _next(operation, now)


def _found(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    if not reply.ok:
        return _fail(operation, now, "PROVIDER_REJECTED", reply.message())
    known = {*operation.params.get("known_ids", ()), operation.remote_source_id}
    made = [item for item in _with_new_url(operation, reply) if item["id"] not in known]
    if made:
        newest = max(made, key=lambda item: (str(item.get("created_at", "")), item["id"]))
        operation.remote_new_id = newest["id"][:64]
    else:  # the lost create never landed: the next one is sent afresh
        _params(operation, searched=operation.step(Step.CREATE_ENDPOINT).attempts)
    return _next(operation, now)


def _rotated(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    secret = reply.data().get("secret")
    if reply.status == 404:  # what was found is gone again: create afresh
        operation.remote_new_id = None
        _params(operation, searched=operation.step(Step.CREATE_ENDPOINT).attempts)
        return _next(operation, now)
    if not reply.ok or not isinstance(secret, str) or call.remote_id is None:
        return _start_rollback_now(operation, now, "PROVIDER_REJECTED", reply.message())
    return _adopt(session, operation, call.remote_id, secret, now)


def _tested(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    step = operation.current_step()
    if step is None or step.name not in PROBE_STEPS:  # pragma: no cover - one call at a time
        return NOTHING
    if reply.status == 404:
        return _start_rollback_now(
            operation, now, "NOT_FOUND", f"the new remote endpoint {call.remote_id} is gone"
        )
    outcome = reply.data()
    if reply.ok and outcome.get("outcome") == "success":
        return probe_accepted(operation, step, now)
    if reply.ok:
        status = outcome.get("response_status")
        said = str(outcome.get("error") or "failed").replace("\x00", "\ufffd")
        error = f"receiver answered {status}" if status else said
    else:
        error = reply.message()
    step = probe_refused(operation, step, now, error[:500])
    operation.state = OperationState.AWAITING_RECEIVER
    return back_off(session, operation, step, now)


def _deleted_old(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    step = operation.step(Step.DELETE_OLD_ENDPOINT)
    if reply.ok or (reply.status == 404 and not call.first_send):
        succeed_step(step, now)
        return finish(operation, OperationState.SUCCEEDED, now)
    if reply.status == 404:
        new = operation.remote_new_id
        return _fail(
            operation,
            now,
            "NOT_FOUND",
            f"the old remote endpoint {call.remote_id} was deleted before the migration deleted "
            f"it; the new one ({new}), which the receiver accepted, stays",
            {"new_endpoint_id": f"{new} stays live at the provider"} if new else None,
        )
    return _retry(session, operation, call, reply, now)  # a 4xx: the remote may relent


def _deleted_new(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    if reply.ok or reply.status == 404:
        operation.remote_new_id = None
        _end_rollback(operation, now)
        return NOTHING
    return _retry(session, operation, call, reply, now)


# --- outcomes -----------------------------------------------------------------------------------


def _next(operation: Operation, now: datetime) -> Advance:
    """A call succeeded: the next one now, its backoff starting over."""
    operation.wait_seconds = 0.0
    return advance_now(operation, now)


def _retry(
    session: Session, operation: Operation, call: RemoteCall, reply: Reply, now: datetime
) -> Advance:
    """No answer, 429 or 5xx (or a 4xx on a cleanup): try again after a while."""
    return _wait(session, operation, call, now, reply.message(), reply.retry_after_s)


def _wait(
    session: Session,
    operation: Operation,
    call: RemoteCall,
    now: datetime,
    error: str,
    retry_after_s: float | None = None,
) -> Advance:
    step = operation.current_step()
    if step is not None:
        step.last_error = error[:500]
    if call.call in (Call.DELETE_OLD, Call.DELETE_NEW):
        tries = int(operation.params.get("cleanup_tries", 0)) + 1
        _params(operation, cleanup_tries=tries)
        if tries >= CLEANUP_TRIES:
            return _fail(
                operation,
                now,
                "PROVIDER_UNAVAILABLE",
                f"the provider kept failing: {error}",
                _left_behind(operation, call),
            )
    cleaning = operation.params.get("rollback") is not None or operation.old_endpoint_deleted
    wait_s = None if retry_after_s is None else min(max(retry_after_s, 0.0), RETRY_AFTER_MAX_S)
    return back_off(session, operation, step, now, wait_s=wait_s, until_deadline=not cleaning)


def _left_behind(operation: Operation, call: RemoteCall) -> dict[str, str] | None:
    """What a failed operation leaves at the provider that it meant to delete."""
    if call.call == Call.DELETE_OLD:
        return {"source_endpoint_id": f"{call.remote_id} could not be deleted at the provider"}
    if operation.remote_new_id is not None:
        return {
            "new_endpoint_id": f"{operation.remote_new_id} was created at the provider and "
            "could not be deleted"
        }
    return None


def _start_rollback(
    operation: Operation,
    now: datetime,
    state: OperationState,
    code: str | None,
    message: str | None,
) -> dict[str, Any]:
    rollback = {"state": str(state), "code": code, "message": message}
    _params(operation, rollback=rollback)
    close_steps(operation, now, message)
    return rollback


def _start_rollback_now(operation: Operation, now: datetime, code: str, message: str) -> Advance:
    """Fail, deleting what was created first."""
    _start_rollback(operation, now, OperationState.FAILED, code, message)
    return advance_now(operation, now)


def _end_rollback(operation: Operation, now: datetime) -> None:
    rollback = operation.params["rollback"]
    operation.error_code, operation.error_message = rollback["code"], rollback["message"]
    finish(operation, OperationState(rollback["state"]), now)


def _fail(
    operation: Operation,
    now: datetime,
    code: str,
    message: str,
    details: dict[str, str] | None = None,
) -> Advance:
    close_steps(operation, now, message)
    operation.error_code, operation.error_message = code, message[:500]
    operation.error_details = details
    return finish(operation, OperationState.FAILED, now)
