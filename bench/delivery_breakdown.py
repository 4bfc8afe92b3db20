"""Where a delivery's CPU goes: each step of the worker's path timed alone, in CPU milliseconds.

Usage (from the repository root; PostgreSQL and Redis running)::

    .venv/bin/python bench/delivery_breakdown.py --deliveries 600

``delivery_bench.py`` measures the whole pipeline; on a shared 2-core machine its throughput
moves with everyone else's load. This measures what does not: CPU time per delivery of each
step, in this process (``time.process_time``) and in our PostgreSQL backends (``/proc``), one
step at a time, single-threaded, against the same loopback receiver:

* ``claim``, ``Sender.post``, ``record`` of one delivery per transaction (what
  ``workers.deliveries.attempt`` does for the test route and a safe migrate's probe);
* ``models.delivery.publish`` (one event, 20 deliveries, one transaction) per delivery, and the
  set-based ``claim_many``/``record_many`` of one event's deliveries per transaction, as a
  ``delivery.send`` message of the fan-out runs them (``workers.deliveries.send``);
* a plain ``httpx.Client.post`` of the same body and headers (the baseline's cost per request);
* ``workers.enqueue.publish``: one message per call vs 20 per call, with and without
  ``task_send_sent_event``;
* Celery's own cost per task: ``rotator worker`` (prefork:2, with ``bench/floor_app.py``'s
  ``bench.noop``) draining no-op tasks (worker CPU per task, parent and children).

Uses its own organization in the benchmark database and flushes the broker's Redis database
(default db 7) at start and end. Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402 - after the path fix above
    HOST,
    BenchError,
    Proc,
    cpu_snapshot,
    db_name,
    find_bin,
    flush_broker,
    free_port,
)
from bench.delivery_bench import (  # noqa: E402
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_URL,
    EVENT_TYPE,
    RESULTS_DIR,
    ReceiverClient,
    event_data,
    prepare_rotator,
)

# bench/floor_app.py (not imported here: importing it builds the Celery app from settings,
# which this script sets only once it has prepared the database)
NOOP_TASK = "bench.noop"
NOOP_COUNTER = "bench:noop:done"


@dataclass
class Step:
    name: str
    items: int
    own_cpu_ms: float  # this process, per item
    pg_cpu_ms: float  # our PostgreSQL backends, per item
    redis_cpu_ms: float
    wall_ms: float  # per item (moves with the machine's other load)

    @property
    def total_ms(self) -> float:
        return self.own_cpu_ms + self.pg_cpu_ms + self.redis_cpu_ms


@contextlib.contextmanager
def measure(steps: list[Step], name: str, items: int, database: str) -> Iterator[None]:
    before = cpu_snapshot({}, database)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    yield
    cpu1, wall1 = time.process_time(), time.perf_counter()
    after = cpu_snapshot({}, database)
    steps.append(
        Step(
            name=name,
            items=items,
            own_cpu_ms=round(1000.0 * (cpu1 - cpu0) / items, 3),
            pg_cpu_ms=round(1000.0 * (after["postgres"] - before["postgres"]) / items, 3),
            redis_cpu_ms=round(1000.0 * (after["redis"] - before["redis"]) / items, 3),
            wall_ms=round(1000.0 * (wall1 - wall0) / items, 3),
        )
    )
    show(steps[-1])


def show(step: Step) -> None:
    print(f"  {step.name:<58} {step.own_cpu_ms:7.3f} + pg {step.pg_cpu_ms:6.3f} ms CPU", flush=True)


def pending_deliveries(db: Any, org_id: uuid.UUID, events: int, data_bytes: int) -> list[Any]:
    from models import delivery as deliveries

    ids: list[Any] = []
    for index in range(events):
        with db.session() as session:
            _, created = deliveries.publish(
                session, org_id, EVENT_TYPE, event_data(data_bytes, index)
            )
            ids.extend(item.id for item in created)
    return ids


def claimed(plan: Any) -> Any:
    if plan is None:
        raise BenchError("a fresh pending delivery was not claimable")
    return plan


def per_item(step: Step, items: int) -> Step:
    """A step measured as one unit, restated per item."""
    scaled = Step(
        name=step.name,
        items=items,
        own_cpu_ms=round(step.own_cpu_ms / items, 3),
        pg_cpu_ms=round(step.pg_cpu_ms / items, 3),
        redis_cpu_ms=round(step.redis_cpu_ms / items, 3),
        wall_ms=round(step.wall_ms / items, 3),
    )
    return scaled


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def delivery_steps(args: argparse.Namespace, setup: Any, receiver_port: int) -> list[Step]:
    import httpx

    from models import delivery as deliveries
    from models.db import get_database
    from models.endpoint import create_endpoint
    from workers.sending import sender_for

    db = get_database()
    org_id = uuid.UUID(setup.org_id)
    database = db_name(args.database_url)
    for index in range(args.endpoints):
        with db.session() as session:
            create_endpoint(
                session,
                org_id,
                url=f"http://{HOST}:{receiver_port}/hook/{index}",
                events=[EVENT_TYPE],
            )
    events = max(1, args.deliveries // args.endpoints)
    sender = sender_for(db)
    steps: list[Step] = []

    def per_delivery(label: str, session_factory: Callable[[], Any]) -> None:
        ids = pending_deliveries(db, org_id, events, args.data_bytes)
        n = len(ids)
        plans: list[deliveries.AttemptPlan] = []
        with measure(steps, f"claim, 1 tx per delivery{label}", n, database):
            for item in ids:
                with session_factory() as session:
                    plans.append(claimed(deliveries.claim(session, item)))
        with measure(steps, f"Sender.post{label}", n, database):
            results = [sender.post(p.url, p.body, p.headers) for p in plans]
        with measure(steps, f"record, 1 tx per delivery{label}", n, database):
            for plan, result in zip(plans, results, strict=True):
                with session_factory() as session:
                    deliveries.record(session, plan, result)

    # 1. As workers.deliveries.attempt does it.
    per_delivery("", db.session)

    # 2. One event's deliveries per transaction, set-based, as workers.deliveries.send does.
    with measure(steps, "publish: models.delivery.publish, 1 event per tx", 1, database):
        ids = pending_deliveries(db, org_id, events, args.data_bytes)
    steps[-1] = per_item(steps[-1], len(ids))
    n = len(ids)
    plans: list[deliveries.AttemptPlan] = []
    with measure(steps, f"claim_many, {args.endpoints} per tx", n, database):
        for batch in chunks(ids, args.endpoints):
            with db.session() as session:
                plans.extend(deliveries.claim_many(session, batch))
    if len(plans) != len(ids):
        raise BenchError(f"claim_many took {len(plans)} of {len(ids)} deliveries")
    results = [sender.post(p.url, p.body, p.headers) for p in plans]
    with measure(steps, f"record_many, {args.endpoints} per tx", n, database):
        for batch in chunks(list(zip(plans, results, strict=True)), args.endpoints):
            with db.session() as session:
                deliveries.record_many(session, batch)

    # 3. The plain loop's cost per request: same bodies and headers, httpx.Client.post.
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        client.get(f"http://{HOST}:{receiver_port}/healthz")
        with measure(steps, "plain httpx.Client.post (baseline)", n, database):
            for plan in plans:
                client.post(plan.url, content=plan.body, headers=plan.headers).read()
    return steps


def publish_steps(args: argparse.Namespace) -> list[Step]:
    from workers.app import app
    from workers.enqueue import message, publish

    database = db_name(args.database_url)
    steps: list[Step] = []
    n = args.deliveries
    for sent_event in (True, False):
        app.conf.task_send_sent_event = sent_event
        label = "sent event on" if sent_event else "sent event off"
        with measure(steps, f"enqueue.publish, 1 message per call ({label})", n, database):
            for _ in range(n):
                publish([message(NOOP_TASK)])  # type: ignore[arg-type]
        with measure(steps, f"enqueue.publish, {args.endpoints} per call ({label})", n, database):
            for _ in range(n // args.endpoints):
                publish([message(NOOP_TASK)] * args.endpoints)  # type: ignore[arg-type]
    app.conf.task_send_sent_event = True
    flush_broker(args.broker_url)
    return steps


def celery_steps(args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> list[Step]:
    """Worker CPU per no-op task (parent + children), task events on as shipped."""
    import redis

    from workers.app import app
    from workers.enqueue import message, publish

    database = db_name(args.database_url)
    counter = redis.Redis.from_url(args.broker_url)
    steps: list[Step] = []
    app.conf.task_send_sent_event = False
    worker = Proc(
        "noop-worker",
        [find_bin("rotator"), "worker", "-I", "bench.floor_app", "--pool", "prefork"]
        + ["--concurrency", "2", "--loglevel", "WARNING"]
        + "--without-heartbeat --without-gossip --without-mingle -O fair".split(),
        env,
        log_dir,
    )
    try:
        worker.start()
        assert worker.pid is not None
        counter.delete(NOOP_COUNTER)
        publish([message(NOOP_TASK)] * 20)  # type: ignore[arg-type]
        wait_counter(counter, 20, worker)
        counter.delete(NOOP_COUNTER)
        n = args.noop_tasks
        # The worker's process group alone is measured; publishing runs in this process.
        before = cpu_snapshot({"worker": worker.pid}, database)
        wall0 = time.perf_counter()
        for batch in chunks(range(n), 100):
            publish([message(NOOP_TASK)] * len(batch))  # type: ignore[arg-type]
        wait_counter(counter, n, worker)
        wall = time.perf_counter() - wall0
        after = cpu_snapshot({"worker": worker.pid}, database)
    finally:
        worker.stop()
    steps.append(
        Step(
            name="celery prefork:2 no-op task, worker CPU (task events on, as shipped)",
            items=n,
            own_cpu_ms=round(1000.0 * (after["worker"] - before["worker"]) / n, 3),
            pg_cpu_ms=0.0,
            redis_cpu_ms=0.0,  # shared with this process's publishing: not attributed
            wall_ms=round(1000.0 * wall / n, 3),
        )
    )
    show(steps[-1])
    app.conf.task_send_sent_event = True
    counter.delete(NOOP_COUNTER)
    return steps


def wait_counter(counter: Any, expected: int, worker: Proc, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while int(counter.get(NOOP_COUNTER) or 0) < expected:
        if not worker.alive():
            raise BenchError(f"worker exited:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"no-op tasks not drained in {timeout}s")
        time.sleep(0.05)


def print_steps(steps: Sequence[Step]) -> None:
    header = (
        f"{'step':<62} {'items':>6} {'own ms':>7} {'pg ms':>6} {'redis ms':>8} {'total ms':>8} "
        f"{'wall ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for s in steps:
        print(
            f"{s.name:<62} {s.items:>6d} {s.own_cpu_ms:>7.3f} {s.pg_cpu_ms:>6.3f} "
            f"{s.redis_cpu_ms:>8.3f} {s.total_ms:>8.3f} {s.wall_ms:>8.3f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--deliveries", type=int, default=600)
    parser.add_argument("--endpoints", type=int, default=20)
    parser.add_argument("--data-bytes", type=int, default=400)
    parser.add_argument("--noop-tasks", type=int, default=2000)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="rotator-breakdown-") as tmp:
        log_dir = Path(tmp)
        receiver: Proc | None = None
        try:
            setup = prepare_rotator(find_bin("rotator"), args.database_url, args.broker_url)
            os.environ.update(setup.env)  # the project reads its settings once, at first use
            port = free_port()
            receiver = Proc(
                "receiver",
                [sys.executable, str(ROOT / "bench" / "receiver_server.py"), "--port", str(port)],
                dict(os.environ),
                log_dir,
            )
            receiver.start()
            receiver.wait_http(port, "/healthz")
            ReceiverClient(port).reset()
            print("per-step CPU (this process + our PostgreSQL backends + Redis):", flush=True)
            steps += delivery_steps(args, setup, port)
            steps += publish_steps(args)
            steps += celery_steps(args, {**setup.env, "PYTHONPATH": str(ROOT)}, log_dir)
        except BenchError as exc:
            print(f"delivery_breakdown: {exc}", file=sys.stderr)
            return 1
        finally:
            if receiver is not None:
                receiver.stop()
            with contextlib.suppress(Exception):
                flush_broker(args.broker_url)
    print()
    print_steps(steps)
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"breakdown-{stamp}.json"
        payload = {
            "stamp": stamp,
            "args": vars(args),
            "steps": [{**asdict(s), "total_ms": round(s.total_ms, 3)} for s in steps],
        }
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
