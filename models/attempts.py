"""One attempt of a delivery (docs/architecture.md, "Deliveries"): claimed in one transaction
(so a duplicate message does nothing), sent outside any transaction, recorded in another.

Claims and records are set-based: the deliveries of one message, or of one dispatcher claim,
share those two transactions and a handful of statements, written as Core statements built once
(docs/performance.md, "With the dispatcher"). The database decides what is due and in what
order (fair across organizations and endpoints, under their in-flight caps): a lost message
costs a reconciler tick, never a delivery. The tables are ``models/delivery.py``'s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import (
    Integer,
    Select,
    Table,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from models import circuit, clock, org_secret
from models.base import UTCDateTime
from models.circuit import EndpointCircuit
from models.db import settings_of
from models.delivery import (
    ATTEMPTS,
    DELIVERIES,
    EVENTS,
    Delivery,
    DeliveryAttempt,
    DeliveryKind,
    DeliveryState,
    Outcome,
)
from models.endpoint import WebhookEndpoint, decrypt_secret
from models.ids import new_id
from receiver.signing import (
    AMCORE_ORG_SIGNATURE_HEADER,
    AMCORE_SIGNATURE_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    signature_headers,
)

EXCERPT_CHARS = 2048
SIGNATURE_HEADERS = frozenset(
    name.lower()
    for name in (AMCORE_SIGNATURE_HEADER, AMCORE_ORG_SIGNATURE_HEADER, WEBHOOK_SIGNATURE_HEADER)
)
_ENDPOINTS = cast(Table, WebhookEndpoint.__table__)


@dataclass(frozen=True)
class AttemptPlan:
    """Everything one attempt sends, prepared inside the claiming transaction."""

    delivery_id: uuid.UUID
    org_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: str
    event_type: str
    kind: DeliveryKind
    attempt: int
    url: str
    body: bytes
    headers: dict[str, str]


class AttemptResult(Protocol):
    """What the transport reports about one attempt (``workers.http.SendResult``)."""

    @property
    def status(self) -> int | None: ...
    @property
    def elapsed_ms(self) -> int: ...
    @property
    def body_excerpt(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def retry_after_s(self) -> float | None: ...
    @property
    def ok(self) -> bool: ...


@dataclass(frozen=True)
class Recorded:
    attempt: DeliveryAttempt
    retry_in: float | None  # seconds until the next attempt, when one is scheduled


@dataclass(frozen=True, slots=True)
class LoggedAttempt:
    """What the log line and the latency metric of one recorded attempt need: the data
    plane's records build these instead of ORM ``DeliveryAttempt`` objects, which cost more
    CPU than the rest of a batch's record (docs/performance.md, "With the dispatcher")."""

    delivery_id: uuid.UUID
    attempt: int
    outcome: str
    response_status: int | None
    response_time_ms: int


def envelope_bytes(
    event_id: str,
    event_type: str,
    created_at: datetime,
    org_id: uuid.UUID,
    data: Any,
    api_version: str,
) -> bytes:
    """The delivery body (docs/receivers.md); identical across attempts of one delivery. From
    the event's columns: set-based reads load no Event objects."""
    return json.dumps(
        {
            "id": event_id,
            "type": event_type,
            "api_version": api_version,
            "created_at": clock.rfc3339(created_at),
            "org_id": str(org_id),
            "data": data,
        },
        separators=(",", ":"),
        sort_keys=False,
    ).encode()


def lease_end(session: Session, now: datetime) -> datetime:
    """How long a claimed attempt is left alone: its whole request (a total deadline, see
    workers/http.py) and its record, with room to spare. Past it, the attempt counts as lost
    and the delivery is due again."""
    return now + timedelta(seconds=2 * settings_of(session).delivery_timeout_seconds + 5)


