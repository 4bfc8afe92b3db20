"""A Rotator worker with benchmark-only changes to ``operation.advance`` (prototype, bench only).

Usage (what ``bench/migrate_bench.py --worker-module bench.migrate_tuned --tuned ...`` runs)::

    .venv/bin/python -m bench.migrate_tuned --tuned inline,merged,noping,joined \\
        --pool prefork --concurrency 2 ...celery worker options...

It is the project's Celery app, settings and tasks; only the ``operation.advance`` task is
replaced (same name, same message, same domain functions from ``models/``), with any of:

* ``inline``: when a step asks to advance again at once (``Advance.again_in == 0``), run the
  next step in the same task instead of publishing a new message (up to ``MAX_INLINE_STEPS``;
  then a message, as before). Each step still commits on its own, so a worker that dies between
  two steps loses nothing: the message is acknowledged late and comes back, and every step is
  idempotent. Countdowns (waiting for a receiver) still go through the broker.
* ``merged``: the probe step in two transactions instead of four: ``begin_advance`` and the
  probe's ``claim`` in one, then the HTTP request (outside any transaction, as before), then the
  probe's ``record`` and ``finish_probe`` in one. An in-band handoff keeps the project's path.
* ``noping``: the engine's ``pool_pre_ping`` off (one ``;`` round trip fewer per session).
* ``joined``: ``_lock_for_advance`` loads the steps in the same ``SELECT ... FOR UPDATE OF
  operations`` (a join) instead of a second ``SELECT`` (``lazy="selectin"``).
* ``noevents``: Celery task events off (affects the floor's tasks in the same worker as well).

Nothing here changes the project; it only shows what such changes would be worth.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models.db as models_db  # noqa: E402 - after the path fix above
import workers.operations as project_operations  # noqa: E402 - registers the original task
from models import delivery as deliveries  # noqa: E402
from models import operation as operations  # noqa: E402
from models.db import Database, get_database  # noqa: E402
from rotator import logs  # noqa: E402
from rotator.settings import get_settings  # noqa: E402
from workers.app import app  # noqa: E402
from workers.deliveries import _report, attempt, sender_for  # noqa: E402
from workers.enqueue import send_after_commit  # noqa: E402
from workers.names import TaskName  # noqa: E402

MAX_INLINE_STEPS = 8
OPTIONS = frozenset({"inline", "merged", "noping", "joined", "noevents"})

_inline = False
_merged = False

_report_step = project_operations._report


def _schedule(session: Any, operation_id: uuid.UUID, step: operations.Advance) -> None:
    """Publish the next advance after commit, unless it runs inline right away."""
    if step.again_in is None:
        return
    if _inline and step.again_in <= 0:
        return
    send_after_commit(session, TaskName.OPERATION_ADVANCE, operation_id, countdown=step.again_in)


def advance_once(db: Database, operation_id: uuid.UUID) -> operations.Advance:
    """``workers.operations.advance``, optionally with the probe in two transactions; returns
    what the last transaction said to do next."""
    with logs.bound(operation_id=operation_id):
        plan = None
        with db.session() as session:
            step = operations.begin_advance(session, operation_id)
            if _merged and step.probe_delivery_id is not None and step.deliver_first is None:
                plan = deliveries.claim(session, step.probe_delivery_id)
            _schedule(session, operation_id, step)
        _report_step(db, step, "probe_sent" if step.probe_delivery_id is not None else None)
        if step.probe_delivery_id is None:
            return step
        recorded = None
        if plan is not None:
            result = sender_for(db).post(plan.url, plan.body, plan.headers)
            with db.session() as session:
                recorded = deliveries.record(session, plan, result)
                after = operations.finish_probe(session, operation_id)
                _schedule(session, operation_id, after)
            _report(db, recorded.attempt)
        else:
            if step.deliver_first is not None:
                attempt(db, step.deliver_first)
            attempt(db, step.probe_delivery_id)
            with db.session() as session:
                after = operations.finish_probe(session, operation_id)
                _schedule(session, operation_id, after)
        _report_step(db, after, "waiting" if after.again_in is not None else None)
        return after


def advance(db: Database, operation_id: uuid.UUID) -> None:
    for _ in range(MAX_INLINE_STEPS):
        step = advance_once(db, operation_id)
        if not (_inline and step.again_in is not None and step.again_in <= 0):
            return
    # Budget spent with more to do at once: hand the rest to the broker, as the project does.
    from workers.enqueue import send

    send(TaskName.OPERATION_ADVANCE, operation_id)


def _lock_joined(session: Any, operation_id: uuid.UUID) -> operations.Operation | None:
    from sqlalchemy import select
    from sqlalchemy.orm import joinedload

    result = session.scalars(
        select(operations.Operation)
        .options(joinedload(operations.Operation.steps))
        .where(operations.Operation.id == operation_id)
        .with_for_update(of=operations.Operation)
    )
    found: operations.Operation | None = result.unique().one_or_none()
    return found


def _without_pre_ping() -> None:
    make_engine = models_db.make_engine

    def patched(settings: Any) -> Any:
        engine = make_engine(settings)
        engine.pool._pre_ping = False  # bench-only: the project sets pool_pre_ping=True
        return engine

    models_db.make_engine = patched


def install(options: frozenset[str]) -> None:
    global _inline, _merged
    unknown = options - OPTIONS
    if unknown:
        raise SystemExit(f"unknown --tuned option(s): {', '.join(sorted(unknown))}")
    _inline = "inline" in options
    _merged = "merged" in options
    if "noping" in options:
        _without_pre_ping()
    if "joined" in options:
        operations._lock_for_advance = _lock_joined
    if "noevents" in options:
        app.conf.worker_send_task_events = False
        app.conf.task_send_sent_event = False
    app.finalize(auto=True)
    app.tasks.unregister(str(TaskName.OPERATION_ADVANCE))

    @app.task(name=TaskName.OPERATION_ADVANCE)
    def advance_operation(operation_id: str) -> None:
        advance(get_database(), uuid.UUID(operation_id))


def main(argv: Sequence[str] | None = None) -> int:
    from rotator.logs import configure_logging

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tuned", default="", help="comma separated: " + ",".join(sorted(OPTIONS)))
    ours, celery_args = parser.parse_known_args(argv)
    install(frozenset(part for part in ours.tuned.split(",") if part))
    configure_logging(get_settings())
    models_db.get_database()  # refuse to start on bad settings, as `rotator worker` does
    app.worker_main(["worker", *celery_args])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
