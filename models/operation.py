"""Operations: the rows of every rotation Rotator carries out (docs/architecture.md), and what
reads them or guards what they use.

An operation is a row plus one row per step. This module holds the tables, their kinds and
states, and the rules other nouns ask about: whether an endpoint is busy, the stored copy of a
new secret (revealed once, forgotten when stale), cancel requests, and the lists operators
read. The transitions live above it: ``models/migration.py`` (safe migrate and the scheduled
rotations), ``models/bulk.py``, ``models/remote.py``. This module imports none of them, nor the
endpoints, deliveries or secrets whose operations it records.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Select,
    String,
    UniqueConstraint,
    Update,
    bindparam,
    select,
    text,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from sqlalchemy.sql.elements import BindParameter

from models import clock
from models.base import Base, IdMixin, UTCDateTime, enum_column
from models.db import after_commit, box_of, settings_of
from models.errors import Conflict, Forbidden, NotFound, ValidationFailed
from models.ids import new_id
from models.org import Scope
from models.pagination import Page, paginate
from models.reads import Query, Reads
from rotator import metrics

if TYPE_CHECKING:
    from models.endpoint import WebhookEndpoint


class OperationKind(StrEnum):
    SAFE_MIGRATE = "safe_migrate"
    SCHEDULED_ROTATION = "scheduled_rotation"
    ORG_SECRET_ROTATION = "org_secret_rotation"  # noqa: S105 - a kind, not a secret
    BULK_MIGRATE = "bulk_migrate"
    REMOTE_MIGRATE = "remote_migrate"  # an endpoint at a remote provider (models/remote.py)


class OperationState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    AWAITING_RECEIVER = "awaiting_receiver"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATES = frozenset(
    {
        OperationState.SUCCEEDED,
        OperationState.ROLLED_BACK,
        OperationState.FAILED,
        OperationState.CANCELED,
    }
)


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class Trigger(StrEnum):
    API = "api"
    SCHEDULE = "schedule"


class Step(StrEnum):
    CREATE_ENDPOINT = "create_endpoint"
    SEND_TEST_DELIVERY = "send_test_delivery"
    AWAIT_SUCCESS = "await_success"
    DELETE_OLD_ENDPOINT = "delete_old_endpoint"
    ROTATE_SECRET = "rotate_secret"  # noqa: S105 - a step: scheduled immediate rotation
    ROTATE_ORG_SECRET = "rotate_org_secret"  # noqa: S105 - a step: scheduled org rotation


MIGRATE_STEPS: tuple[Step, ...] = (
    Step.CREATE_ENDPOINT,
    Step.SEND_TEST_DELIVERY,
    Step.AWAIT_SUCCESS,
    Step.DELETE_OLD_ENDPOINT,
)
PROBE_STEPS = frozenset({Step.SEND_TEST_DELIVERY, Step.AWAIT_SUCCESS})
DEADLINE_MIN_S, DEADLINE_MAX_S, DEADLINE_DEFAULT_S = 60, 86_400, 900


def check_deadline(deadline: object) -> str | None:
    """What is wrong with a migration's ``deadline_seconds``, or None."""
    if isinstance(deadline, int) and DEADLINE_MIN_S <= deadline <= DEADLINE_MAX_S:
        return None
    return f"must be {DEADLINE_MIN_S}-{DEADLINE_MAX_S} seconds"


# A bulk migrate's children active at once (models/bulk.py).
CONCURRENCY_MIN, CONCURRENCY_MAX, CONCURRENCY_DEFAULT = 1, 50, 5


def check_concurrency(concurrency: int) -> str | None:
    """What is wrong with a bulk migrate's ``max_concurrency``, or None."""
    if CONCURRENCY_MIN <= concurrency <= CONCURRENCY_MAX:
        return None
    return f"must be {CONCURRENCY_MIN}-{CONCURRENCY_MAX}"


REVEAL_RETRY_AFTER_S = 2  # a remote migrate's secret exists once the remote created it


KEPT_SECRETS = "new_secret_ciphertext IS NOT NULL AND finished_at IS NOT NULL"