def _endpoint_takes() -> Any:
    """The endpoint of the delivery being claimed still takes it: not deleted, and not paused
    (pausing stops deliveries, but a paused endpoint still exists: its test delivery is sent)."""
    endpoint = _ENDPOINTS.c
    return (
        select(endpoint.id)
        .where(
            endpoint.id == DELIVERIES.c.endpoint_id,
            endpoint.deleted_at.is_(None),
            or_(endpoint.active.is_(True), DELIVERIES.c.kind == DeliveryKind.TEST.value),
        )
        .exists()
    )


@dataclass(frozen=True)
class _ClaimStatements:
    claim: Any
    abandon: Any
    sources: Any
    claim_with_sources: Any  # PostgreSQL: ``claim`` and ``sources`` as one statement


@functools.cache
def _claim_statements() -> _ClaimStatements:
    """``claim_many``'s statements, built once: the data plane runs them for every batch, and
    building and hashing them each time cost more CPU than sending them. Core statements on
    the tables, run on the session's connection: the ORM's bulk-update and loading machinery
    cost more CPU per batch than the statements (docs/performance.md, "With the dispatcher")."""
    ids: BindParameter[uuid.UUID] = bindparam("ids", expanding=True)
    now = bindparam("now", type_=UTCDateTime())
    lease = bindparam("lease", type_=UTCDateTime())
    column = DELIVERIES.c
    endpoint = _ENDPOINTS.c
    event = EVENTS.c
    claim = (
        update(DELIVERIES)
        .where(
            column.id.in_(ids),
            column.state == DeliveryState.PENDING.value,
            or_(
                column.next_attempt_at.is_(None),
                column.next_attempt_at <= bindparam("due_by", type_=UTCDateTime()),
            ),
            _endpoint_takes(),
        )
        .values(
            attempts=column.attempts + 1,
            next_attempt_at=lease,
            leased_until=lease,
            updated_at=now,
        )
        .returning(
            column.id,
            column.org_id,
            column.endpoint_id,
            column.event_id,
            column.kind,
            column.attempts,
        )
    )
    # The claimed rows joined to what they send, in the claim's own statement (a data-modifying
    # CTE, which SQLite does not have): one round trip less per claim.
    claimed = claim.cte("claimed")
    # What each claimed attempt sends: its endpoint's and its event's columns.
    sent = (
        endpoint.url,
        endpoint.api_version,
        endpoint.secret_ciphertext,
        event.type,
        event.data,
        event.created_at,
    )
    claim_with_sources = (
        select(
            claimed.c.id,
            claimed.c.org_id,
            claimed.c.endpoint_id,
            claimed.c.event_id,
            claimed.c.kind,
            claimed.c.attempts,
            *sent,
        )
        .join(_ENDPOINTS, endpoint.id == claimed.c.endpoint_id)
        .join(EVENTS, event.id == claimed.c.event_id)
    )
    return _ClaimStatements(
        claim=claim,
        claim_with_sources=claim_with_sources,
        abandon=update(DELIVERIES)
        .where(
            column.id.in_(ids),
            column.state == DeliveryState.PENDING.value,
            ~_endpoint_takes(),
        )
        .values(
            state=DeliveryState.ABANDONED.value,
            next_attempt_at=None,
            leased_until=None,
            updated_at=now,
        ),
        # What each claimed attempt sends, endpoint and event together: one round trip.
        sources=select(column.id, *sent)
        .join(_ENDPOINTS, endpoint.id == column.endpoint_id)
        .join(EVENTS, event.id == column.event_id)
        .where(column.id.in_(ids)),
    )


