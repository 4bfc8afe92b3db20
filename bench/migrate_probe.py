"""Per-task counters for ``bench/migrate_bench.py --probe``: what one advance costs, by step.

Loaded into the worker with ``-I bench.migrate_probe`` (the benchmark does it). It changes no
behaviour; it only watches, in every worker process:

* SQL statements (by first keyword), their summed execution time, transactions committed and
  rolled back, pool checkouts (a ping only for a connection idle longer than
  ``ROTATOR_DB_PING_AFTER_IDLE_SECONDS``), through SQLAlchemy's
  engine and pool events;
* task messages published after commit (``workers.enqueue.publish``, wrapped) and the time spent
  publishing them;
* HTTP deliveries sent (``workers.http.Sender.post``, wrapped) and their time;
* the wall and CPU time of the task, and the lines the task logged on ``rotator.operations``,
  which name the step an ``operation.advance`` ran (``create_endpoint``,
  ``send_test_delivery``, ``delete_old_endpoint``).

After each task it adds its figures to a Redis hash ``bench:probe:<label>`` on the broker's
database (one pipelined round trip: a probe run is slower than a plain one; use it for the
counts, not for the timings of the benchmark). The label is the task name, plus the first step
an ``operation.advance`` logged.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from celery.signals import task_postrun, task_prerun
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

import workers.enqueue as enqueue
import workers.http as http
from workers.app import app

PROBE_PREFIX = "bench:probe:"

_current: defaultdict[str, float] | None = None
_labels: list[str] = []
_started: dict[str, float] = {}
_redis: Any = None


def _count(name: str, value: float = 1.0) -> None:
    if _current is not None:
        _current[name] += value


@event.listens_for(Engine, "before_cursor_execute")
def _before_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    conn.info["bench_probe_t"] = time.perf_counter()
    keyword = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
    if keyword == "SELECT" and "FOR UPDATE" in statement:
        keyword = "SELECT_FOR_UPDATE"
    _count("sql")
    _count(f"sql_{keyword.lower()}")


@event.listens_for(Engine, "after_cursor_execute")
def _after_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    started = conn.info.pop("bench_probe_t", None)
    if started is not None:
        _count("sql_s", time.perf_counter() - started)


@event.listens_for(Engine, "commit")
def _commit(conn: Any) -> None:
    _count("commit")


@event.listens_for(Engine, "rollback")
def _rollback(conn: Any) -> None:
    _count("rollback")


@event.listens_for(Pool, "checkout")
def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    _count("checkout")


_publish = enqueue.publish


def _counting_publish(messages: Any) -> None:
    started = time.perf_counter()
    try:
        _publish(messages)
    finally:
        _count("publish_calls")
        _count("messages", len(messages))
        _count("publish_s", time.perf_counter() - started)


enqueue.publish = _counting_publish  # the after-commit closure looks ``publish`` up at call time

_post = http.Sender.post


def _counting_post(self: http.Sender, *args: Any, **kwargs: Any) -> Any:
    started = time.perf_counter()
    try:
        return _post(self, *args, **kwargs)
    finally:
        _count("http")
        _count("http_s", time.perf_counter() - started)


http.Sender.post = _counting_post  # type: ignore[method-assign]


class _StepNames(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        step = getattr(record, "step", None)
        if step and _current is not None:
            _labels.append(str(step))


logging.getLogger("rotator.operations").addHandler(_StepNames(level=logging.DEBUG))


@task_prerun.connect
def _prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
    global _current
    _current = defaultdict(float)
    _labels.clear()
    _started["wall"] = time.perf_counter()
    _started["cpu"] = time.process_time()


@task_postrun.connect
def _postrun(task_id: str = "", task: Any = None, **_: Any) -> None:
    global _current, _redis
    current, _current = _current, None
    if current is None:
        return
    current["tasks"] = 1
    current["wall_s"] = time.perf_counter() - _started["wall"]
    current["cpu_s"] = time.process_time() - _started["cpu"]
    name = getattr(task, "name", "?")
    label = f"{name}:{_labels[0]}" if _labels else name
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(str(app.conf.broker_url))
    pipe = _redis.pipeline(transaction=False)
    for key, value in current.items():
        pipe.hincrbyfloat(PROBE_PREFIX + label, key, float(value))
    pipe.execute()
