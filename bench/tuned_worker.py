"""A Rotator worker with benchmark-only changes, to measure what they would buy (prototype).

Usage (what ``delivery_bench.py --worker-module bench.tuned_worker`` runs)::

    .venv/bin/python -m bench.tuned_worker [--no-task-events] [--no-pre-ping] \\
        [--batch-threads N] --pool prefork --concurrency 2 ...celery worker options...

It is the project's own Celery app and tasks (``workers.app``), with:

* ``--no-task-events``: ``worker_send_task_events`` and ``task_send_sent_event`` off (Flower
  loses its live view; each task then costs three fewer Redis publishes in the worker).
* ``--no-pre-ping``: the engine's ``pool_pre_ping`` off (one ``SELECT 1`` round trip fewer per
  session; psycopg still notices dead connections, at the cost of one failed task).
* ``bench.delivery.send_bulk(ids)``: the same batch with a set-based claim (one ``UPDATE ..
  RETURNING`` joined to the endpoints, one ``SELECT`` of the event, the org keys once) and a
  set-based record of the successes (one ``UPDATE``, one multi-row ``INSERT``); failures still
  go through the project's ``record``. ``--publish domain-bulk`` publishes it.
* ``bench.noop``: counts itself in Redis and does nothing else (Celery's cost per task).
* one more task, ``bench.delivery.send_batch(ids)``: the deliveries of one published event in
  one message. It calls the project's own ``claim``/``record`` for every id, but in one
  transaction for all claims and one for all records, and sends in between (sequentially, or
  on ``--batch-threads`` threads). ``delivery_bench.py --publish domain-batch`` publishes it.

Nothing here changes the project; it only shows what such changes would be worth.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models.db as models_db  # noqa: E402 - after the path fix above
import workers.deliveries as workers_deliveries  # noqa: E402
from models import delivery as deliveries  # noqa: E402
from workers.app import app  # noqa: E402
from workers.deliveries import MAX_COUNTDOWN_S, sender_for  # noqa: E402
from workers.enqueue import send_after_commit  # noqa: E402
from workers.names import TaskName  # noqa: E402

BATCH_TASK = "bench.delivery.send_batch"
BULK_TASK = "bench.delivery.send_bulk"
NOOP_TASK = "bench.noop"
NOOP_COUNTER = "bench:noop:done"

_threads = 1
_executor: ThreadPoolExecutor | None = None
_counter: Any = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:  # created lazily: after the prefork pool has forked
        _executor = ThreadPoolExecutor(max_workers=_threads)
    return _executor


def send_batch_ids(db: models_db.Database, delivery_ids: Sequence[str]) -> int:
    """Claim every due delivery of ``delivery_ids``, send them, record them; the count sent."""
    ids = sorted(uuid.UUID(value) for value in delivery_ids)  # one lock order for every batch
    with db.session() as session:
        plans = [plan for item in ids if (plan := deliveries.claim(session, item)) is not None]
    if not plans:
        return 0
    sender = sender_for(db)
    if _threads > 1 and len(plans) > 1:
        results = list(_pool().map(lambda p: sender.post(p.url, p.body, p.headers), plans))
    else:
        results = [sender.post(plan.url, plan.body, plan.headers) for plan in plans]
    with db.session() as session:
        for plan, result in zip(plans, results, strict=True):
            recorded = deliveries.record(session, plan, result)
            if recorded.retry_in is not None and recorded.retry_in <= MAX_COUNTDOWN_S:
                send_after_commit(
                    session, TaskName.DELIVERY_SEND, plan.delivery_id, countdown=recorded.retry_in
                )
    return len(plans)


@app.task(name=BATCH_TASK)
def send_batch(delivery_ids: list[str]) -> None:
    send_batch_ids(models_db.get_database(), delivery_ids)


@app.task(name=NOOP_TASK)
def noop() -> None:
    """Does nothing but count itself (in the broker's Redis): Celery's own cost per task."""
    global _counter
    if _counter is None:
        import redis

        _counter = redis.Redis.from_url(app.conf.broker_url)
    _counter.incr(NOOP_COUNTER)


def _claim_bulk(session: Any, ids: Sequence[uuid.UUID]) -> list[deliveries.AttemptPlan]:
    """``claim`` for many deliveries in a few set-based statements instead of ~5 per delivery.

    Same rules: only pending deliveries that are due and whose endpoint is live are claimed;
    the attempt counter and the lease move in the same statement that selects them. The
    others are left alone (not due, finished) or abandoned (endpoint gone), as ``claim`` does.
    """
    from datetime import timedelta

    from sqlalchemy import select, text

    from models import clock, org_secret
    from models.db import box_of, settings_of
    from models.endpoint import _secret_context
    from receiver.signing import signature_headers

    now = clock.now()
    settings = settings_of(session)
    # The same lease as ``claim`` (the margin existed in some versions of models/delivery.py).
    margin = getattr(deliveries, "LEASE_MARGIN", timedelta(0))
    lease = now + timedelta(seconds=settings.delivery_timeout_seconds) + margin
    rows = session.execute(
        text(
            "UPDATE deliveries AS d SET attempts = d.attempts + 1, next_attempt_at = :lease, "
            "updated_at = :now FROM webhook_endpoints AS e "
            "WHERE d.id = ANY(:ids) AND d.state = 'pending' "
            "AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= :due) "
            "AND e.id = d.endpoint_id AND e.deleted_at IS NULL AND e.active "
            "RETURNING d.id, d.org_id, d.endpoint_id, d.event_id, d.attempts, e.url, "
            "e.api_version, e.secret_ciphertext"
        ),
        {"lease": lease, "now": now, "due": now + timedelta(seconds=1), "ids": list(ids)},
    ).all()
    if len(rows) < len(ids):  # endpoint gone: abandoned, as claim() does
        session.execute(
            text(
                "UPDATE deliveries AS d SET state = 'abandoned', updated_at = :now "
                "FROM webhook_endpoints AS e WHERE d.id = ANY(:ids) AND d.state = 'pending' "
                "AND e.id = d.endpoint_id AND (e.deleted_at IS NOT NULL OR NOT e.active)"
            ),
            {"now": now, "ids": list(ids)},
        )
    if not rows:
        return []
    events = {
        event.id: event
        for event in session.scalars(
            select(deliveries.Event).where(deliveries.Event.id.in_({row.event_id for row in rows}))
        )
    }
    org_keys = {org: org_secret.signing_keys(session, org) for org in {row.org_id for row in rows}}
    box = box_of(session)
    timestamp = int(now.timestamp())
    bodies: dict[tuple[str, str], bytes] = {}
    plans = []
    for row in rows:
        event = events[row.event_id]
        body = bodies.get((event.id, row.api_version))
        if body is None:
            body = bodies[(event.id, row.api_version)] = deliveries.envelope_bytes(
                event, row.api_version
            )
        key = box.decrypt(row.secret_ciphertext, context=_secret_context(row.endpoint_id))
        headers = {
            "Content-Type": "application/json",
            **signature_headers(
                endpoint_key=key,
                msg_id=event.id,
                timestamp=timestamp,
                body=body,
                org_keys=org_keys[row.org_id],
            ),
        }
        plans.append(
            deliveries.AttemptPlan(
                delivery_id=row.id,
                org_id=row.org_id,
                endpoint_id=row.endpoint_id,
                event_id=event.id,
                event_type=event.type,
                attempt=row.attempts,
                url=row.url,
                body=body,
                headers=headers,
            )
        )
    return plans


def _record_bulk(session: Any, plans: Sequence[Any], results: Sequence[Any]) -> None:
    """``record`` for many: successes in two statements; anything else through ``record``."""
    import hashlib

    from sqlalchemy import insert, text

    from models import clock
    from models.ids import new_id

    now = clock.now()
    ok = [(plan, result) for plan, result in zip(plans, results, strict=True) if result.ok]
    for plan, result in zip(plans, results, strict=True):
        if not result.ok:  # retries and dead letters: rare, keep the project's own path
            recorded = deliveries.record(session, plan, result)
            if recorded.retry_in is not None and recorded.retry_in <= MAX_COUNTDOWN_S:
                send_after_commit(
                    session, TaskName.DELIVERY_SEND, plan.delivery_id, countdown=recorded.retry_in
                )
            report = getattr(workers_deliveries, "_report", None)
            if report is not None:
                report(models_db.get_database(), recorded.attempt)
    if not ok:
        return
    session.execute(
        text(
            "UPDATE deliveries SET state = 'succeeded', next_attempt_at = NULL, updated_at = :now "
            "WHERE id = ANY(:ids) AND state = 'pending'"
        ),
        {"now": now, "ids": [plan.delivery_id for plan, _ in ok]},
    )
    session.execute(
        insert(deliveries.DeliveryAttempt),
        [
            {
                "id": new_id(),
                "org_id": plan.org_id,
                "delivery_id": plan.delivery_id,
                "endpoint_id": plan.endpoint_id,
                "event_id": plan.event_id,
                "event_type": plan.event_type,
                "url": plan.url,
                "attempt": plan.attempt,
                "outcome": deliveries.Outcome.SUCCESS.value,
                "response_status": result.status,
                "response_time_ms": result.elapsed_ms,
                "request_body_sha256": hashlib.sha256(plan.body).hexdigest(),
                "request_body_bytes": len(plan.body),
                "response_body_excerpt": result.body_excerpt[: deliveries.EXCERPT_CHARS],
                "request_headers": deliveries.recorded_headers(plan.headers),
                "error": None,
                "occurred_at": now,
            }
            for plan, result in ok
        ],
    )


def _report_all(db: models_db.Database, plans: Sequence[Any], results: Sequence[Any]) -> None:
    """The per-attempt log line and metric of ``workers.deliveries.attempt`` (in the versions
    that have them) for the successes, so the prototype pays for the same observability.
    Failures went through ``deliveries.record``; ``_record_bulk`` reports them itself."""
    from types import SimpleNamespace

    import workers.deliveries as project

    report = getattr(project, "_report", None)
    if report is None:
        return
    for plan, result in zip(plans, results, strict=True):
        if result.ok:
            row = SimpleNamespace(
                delivery_id=plan.delivery_id,
                attempt=plan.attempt,
                outcome=deliveries.Outcome.SUCCESS.value,
                response_status=result.status,
                response_time_ms=result.elapsed_ms,
            )
            report(db, row)


def send_bulk_ids(db: models_db.Database, delivery_ids: Sequence[str]) -> int:
    """As ``send_batch_ids``, with set-based claim and record (two short transactions)."""
    ids = sorted(uuid.UUID(value) for value in delivery_ids)
    with db.session() as session:
        plans = _claim_bulk(session, ids)
    if not plans:
        return 0
    sender = sender_for(db)
    if _threads > 1 and len(plans) > 1:
        results = list(_pool().map(lambda p: sender.post(p.url, p.body, p.headers), plans))
    else:
        results = [sender.post(plan.url, plan.body, plan.headers) for plan in plans]
    with db.session() as session:
        _record_bulk(session, plans, results)
    _report_all(db, plans, results)
    return len(plans)


@app.task(name=BULK_TASK)
def send_bulk(delivery_ids: list[str]) -> None:
    send_bulk_ids(models_db.get_database(), delivery_ids)


def _without_pre_ping() -> None:
    make_engine = models_db.make_engine

    def patched(settings: Any) -> Any:
        engine = make_engine(settings)
        engine.pool._pre_ping = False  # bench-only: the project sets pool_pre_ping=True
        return engine

    models_db.make_engine = patched


def main(argv: Sequence[str] | None = None) -> int:
    global _threads
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--no-task-events", action="store_true")
    parser.add_argument("--no-pre-ping", action="store_true")
    parser.add_argument("--batch-threads", type=int, default=1)
    ours, celery_args = parser.parse_known_args(argv)
    _threads = max(1, ours.batch_threads)
    if ours.no_pre_ping:
        _without_pre_ping()
    if ours.no_task_events:
        app.conf.worker_send_task_events = False
        app.conf.task_send_sent_event = False
    models_db.get_database()  # refuse to start on bad settings, as `rotator worker` does
    app.worker_main(["worker", *celery_args])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