def claim_many(
    session: Session,
    delivery_ids: Iterable[uuid.UUID],
    *,
    lost: set[uuid.UUID] | None = None,
) -> list[AttemptPlan]:
    """Claim the next attempt of every due delivery among ``delivery_ids``, set-based.

    One ``UPDATE … RETURNING`` takes the deliveries that are pending, due, and whose endpoint
    still takes them: it counts the attempt and pushes ``next_attempt_at`` a lease ahead in the
    same statement, so a duplicate message (or a concurrent worker) finds nothing to claim, and
    a worker that dies mid-send is retried by the reconciler once the lease is over. Pending
    deliveries whose endpoint is gone or paused are abandoned. The others (finished, or not due
    yet: a duplicate or early message) are left alone. The plans come back in id order.
    """
    ids = sorted(set(delivery_ids))
    if not ids:
        return []
    now = clock.now()
    lease = lease_end(session, now)
    # Claimed before and never recorded, lease over: that attempt's outcome went down with
    # its worker. It is logged as lost when the delivery is claimed again. (``claim_due``
    # already knows which of its choices those are.)
    if lost is None:
        lost = set(
            session.scalars(
                select(Delivery.id).where(
                    Delivery.id.in_(ids),
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.leased_until.is_not(None),
                    Delivery.leased_until <= now,
                )
            )
        )
    statements = _claim_statements()
    connection = session.connection()
    claiming = {"ids": ids, "due_by": now + timedelta(seconds=1), "lease": lease, "now": now}
    postgresql = connection.dialect.name == "postgresql"
    claimed = connection.execute(
        statements.claim_with_sources if postgresql else statements.claim, claiming
    ).all()
    if len(claimed) < len(ids):
        connection.execute(statements.abandon, {"ids": ids, "now": now})
    if not claimed:
        return []
    sources = (
        {row.id: row for row in claimed}
        if postgresql
        else {
            row.id: row
            for row in connection.execute(statements.sources, {"ids": [row.id for row in claimed]})
        }
    )
    org_keys = org_secret.signing_keys_of(session, {row.org_id for row in claimed})
    timestamp = int(now.timestamp())
    bodies: dict[tuple[str, str], bytes] = {}
    endpoint_keys: dict[uuid.UUID, bytes] = {}
    plans = []
    for row in sorted(claimed, key=lambda item: item.id):
        source = sources[row.id]
        body = bodies.get((row.event_id, source.api_version))
        if body is None:
            body = bodies[(row.event_id, source.api_version)] = envelope_bytes(
                row.event_id,
                source.type,
                source.created_at,
                row.org_id,
                source.data,
                source.api_version,
            )
        endpoint_key = endpoint_keys.get(row.endpoint_id)
        if endpoint_key is None:
            endpoint_key = endpoint_keys[row.endpoint_id] = decrypt_secret(
                session, row.endpoint_id, source.secret_ciphertext
            )
        headers = {
            "Content-Type": "application/json",
            **signature_headers(
                endpoint_key=endpoint_key,
                msg_id=row.event_id,
                timestamp=timestamp,
                body=body,
                org_keys=org_keys.get(row.org_id, []),
            ),
        }
        plans.append(
            AttemptPlan(
                delivery_id=row.id,
                org_id=row.org_id,
                endpoint_id=row.endpoint_id,
                event_id=row.event_id,
                event_type=source.type,
                kind=DeliveryKind(row.kind),
                attempt=row.attempts,
                url=source.url,
                body=body,
                headers=headers,
            )
        )
    lost_plans = [plan for plan in plans if plan.delivery_id in lost]
    if lost_plans:
        connection.execute(
            insert(ATTEMPTS),
            [
                _attempt_row(
                    plan,
                    attempt=plan.attempt - 1,
                    outcome=Outcome.RETRY,
                    status=None,
                    elapsed_ms=0,
                    excerpt="",
                    error=LOST_ATTEMPT,
                    headers={},
                    now=now,
                )
                for plan in lost_plans
            ],
        )
    return plans


LOST_ATTEMPT = "attempt lost: its worker stopped before recording an outcome"