class Operation(IdMixin, Base):
    __tablename__ = "operations"
    __table_args__ = (
        # At most one unfinished operation per source endpoint ("busy" → 409 CONFLICT).
        Index(
            "uq_operations_one_active_per_source",
            "source_endpoint_id",
            unique=True,
            postgresql_where=text("finished_at IS NULL"),
            sqlite_where=text("finished_at IS NULL"),
        ),
        # One operation per policy and due time, however many beats tick.
        UniqueConstraint("policy_id", "scheduled_for"),
        Index("ix_operations_org_created", "org_id", "created_at", "id"),
        Index("ix_operations_unfinished_next", "finished_at", "next_advance_at"),
        # "Is this endpoint busy?" looks endpoints up as the new endpoint of unfinished ones too.
        Index(
            "ix_operations_unfinished_new_endpoint",
            "new_endpoint_id",
            postgresql_where=text("finished_at IS NULL"),
            sqlite_where=text("finished_at IS NULL"),
        ),
        Index("ix_operations_kind_state", "kind", "state"),  # /metrics counts by these
        # At most one unfinished remote migrate per remote endpoint (models/remote.py).
        Index(
            "uq_operations_one_active_per_remote_source",
            "provider_id",
            "remote_source_id",
            unique=True,
            postgresql_where=text("finished_at IS NULL AND remote_source_id IS NOT NULL"),
            sqlite_where=text("finished_at IS NULL AND remote_source_id IS NOT NULL"),
        ),
        # A bulk migrate's children, in the order they start (models/bulk.py).
        Index("ix_operations_parent", "parent_id", "created_at", "id"),
        # The few finished operations still holding a secret (unrevealed), found when what
        # they rotated changes; unfinished ones, which every running migration is, stay out.
        Index(
            "ix_operations_kept_secrets",
            "org_id",
            postgresql_where=text(KEPT_SECRETS),
            sqlite_where=text(KEPT_SECRETS),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    kind: Mapped[OperationKind] = mapped_column(enum_column(OperationKind, 32))
    state: Mapped[OperationState] = mapped_column(enum_column(OperationState, 32))
    trigger: Mapped[Trigger] = mapped_column(enum_column(Trigger, 16))
    policy_id: Mapped[uuid.UUID | None] = mapped_column()
    scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime)
    source_endpoint_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("webhook_endpoints.id"))
    new_endpoint_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("webhook_endpoints.id"))
    # The new endpoint's url/events/description, fixed when the operation starts.
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    handoff: Mapped[str] = mapped_column(String(16), default="none")
    new_secret_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    secret_revealed: Mapped[bool] = mapped_column(Boolean, default=False)
    probe_delivery_id: Mapped[uuid.UUID | None] = mapped_column()
    handoff_delivery_id: Mapped[uuid.UUID | None] = mapped_column()
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    wait_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # None for a bulk migrate, and for its children until they start.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The bulk migrate this operation is a child of.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("operations.id"))
    # A remote migrate's provider, and the remote ids of its source and of what it created.
    provider_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("providers.id"))
    remote_source_id: Mapped[str | None] = mapped_column(String(64))
    remote_new_id: Mapped[str | None] = mapped_column(String(64))
    # None while a child waits for room under its parent's max_concurrency.
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_advance_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(500))
    error_details: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    steps: Mapped[list[OperationStep]] = relationship(
        order_by="OperationStep.position", lazy="selectin", cascade="all, delete-orphan"
    )

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def step(self, name: Step) -> OperationStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def current_step(self) -> OperationStep | None:
        for step in self.steps:
            if step.state not in (StepState.SUCCEEDED, StepState.SKIPPED):
                return step
        return None

    @property
    def old_endpoint_deleted(self) -> bool:
        """Past the point of no return: the old endpoint's deletion has committed."""
        for step in self.steps:
            if step.name == Step.DELETE_OLD_ENDPOINT:
                # A remote delete is recorded as sent before it is sent (models/remote.py):
                # from then on it may have happened, and only going forward is safe.
                sent = self.kind == OperationKind.REMOTE_MIGRATE and step.attempts > 0
                return step.state == StepState.SUCCEEDED or sent
        return False


