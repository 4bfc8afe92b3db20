"""Rotation policies: scheduled periodic rotation (docs/api.md, "Rotation policies"): the
table, its rules, and policies following what a migration replaced. Beat's tick, which starts
each due policy's run, is ``models/policy_runs.py``.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import Any

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Update,
    bindparam,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models import operation as operations
from models import provider as providers
from models.base import Base, IdMixin, UTCDateTime, enum_column
from models.db import settings_of
from models.endpoint import get_endpoint
from models.errors import Conflict, NotFound, ValidationFailed
from models.ids import new_id
from models.operation import CONCURRENCY_DEFAULT, check_concurrency
from models.pagination import Page, paginate

MAX_INTERVAL_S = 10 * 366 * 86_400


class Target(StrEnum):
    ENDPOINT = "endpoint"
    ORG_SECRET = "org_secret"  # noqa: S105 - a target, not a secret
    ORG_ENDPOINTS = "org_endpoints"  # every active endpoint, one bulk migrate per run
    REMOTE_ENDPOINT = "remote_endpoint"  # an endpoint at a remote provider (models/remote.py)


class Strategy(StrEnum):
    SAFE_MIGRATE = "safe_migrate"
    ROTATE = "rotate"


class Handoff(StrEnum):
    NONE = "none"
    IN_BAND = "in_band"


class RotationPolicy(IdMixin, Base):
    __tablename__ = "rotation_policies"
    __table_args__ = (
        # One live policy per target: per endpoint, and one for the organization's secret.
        Index(
            "uq_rotation_policies_endpoint",
            "endpoint_id",
            unique=True,
            postgresql_where=text("deleted_at IS NULL AND endpoint_id IS NOT NULL"),
            sqlite_where=text("deleted_at IS NULL AND endpoint_id IS NOT NULL"),
        ),
        Index(
            "uq_rotation_policies_org_secret",
            "org_id",
            unique=True,
            postgresql_where=text("deleted_at IS NULL AND target = 'org_secret'"),
            sqlite_where=text("deleted_at IS NULL AND target = 'org_secret'"),
        ),
        Index(
            "uq_rotation_policies_org_endpoints",
            "org_id",
            unique=True,
            postgresql_where=text("deleted_at IS NULL AND target = 'org_endpoints'"),
            sqlite_where=text("deleted_at IS NULL AND target = 'org_endpoints'"),
        ),
        Index(
            "uq_rotation_policies_remote_endpoint",
            "provider_id",
            "remote_endpoint_id",
            unique=True,
            postgresql_where=text("deleted_at IS NULL AND target = 'remote_endpoint'"),
            sqlite_where=text("deleted_at IS NULL AND target = 'remote_endpoint'"),
        ),
        Index("ix_rotation_policies_due", "deleted_at", "paused", "next_run_at"),
        Index("ix_rotation_policies_org_created", "org_id", "created_at", "id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    target: Mapped[Target] = mapped_column(enum_column(Target, 16))
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("webhook_endpoints.id"))
    strategy: Mapped[Strategy] = mapped_column(enum_column(Strategy, 16))
    interval_seconds: Mapped[int] = mapped_column(Integer)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    handoff: Mapped[Handoff] = mapped_column(enum_column(Handoff, 16), default=Handoff.NONE)
    # remote_endpoint: the provider and the remote id (followed to each migration's new one).
    provider_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("providers.id"))
    remote_endpoint_id: Mapped[str | None] = mapped_column(String(64))
    # org_endpoints: children of each run's bulk migrate active at once.
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_operation_id: Mapped[uuid.UUID | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


UPDATABLE = frozenset(
    {"strategy", "interval_seconds", "paused", "handoff", "next_run_at", "max_concurrency"}
)


def _check(
    session: Session, org_id: uuid.UUID, values: dict[str, Any], *, new: bool = True
) -> dict[str, str]:
    problems: dict[str, str] = {}
    target, strategy, handoff = values["target"], values["strategy"], values["handoff"]
    if target not in {t.value for t in Target}:
        problems["target"] = "must be endpoint, org_secret, org_endpoints or remote_endpoint"
    if strategy not in {s.value for s in Strategy}:
        problems["strategy"] = "must be safe_migrate or rotate"
    if handoff not in {h.value for h in Handoff}:
        problems["handoff"] = "must be none or in_band"
    interval = values["interval_seconds"]
    shortest = settings_of(session).policy_min_interval_seconds
    if (
        not isinstance(interval, int)
        or isinstance(interval, bool)
        or not (shortest <= interval <= MAX_INTERVAL_S)
    ):
        problems["interval_seconds"] = f"must be an integer of at least {shortest}"
    if target == Target.ENDPOINT:
        if values["endpoint_id"] is None:
            problems["endpoint_id"] = "is required for an endpoint policy"
        elif new:  # on update the endpoint is fixed: pausing it must not lock the policy
            try:
                endpoint = get_endpoint(session, org_id, values["endpoint_id"])
            except NotFound:
                problems["endpoint_id"] = "must be an active endpoint of your organization"
            else:
                if not endpoint.active:
                    problems["endpoint_id"] = "must be an active endpoint of your organization"
    elif target == Target.ORG_SECRET:
        if values["endpoint_id"] is not None:
            problems["endpoint_id"] = "must be omitted for an org_secret policy"
        if strategy != Strategy.ROTATE:
            problems["strategy"] = "an org_secret policy rotates (it has a grace window)"
    elif target == Target.ORG_ENDPOINTS:
        if values["endpoint_id"] is not None:
            problems["endpoint_id"] = "must be omitted for an org_endpoints policy"
        if strategy != Strategy.SAFE_MIGRATE:
            problems["strategy"] = "an org_endpoints policy safe-migrates"
    elif target == Target.REMOTE_ENDPOINT:
        problems.update(_check_remote(session, org_id, values, new=new))
    if target != Target.REMOTE_ENDPOINT:
        for name in ("provider_id", "remote_endpoint_id"):
            if values.get(name) is not None:
                problems[name] = "only for a remote_endpoint policy"
    concurrency = values.get("max_concurrency")
    if concurrency is not None:
        if target != Target.ORG_ENDPOINTS:
            problems["max_concurrency"] = "only for an org_endpoints policy"
        elif (problem := check_concurrency(concurrency)) is not None:
            problems["max_concurrency"] = problem
    if handoff == Handoff.IN_BAND and strategy != Strategy.SAFE_MIGRATE:
        problems["handoff"] = "in_band needs strategy safe_migrate"
    next_run_at = values.get("next_run_at")
    if next_run_at is not None and (
        not isinstance(next_run_at, datetime) or next_run_at.tzinfo is None
    ):
        problems["next_run_at"] = "must be an RFC 3339 time with a UTC offset"
    return problems


def _check_remote(
    session: Session, org_id: uuid.UUID, values: dict[str, Any], *, new: bool
) -> dict[str, str]:
    problems: dict[str, str] = {}
    if values["endpoint_id"] is not None:
        problems["endpoint_id"] = "must be omitted for a remote_endpoint policy"
    if values["strategy"] != Strategy.SAFE_MIGRATE:
        problems["strategy"] = "a remote_endpoint policy safe-migrates"
    if values["handoff"] != Handoff.NONE:
        problems["handoff"] = "in-band handoff does not apply to remote endpoints"
    if values.get("provider_id") is None:
        problems["provider_id"] = "is required for a remote_endpoint policy"
    elif new:
        try:
            providers.get(session, org_id, values["provider_id"])
        except NotFound:
            problems["provider_id"] = "must be a provider of your organization"
    remote_id = values.get("remote_endpoint_id")
    if remote_id is None:
        problems["remote_endpoint_id"] = "is required for a remote_endpoint policy"
    elif not isinstance(remote_id, str) or not re.fullmatch(providers.REMOTE_ID_PATTERN, remote_id):
        problems["remote_endpoint_id"] = "must be an endpoint id of that provider"
    return problems


def create_policy(session: Session, org_id: uuid.UUID, **fields: Any) -> RotationPolicy:
    values: dict[str, Any] = {
        "endpoint_id": None,
        "strategy": Strategy.ROTATE
        if fields.get("target") == Target.ORG_SECRET
        else Strategy.SAFE_MIGRATE,
        "max_concurrency": None,
        "provider_id": None,
        "remote_endpoint_id": None,
        "paused": False,
        "handoff": Handoff.NONE,
        "next_run_at": None,
        **fields,
    }
    problems = _check(session, org_id, values)
    if problems:
        raise ValidationFailed(problems)
    now = clock.now()
    policy = RotationPolicy(
        id=new_id(),
        org_id=org_id,
        target=values["target"],
        endpoint_id=values["endpoint_id"],
        provider_id=values["provider_id"],
        remote_endpoint_id=values["remote_endpoint_id"],
        strategy=values["strategy"],
        interval_seconds=values["interval_seconds"],
        paused=bool(values["paused"]),
        handoff=values["handoff"],
        max_concurrency=values["max_concurrency"]
        if values["target"] != Target.ORG_ENDPOINTS
        else values["max_concurrency"] or CONCURRENCY_DEFAULT,
        next_run_at=values["next_run_at"] or now + timedelta(seconds=values["interval_seconds"]),
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(policy)
    except IntegrityError:
        raise Conflict("that target already has a rotation policy") from None
    return policy


def get_policy(session: Session, org_id: uuid.UUID, policy_id: uuid.UUID) -> RotationPolicy:
    policy = session.scalars(
        select(RotationPolicy).where(
            RotationPolicy.id == policy_id,
            RotationPolicy.org_id == org_id,
            RotationPolicy.deleted_at.is_(None),
        )
    ).one_or_none()
    if policy is None:
        raise NotFound()
    return policy


def list_policies(
    session: Session, org_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[RotationPolicy]:
    query = select(RotationPolicy).where(
        RotationPolicy.org_id == org_id, RotationPolicy.deleted_at.is_(None)
    )
    return paginate(
        session,
        query,
        created_at=RotationPolicy.created_at,
        id_column=RotationPolicy.id,
        limit=limit,
        cursor=cursor,
    )


def update_policy(
    session: Session, org_id: uuid.UUID, policy_id: uuid.UUID, changes: dict[str, Any]
) -> RotationPolicy:
    policy = get_policy(session, org_id, policy_id)
    unknown = {field: "cannot be changed" for field in changes if field not in UPDATABLE}
    if unknown:
        raise ValidationFailed(unknown)
    values = {
        "target": policy.target,
        "endpoint_id": policy.endpoint_id,
        "provider_id": policy.provider_id,
        "remote_endpoint_id": policy.remote_endpoint_id,
        "strategy": policy.strategy,
        "interval_seconds": policy.interval_seconds,
        "paused": policy.paused,
        "handoff": policy.handoff,
        **changes,
    }
    problems = _check(session, org_id, values, new=False)
    if "paused" in changes and not isinstance(changes["paused"], bool):
        problems["paused"] = "must be a boolean"
    if problems:
        raise ValidationFailed(problems)
    for field, value in changes.items():
        if value is not None or field != "next_run_at":
            setattr(policy, field, value)
    policy.updated_at = clock.now()
    return policy


def delete_policy(session: Session, org_id: uuid.UUID, policy_id: uuid.UUID) -> None:
    policy = get_policy(session, org_id, policy_id)
    policy.deleted_at = policy.updated_at = clock.now()


def end_policies_for_endpoint(session: Session, endpoint_id: uuid.UUID) -> None:
    """An endpoint deleted by its owner takes its policy with it."""
    now = clock.now()
    session.execute(
        update(RotationPolicy)
        .where(RotationPolicy.endpoint_id == endpoint_id, RotationPolicy.deleted_at.is_(None))
        .values(deleted_at=now, updated_at=now)
    )


def follow_migration(
    session: Session, old_endpoint_id: uuid.UUID, new_endpoint_id: uuid.UUID
) -> None:
    """After any safe migrate succeeds (manual or scheduled), the old endpoint's policy rotates
    the new endpoint next; called in the transaction that deletes the old endpoint.

    A new endpoint given a policy of its own while the migration ran keeps that one (one policy
    per endpoint), and the old endpoint's policy ends with its endpoint, as on a delete.
    """
    own = session.scalar(_live_policy_of(), {"endpoint_id": new_endpoint_id})
    if own is not None:
        end_policies_for_endpoint(session, old_endpoint_id)
        return
    params = {"old_id": old_endpoint_id, "new_id": new_endpoint_id, "now": clock.now()}
    session.execute(_move_policies(), params)


# A safe migrate's last step runs these; built once (docs/performance.md, "Safe-migrate
# benchmark").
@cache
def _live_policy_of() -> Select[uuid.UUID]:
    return select(RotationPolicy.id).where(
        RotationPolicy.endpoint_id == bindparam("endpoint_id"), RotationPolicy.deleted_at.is_(None)
    )


@cache
def _move_policies() -> Update:
    return (
        update(RotationPolicy)
        .where(
            RotationPolicy.endpoint_id == bindparam("old_id"), RotationPolicy.deleted_at.is_(None)
        )
        .values(endpoint_id=bindparam("new_id"), updated_at=bindparam("now"))
    )


def follow_remote_migration(session: Session, operation_id: uuid.UUID) -> None:
    """After a remote migrate succeeds, the policy of its old remote endpoint rotates the new
    one next (in the transaction that records the old one deleted)."""
    operation = session.get(operations.Operation, operation_id)
    if operation is None or operation.remote_new_id is None:  # pragma: no cover - succeeded
        return
    session.execute(
        update(RotationPolicy)
        .where(
            RotationPolicy.provider_id == operation.provider_id,
            RotationPolicy.remote_endpoint_id == operation.remote_source_id,
            RotationPolicy.deleted_at.is_(None),
        )
        .values(remote_endpoint_id=operation.remote_new_id, updated_at=clock.now())
    )


def end_policies_for_provider(session: Session, provider_id: uuid.UUID) -> None:
    """A deleted provider takes the policies of its remote endpoints with it."""
    now = clock.now()
    session.execute(
        update(RotationPolicy)
        .where(RotationPolicy.provider_id == provider_id, RotationPolicy.deleted_at.is_(None))
        .values(deleted_at=now, updated_at=now)
    )