def claim_due(session: Session, limit: int) -> list[AttemptPlan]:
    """Claim up to ``limit`` due event deliveries, fairly: the data plane's one way to take work.

    Fair means a backlog never queues anyone else behind it. Candidates are ranked first by
    how many requests their organization already has in flight (counting the ones taken in
    this claim), then the same within the organization by endpoint, then by due time: the
    first delivery of an organization with nothing in flight comes before the hundredth of one
    with a backlog. An endpoint never has more than ``endpoint_max_in_flight`` attempts in
    flight, an organization never more than ``org_max_in_flight``, across every worker. An
    endpoint whose circuit is open is skipped (its deliveries keep their retries); a half-open
    one gets one attempt at a time (models/circuit.py).

    On PostgreSQL the claim holds a transaction-level advisory lock, so two workers' claims
    never both count the same free capacity; SQLite writes one transaction at a time anyway.
    """
    if limit < 1:
        return []
    settings = settings_of(session)
    connection = session.connection()  # Core statements only: no ORM session machinery
    if connection.dialect.name == "postgresql":
        connection.execute(_LOCK_STATEMENT, {"key": _CLAIM_LOCK})
    chosen = connection.execute(
        _due_statement(),
        {
            "now": clock.now(),
            "endpoint_cap": settings.endpoint_max_in_flight,
            "org_cap": settings.org_max_in_flight,
            "limit": limit,
        },
    ).all()
    return claim_many(
        session, [row.id for row in chosen], lost={row.id for row in chosen if row.lost}
    )


# Serialises the data plane's claims on PostgreSQL (an arbitrary constant of Rotator's own).
_CLAIM_LOCK = 0x526F7461
_LOCK_STATEMENT = text("SELECT pg_advisory_xact_lock(:key)")


@functools.cache
def _due_statement() -> Select[tuple[uuid.UUID, bool]]:
    """``claim_due``'s ranking query, built once: the dispatcher runs it for every batch it
    claims, and building and hashing a statement this size each time costs more CPU than
    running it. Parameters: ``now``, ``endpoint_cap``, ``org_cap``, ``limit``."""
    now = bindparam("now", type_=UTCDateTime())
    in_flight = (Delivery.state == DeliveryState.PENDING, Delivery.leased_until > now)
    endpoint_busy = (
        select(Delivery.endpoint_id, func.count().label("n"))
        .where(*in_flight)
        .group_by(Delivery.endpoint_id)
        .subquery()
    )
    org_busy = (
        select(Delivery.org_id, func.count().label("n"))
        .where(*in_flight)
        .group_by(Delivery.org_id)
        .subquery()
    )
    endpoint_cap = case(
        (EndpointCircuit.open_until.is_not(None), 1),
        else_=bindparam("endpoint_cap", type_=Integer()),
    )
    due = (
        select(
            Delivery.id,
            Delivery.org_id,
            Delivery.next_attempt_at,
            Delivery.leased_until.is_not(None).label("lost"),
            (
                func.row_number().over(
                    partition_by=Delivery.endpoint_id,
                    order_by=(Delivery.next_attempt_at, Delivery.id),
                )
                + func.coalesce(endpoint_busy.c.n, 0)
            ).label("endpoint_slot"),
            endpoint_cap.label("endpoint_cap"),
        )
        .join(endpoint_busy, endpoint_busy.c.endpoint_id == Delivery.endpoint_id, isouter=True)
        .join(EndpointCircuit, EndpointCircuit.endpoint_id == Delivery.endpoint_id, isouter=True)
        .where(
            Delivery.state == DeliveryState.PENDING,
            Delivery.kind == DeliveryKind.EVENT,
            Delivery.next_attempt_at <= now,
            or_(EndpointCircuit.open_until.is_(None), EndpointCircuit.open_until <= now),
        )
        .subquery()
    )
    within_endpoint = (
        select(due.c.id, due.c.org_id, due.c.next_attempt_at, due.c.endpoint_slot, due.c.lost)
        .where(due.c.endpoint_slot <= due.c.endpoint_cap)
        .subquery()
    )
    ranked = (
        select(
            within_endpoint.c.id,
            within_endpoint.c.next_attempt_at,
            within_endpoint.c.lost,
            (
                func.row_number().over(
                    partition_by=within_endpoint.c.org_id,
                    order_by=(
                        within_endpoint.c.endpoint_slot,
                        within_endpoint.c.next_attempt_at,
                        within_endpoint.c.id,
                    ),
                )
                + func.coalesce(org_busy.c.n, 0)
            ).label("org_slot"),
        )
        .join(org_busy, org_busy.c.org_id == within_endpoint.c.org_id, isouter=True)
        .subquery()
    )
    return (
        select(ranked.c.id, ranked.c.lost)
        .where(ranked.c.org_slot <= bindparam("org_cap", type_=Integer()))
        .order_by(ranked.c.org_slot, ranked.c.next_attempt_at, ranked.c.id)
        .limit(bindparam("limit", type_=Integer()))
    )