class OperationStep(IdMixin, Base):
    __tablename__ = "operation_steps"
    __table_args__ = (UniqueConstraint("operation_id", "position"),)

    operation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("operations.id"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[Step] = mapped_column(enum_column(Step, 32))
    state: Mapped[StepState] = mapped_column(enum_column(StepState, 16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(500))


def new_operation(
    org_id: uuid.UUID,
    kind: OperationKind,
    now: datetime,
    *,
    steps: Sequence[Step] = (),
    deadline_seconds: int | None = None,
    **fields: Any,
) -> Operation:
    """A new operation row, as every kind starts: pending, not canceled, no backoff, nothing
    revealed, created now, one pending row per step in order; ``fields`` set the rest. With
    ``deadline_seconds`` it starts now: its first step is due at once, its deadline that far."""
    defaults: dict[str, Any] = {
        "state": OperationState.PENDING,
        "trigger": Trigger.API,
        "params": {},
        "handoff": "none",
        "secret_revealed": False,
        "cancel_requested": False,
        "wait_seconds": 0.0,
    }
    if deadline_seconds is not None:
        defaults |= {
            "started_at": now,
            "next_advance_at": now,
            "deadline_at": now + timedelta(seconds=deadline_seconds),
        }
    return Operation(
        id=new_id(),
        org_id=org_id,
        kind=kind,
        created_at=now,
        updated_at=now,
        steps=[
            OperationStep(
                id=new_id(), position=position, name=name, state=StepState.PENDING, attempts=0
            )
            for position, name in enumerate(steps)
        ],
        **(defaults | fields),
    )


def secret_context(operation_id: uuid.UUID) -> str:
    return f"operation.new_secret:{operation_id}"


def count_started(session: Session, kind: str) -> None:
    """``rotator_operations_started_total``, once the start has committed (rotator/metrics.py)."""
    settings = settings_of(session)
    after_commit(session, lambda: metrics.count_operation_started(settings, kind))


def count_ended(session: Session, kind: str, state: str) -> None:
    """``rotator_operations_ended_total`` for an operation no worker step ends (a bulk
    migrate, a child canceled before it started), once that has committed."""
    settings = settings_of(session)
    after_commit(session, lambda: metrics.count_operation_ended(settings, kind, state))


def active_for_endpoint(
    session: Session, endpoint_id: uuid.UUID, *, besides: uuid.UUID | None = None
) -> Operation | None:
    """The unfinished operation (other than ``besides``) that uses ``endpoint_id`` as its
    source or its new endpoint."""
    params = {"endpoint_id": endpoint_id, "besides": besides}
    return session.scalars(_active_for_endpoint(besides is not None), params).first()


# Statements every migrate, delete and rotate runs are built once: building one costs more CPU
# than running it (docs/performance.md, "Safe-migrate benchmark").
@cache
def _active_for_endpoint(besides: bool) -> Select[Operation]:
    endpoint_id: BindParameter[uuid.UUID] = bindparam("endpoint_id")
    query = select(Operation).where(
        Operation.finished_at.is_(None),
        (Operation.source_endpoint_id == endpoint_id) | (Operation.new_endpoint_id == endpoint_id),
    )
    return query.where(Operation.id != bindparam("besides")) if besides else query


def ensure_idle(
    session: Session, endpoint_id: uuid.UUID, *, besides: uuid.UUID | None = None
) -> None:
    """409 CONFLICT, naming the operation, while an unfinished one uses the endpoint.

    The one rule for every change a running migration depends on: starting another one,
    deleting either endpoint of the pair, rotating its secret, changing its url or events
    (docs/api.md, Conflicts). ``besides``: the operation making the change itself.
    """
    busy = active_for_endpoint(session, endpoint_id, besides=besides)
    if busy is not None:
        role = "source" if busy.source_endpoint_id == endpoint_id else "new"
        raise busy_conflict(
            f"{endpoint_id} is the {role} endpoint of unfinished operation {busy.id}"
        )


def busy_conflict(detail: str) -> Conflict:
    return Conflict("a migration is running on this endpoint", details={"endpoint_id": detail})


# --- reading ----------------------------------------------------------------------------------


def get_operation(session: Session, org_id: uuid.UUID, operation_id: uuid.UUID) -> Operation:
    operation = session.scalars(
        select(Operation).where(Operation.id == operation_id, Operation.org_id == org_id)
    ).one_or_none()
    if operation is None:
        raise NotFound()
    return operation


_VERSION = Query(
    select(Operation.updated_at, Operation.finished_at).where(
        Operation.id == bindparam("operation_id"), Operation.org_id == bindparam("org_id")
    )
)


Version = tuple[datetime, datetime | None]  # updated_at, finished_at


async def read_version(reads: Reads, org_id: uuid.UUID, operation_id: uuid.UUID) -> Version | None:
    """What changes whenever the operation or one of its steps does (every transition sets
    ``updated_at``): one primary-key read on the event loop, for a watcher to poll cheaply
    before it reads the whole operation. None when there is no such operation."""
    row = await reads.one(_VERSION, operation_id=operation_id, org_id=org_id)
    return None if row is None else (row["updated_at"], row["finished_at"])


def list_operations(
    session: Session,
    org_id: uuid.UUID,
    *,
    state: str | None,
    kind: str | None,
    endpoint_id: uuid.UUID | None,
    limit: int,
    cursor: str | None,
    parent_id: uuid.UUID | None = None,
) -> Page[Operation]:
    """Top-level operations, or one bulk migrate's children (``parent_id``); with
    ``endpoint_id``, every operation that uses the endpoint, children included."""
    problems = {}
    if state is not None and state not in {s.value for s in OperationState}:
        problems["state"] = "unknown state"
    if kind is not None and kind not in {k.value for k in OperationKind}:
        problems["kind"] = "unknown kind"
    if problems:
        raise ValidationFailed(problems)
    query = select(Operation).where(Operation.org_id == org_id)
    if parent_id is not None:
        query = query.where(Operation.parent_id == parent_id)
    elif endpoint_id is None:
        query = query.where(Operation.parent_id.is_(None))
    if state:
        query = query.where(Operation.state == state)
    if kind:
        query = query.where(Operation.kind == kind)
    if endpoint_id:
        query = query.where(
            (Operation.source_endpoint_id == endpoint_id)
            | (Operation.new_endpoint_id == endpoint_id)
        )
    return paginate(
        session,
        query,
        created_at=Operation.created_at,
        id_column=Operation.id,
        limit=limit,
        cursor=cursor,
    )


def new_secret_of(session: Session, operation: Operation) -> str:
    if operation.new_secret_ciphertext is None:
        raise Conflict("this operation has no endpoint secret")
    raw = box_of(session).decrypt(
        operation.new_secret_ciphertext, context=secret_context(operation.id)
    )
    if operation.kind == OperationKind.REMOTE_MIGRATE:
        return raw.decode()  # the provider's own string, whatever its format
    return base64.b64encode(raw).decode()


def reveal_secret(
    session: Session, org_id: uuid.UUID, operation_id: uuid.UUID, *, scopes: Collection[str]
) -> tuple[Operation, str]:
    """Hand out the new secret once, for operations no response revealed (scheduled ones).

    The stored copy goes with the reveal; a migration still running keeps it until it ends,
    as its workers create the new endpoint with it (docs/api.md, Secrets' lifetimes).
    """
    operation = _locked(session, org_id, operation_id, scopes)
    if operation.secret_revealed:
        raise Conflict("the secret of this operation was already revealed")
    if operation.new_secret_ciphertext is None:
        if operation.finished:
            raise Conflict(
                "this operation no longer holds a secret: it did not succeed, or what it "
                "rotated has since been deleted or rotated again"
            )
        if operation.kind == OperationKind.REMOTE_MIGRATE:
            raise Conflict(
                "the new remote endpoint is not created yet; its secret can be revealed once it is",
                retry_after=REVEAL_RETRY_AFTER_S,
            )
        raise Conflict("this operation has not minted its new secret yet")
    secret = new_secret_of(session, operation)
    operation.secret_revealed = True
    operation.updated_at = clock.now()
    # A remote migrate's workers never need the secret the remote minted: it goes now.
    if operation.finished or operation.kind == OperationKind.REMOTE_MIGRATE:
        operation.new_secret_ciphertext = None
    return operation, secret


def forget_endpoint_secret(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint's secret was replaced or the endpoint deleted: a finished operation's
    unrevealed copy of that secret (the new endpoint's for a migration, the endpoint's own for
    a scheduled rotate) is stale, and goes."""
    session.execute(
        _forget_endpoint_secret(), {"in_org": endpoint.org_id, "endpoint_id": endpoint.id}
    )


@cache
def _forget_endpoint_secret() -> Update:
    endpoint_id: BindParameter[uuid.UUID] = bindparam("endpoint_id")
    return (
        update(Operation)
        .where(
            Operation.org_id == bindparam("in_org"),
            Operation.new_secret_ciphertext.is_not(None),
            Operation.finished_at.is_not(None),
            (Operation.new_endpoint_id == endpoint_id)
            | (Operation.new_endpoint_id.is_(None) & (Operation.source_endpoint_id == endpoint_id)),
        )
        .values(new_secret_ciphertext=None)
    )


def forget_org_secret(session: Session, org_id: uuid.UUID) -> None:
    """The organization secret was rotated again: finished org secret rotations' unrevealed
    copies are no longer the current secret, and go."""
    session.execute(
        update(Operation)
        .where(
            Operation.org_id == org_id,
            Operation.new_secret_ciphertext.is_not(None),
            Operation.finished_at.is_not(None),
            Operation.kind == OperationKind.ORG_SECRET_ROTATION,
        )
        .values(new_secret_ciphertext=None)
    )


def write_scope(kind: str) -> Scope:
    """The scope that revealing or canceling an operation of ``kind`` needs.

    An org secret rotation hands out (or stops) the organization's secret, which only
    ``org:admin:write`` may rotate; every other kind is an endpoint's (docs/api.md, Scopes).
    """
    if kind == OperationKind.ORG_SECRET_ROTATION:
        return Scope.ORG_ADMIN_WRITE
    return Scope.WEBHOOKS_WRITE


def _locked(
    session: Session, org_id: uuid.UUID, operation_id: uuid.UUID, scopes: Collection[str]
) -> Operation:
    """The operation, locked, for a caller holding ``scopes``.

    404 comes first, whatever the scopes: another organization's id (or an unknown one) says
    nothing about what the key may do. Then 403 when the kind needs a scope the key lacks.
    """
    operation = session.scalars(
        select(Operation)
        .where(Operation.id == operation_id, Operation.org_id == org_id)
        .with_for_update(key_share=True)
    ).one_or_none()
    if operation is None:
        raise NotFound()
    if write_scope(operation.kind) not in scopes:
        raise Forbidden()
    return operation


def request_cancel(
    session: Session, org_id: uuid.UUID, operation_id: uuid.UUID, *, scopes: Collection[str]
) -> Operation:
    """Ask for a roll back; refused once the old endpoint is deleted or the operation ended."""
    operation = _locked(session, org_id, operation_id, scopes)
    if operation.finished:
        raise Conflict("the operation has already ended")
    if operation.old_endpoint_deleted:
        raise Conflict("the old endpoint is already deleted; the migration cannot be canceled")
    operation.cancel_requested = True
    # A remote migrate's call in flight keeps its lease: the answer is recorded first (what it
    # created must be known to be deleted), then the roll back runs at once (models/remote.py).
    if not operation.params.get("calling"):
        operation.next_advance_at = clock.now()
    operation.updated_at = clock.now()
    return operation


def overdue(session: Session, *, older_than: timedelta, limit: int = 500) -> list[uuid.UUID]:
    """Unfinished operations whose next advance is overdue: their message was lost."""
    cutoff = clock.now() - older_than
    return list(
        session.scalars(
            select(Operation.id)
            .where(Operation.finished_at.is_(None), Operation.next_advance_at <= cutoff)
            .order_by(Operation.next_advance_at)
            .limit(limit)
        )
    )