def next_due_in(session: Session, *, longest: float) -> float:
    """Seconds until the next event delivery falls due (0 if one is due now), at most
    ``longest``: how long an idle dispatcher may sleep before it looks again."""
    earliest: datetime | None = session.connection().execute(_next_due_statement()).scalar()
    if earliest is None:
        return longest
    return max(0.0, min(longest, (earliest - clock.now()).total_seconds()))


@functools.cache
def _next_due_statement() -> Any:
    """``next_due_in``'s query, built once (an idle dispatcher runs it after every claim)."""
    column = DELIVERIES.c
    return select(func.min(column.next_attempt_at)).where(
        column.state == DeliveryState.PENDING.value, column.kind == DeliveryKind.EVENT.value
    )


def claim(session: Session, delivery_id: uuid.UUID) -> AttemptPlan | None:
    """Claim the next attempt of one due delivery (``claim_many`` of one), or None."""
    plans = claim_many(session, [delivery_id])
    return plans[0] if plans else None


def retry_delay(
    schedule: Sequence[float], attempt: int, retry_after_s: float | None, jitter: float
) -> float | None:
    """Seconds before the attempt after ``attempt`` (1-based), or None when the schedule is spent.

    ``Retry-After`` (on 429/503) is honoured within bounds: never sooner than the schedule's
    own step, never later than its longest.
    """
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * (1 + random.uniform(-jitter, jitter))  # noqa: S311
    if retry_after_s is not None:
        # A floor after jitter: never retry before the receiver asked (capped at the longest step).
        delay = max(delay, min(retry_after_s, max(schedule)))
    return delay


def recorded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as logged: signature values are redacted (they are derived from secrets)."""
    out = {}
    for name, value in headers.items():
        if name.lower() in SIGNATURE_HEADERS:
            out[name] = "[redacted]"
        else:
            out[name] = value
    return out


def record_many(
    session: Session, sent: Sequence[tuple[AttemptPlan, AttemptResult]]
) -> list[Recorded]:
    """Log the attempts and move each delivery on: succeeded, retry later, or dead.

    Set-based: one ``UPDATE`` for the successes, one per outcome for the failures (one per
    delivery for retries, each with its own jittered time), and one multi-row ``INSERT`` of the
    attempt rows. Only a delivery still pending moves; one abandoned meanwhile keeps its state,
    and its failed attempt is logged ``dead``. Returned in the order of ``sent``.
    """
    rows, retries = _record(session, sent)
    return [
        Recorded(attempt=DeliveryAttempt(**row), retry_in=retry_in)
        for row, retry_in in zip(rows, retries, strict=True)
    ]


def record_logged(
    session: Session, sent: Sequence[tuple[AttemptPlan, AttemptResult]]
) -> list[LoggedAttempt]:
    """``record_many`` for the data plane: the same records, returned as ``LoggedAttempt``."""
    rows, _ = _record(session, sent)
    return [
        LoggedAttempt(
            delivery_id=row["delivery_id"],
            attempt=row["attempt"],
            outcome=row["outcome"],
            response_status=row["response_status"],
            response_time_ms=row["response_time_ms"],
        )
        for row in rows
    ]


def _record(
    session: Session, sent: Sequence[tuple[AttemptPlan, AttemptResult]]
) -> tuple[list[dict[str, Any]], list[float | None]]:
    """``record_many``'s work: the attempt rows written, and each one's ``retry_in``."""
    if not sent:
        return [], []
    settings = settings_of(session)
    now = clock.now()
    if all(result.ok for _, result in sent):
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            return _record_successes(connection, sent, now), [None] * len(sent)
    succeeded = [plan.delivery_id for plan, result in sent if result.ok]
    outcomes: dict[uuid.UUID, tuple[Outcome, float | None]] = dict.fromkeys(
        succeeded, (Outcome.SUCCESS, None)
    )
    if succeeded:
        _move(session, succeeded, now, state=DeliveryState.SUCCEEDED)
    dead: list[uuid.UUID] = []
    waiting: list[uuid.UUID] = []  # probes: due whenever their operation says
    for plan, result in sent:
        if result.ok:
            continue
        retry_in: float | None = None
        if plan.kind == DeliveryKind.EVENT:
            retry_in = retry_delay(
                settings.delivery_retry_schedule,
                plan.attempt,
                result.retry_after_s,
                settings.delivery_retry_jitter,
            )
        if retry_in is not None:
            moved = _move(
                session, [plan.delivery_id], now, next_at=now + timedelta(seconds=retry_in)
            )
            outcomes[plan.delivery_id] = (
                (Outcome.RETRY, retry_in) if moved else (Outcome.DEAD, None)
            )
        elif plan.kind == DeliveryKind.PROBE:
            waiting.append(plan.delivery_id)
        else:
            dead.append(plan.delivery_id)
    if waiting:
        still = _move(session, waiting, now)
        for item in waiting:
            outcomes[item] = (Outcome.RETRY if item in still else Outcome.DEAD, None)
    if dead:
        _move(session, dead, now, state=DeliveryState.DEAD)
        for item in dead:
            outcomes[item] = (Outcome.DEAD, None)
    opened = circuit.note(
        session,
        [
            (
                plan.endpoint_id,
                result.ok,
                plan.kind == DeliveryKind.EVENT and circuit.unusable(result.status),
            )
            for plan, result in sent
        ],
    )
    rows = []
    for plan, result in sent:
        error = result.error
        until = opened.get(plan.endpoint_id)
        if until is not None:  # the log says why the endpoint's deliveries pause
            error = f"{error or 'no usable answer'}; circuit open until {clock.rfc3339(until)}"
        rows.append(
            _attempt_row(
                plan,
                attempt=plan.attempt,
                outcome=outcomes[plan.delivery_id][0],
                status=result.status,
                elapsed_ms=result.elapsed_ms,
                excerpt=result.body_excerpt,
                error=error,
                headers=recorded_headers(plan.headers),
                now=now,
            )
        )
    session.connection().execute(insert(ATTEMPTS), rows)
    return rows, [outcomes[plan.delivery_id][1] for plan, _ in sent]


# ``_record`` of a batch whose every attempt succeeded, on PostgreSQL: what the general path
# does in three statements (the deliveries' ``UPDATE``, ``circuit.note``'s ``DELETE`` of the
# circuits a success closes, the attempts' ``INSERT``), in one. They touch different tables and
# none depends on another's result: a success is logged ``success`` whether or not its delivery
# was still pending. One round trip instead of three, and one statement to execute instead of
# one per attempt row (docs/performance.md, "With the dispatcher").
_RECORD_SUCCESSES = text(
    """
    WITH attempt AS (
        SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS row (
            id uuid, org_id uuid, delivery_id uuid, endpoint_id uuid, event_id text,
            event_type text, url text, attempt integer, response_status integer,
            response_time_ms integer, request_body_sha256 text, request_body_bytes integer,
            response_body_excerpt text, request_headers json
        )
    ), moved AS (
        UPDATE deliveries
        SET state = 'succeeded', next_attempt_at = NULL, leased_until = NULL, updated_at = :now
        WHERE id = ANY(ARRAY(SELECT delivery_id FROM attempt)) AND state = 'pending'
    ), closed AS (
        DELETE FROM endpoint_circuits
        WHERE endpoint_id = ANY(ARRAY(SELECT endpoint_id FROM attempt))
    )
    INSERT INTO delivery_attempts (
        id, org_id, delivery_id, endpoint_id, event_id, event_type, url, attempt, outcome,
        response_status, response_time_ms, request_body_sha256, request_body_bytes,
        response_body_excerpt, request_headers, error, occurred_at
    )
    SELECT
        id, org_id, delivery_id, endpoint_id, event_id, event_type, url, attempt, 'success',
        response_status, response_time_ms, request_body_sha256, request_body_bytes,
        response_body_excerpt, request_headers, NULL, :now
    FROM attempt
    """
).bindparams(bindparam("now", type_=UTCDateTime()))

_UUID_COLUMNS = ("id", "org_id", "delivery_id", "endpoint_id")


def _record_successes(
    connection: Connection, sent: Sequence[tuple[AttemptPlan, AttemptResult]], now: datetime
) -> list[dict[str, Any]]:
    """The rows travel as one JSON document (``json_to_recordset``): dumping them as one
    array parameter per column cost more CPU than the rest of the record. The ids are matched
    as ``= ANY(ARRAY(…))``, evaluated once: with ``IN (SELECT …)`` PostgreSQL re-ran the
    function for every pending delivery."""
    rows = [
        _attempt_row(
            plan,
            attempt=plan.attempt,
            outcome=Outcome.SUCCESS,
            status=result.status,
            elapsed_ms=result.elapsed_ms,
            excerpt=result.body_excerpt,
            error=None,
            headers=recorded_headers(plan.headers),
            now=now,
        )
        for plan, result in sent
    ]
    document = [
        {
            **row,
            **{name: str(row[name]) for name in _UUID_COLUMNS},
            "outcome": None,
            "error": None,
            "occurred_at": None,
        }
        for row in rows
    ]
    connection.execute(_RECORD_SUCCESSES, {"rows": json.dumps(document), "now": now})
    return rows


def _attempt_row(
    plan: AttemptPlan,
    *,
    attempt: int,
    outcome: Outcome,
    status: int | None,
    elapsed_ms: int,
    excerpt: str,
    error: str | None,
    headers: dict[str, str],
    now: datetime,
) -> dict[str, Any]:
    """One ``delivery_attempts`` row (never a secret: ``headers`` are already redacted)."""
    return {
        "id": new_id(),
        "org_id": plan.org_id,
        "delivery_id": plan.delivery_id,
        "endpoint_id": plan.endpoint_id,
        "event_id": plan.event_id,
        "event_type": plan.event_type,
        "url": plan.url,
        "attempt": attempt,
        "outcome": outcome.value,
        "response_status": status,
        "response_time_ms": elapsed_ms,
        "request_body_sha256": hashlib.sha256(plan.body).hexdigest(),
        "request_body_bytes": len(plan.body),
        "response_body_excerpt": excerpt[:EXCERPT_CHARS],
        "request_headers": headers,
        "error": error[:500] if error else None,
        "occurred_at": now,
    }


def _move(
    session: Session,
    delivery_ids: Sequence[uuid.UUID],
    now: datetime,
    *,
    state: DeliveryState = DeliveryState.PENDING,
    next_at: datetime | None = None,
) -> set[uuid.UUID]:
    """Set the state and next attempt of those deliveries that are still pending; their ids."""
    moved = session.connection().execute(
        _move_statement(),
        {"ids": list(delivery_ids), "state": state.value, "next_at": next_at, "now": now},
    )
    return set(moved.scalars())


@functools.cache
def _move_statement() -> Any:
    """``_move``'s statement, built once (it runs for every batch recorded); Core, on the
    session's connection, like the claim's."""
    column = DELIVERIES.c
    return (
        update(DELIVERIES)
        .where(
            column.id.in_(bindparam("ids", expanding=True)),
            column.state == DeliveryState.PENDING.value,
        )
        .values(
            state=bindparam("state", type_=column.state.type),
            next_attempt_at=bindparam("next_at", type_=UTCDateTime()),
            leased_until=None,
            updated_at=bindparam("now", type_=UTCDateTime()),
        )
        .returning(column.id)
    )


def record(session: Session, plan: AttemptPlan, result: AttemptResult) -> Recorded:
    """Log one attempt (``record_many`` of one)."""
    return record_many(session, [(plan, result)])[0]
