"""Prometheus metrics, in one place: what ``GET /metrics`` shows and where it comes from.

Two sources, merged at scrape time:

- **Read from the database when scraped**: the oldest unfinished operation, the org-secret
  sweeper's lag and beat's last tick (``DatabaseCollector``: three queries, each answered from
  an index over a bounded set of rows: the unfinished operations, one org secret, the
  heartbeats), and queue depth from Redis.
- **Counted and observed where things happen**: operations started (``models/operation.py``,
  once the starting transaction commits) and ended (``workers/operations.py``), delivery
  attempts by outcome and their latency (``workers/deliveries.py``), step durations. Counting
  there, rather than with ``GROUP BY`` over ``operations`` and ``delivery_attempts`` at every
  scrape, keeps a scrape's cost flat while those tables grow (docs/operating.md, "Metrics").
  With ``ROTATOR_METRICS_DIR`` set, every process writes them to files there
  (prometheus_client's multiprocess mode) and ``/metrics`` reads them all; unset, each process
  keeps them in memory and shows its own.

Observing never raises: a metrics problem must not fail a delivery or a step.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from functools import cache
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from rotator.settings import Settings

if TYPE_CHECKING:
    from redis import Redis

    from models.db import Database

log = logging.getLogger("rotator.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

STEP_DURATION = "rotator_operation_step_duration_seconds"
DELIVERY_LATENCY = "rotator_delivery_latency_seconds"
DELIVERY_ATTEMPTS = "rotator_delivery_attempts"  # exposed as rotator_delivery_attempts_total
_ATTEMPTS_HELP = "Delivery attempts made, by outcome (counted by the processes that make them)."
OPERATIONS_STARTED = "rotator_operations_started"
_STARTED_HELP = "Operations started, by kind (counted as each start commits)."
OPERATIONS_ENDED = "rotator_operations_ended"
_ENDED_HELP = "Operations that reached a final state, by kind and state."
# A step takes milliseconds (create an endpoint) to a day (wait for a receiver).
STEP_BUCKETS = (0.01, 0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86_400, math.inf)
# An attempt takes milliseconds up to the delivery timeout (at most 60 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf)

# kombu's Redis transport keeps a queue's prioritised messages under these suffixed keys.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


# --- histograms, observed in the workers ------------------------------------------------------


class _Recorders:
    """This process's histograms; ``multiprocess``: backed by files in the metrics directory."""

    def __init__(self, multiprocess: bool):
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry(auto_describe=True)
        self.step_duration = Histogram(
            STEP_DURATION,
            "Time from a safe-migrate or rotation step's start to its end (step rows).",
            ["kind", "step"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            DELIVERY_LATENCY,
            "Response time of each delivery attempt, by the attempt's outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.delivery_attempts = Counter(
            DELIVERY_ATTEMPTS, _ATTEMPTS_HELP, ["outcome"], registry=self.registry
        )
        self.operations_started = Counter(
            OPERATIONS_STARTED, _STARTED_HELP, ["kind"], registry=self.registry
        )
        self.operations_ended = Counter(
            OPERATIONS_ENDED, _ENDED_HELP, ["kind", "state"], registry=self.registry
        )


_recorders: _Recorders | None = None
_recorders_lock = threading.Lock()
_warned = False


def metrics_dir(settings: Settings) -> str:
    """Where the multiprocess files live; '' when each process keeps its own in memory."""
    return settings.metrics_dir


@cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())


def _process_id() -> str:
    """Unique among processes sharing the directory (containers reuse small pids); checked on
    every observation, so a forked pool process gets files of its own."""
    return f"{_host()}-{os.getpid()}"


def _recorders_for(settings: Settings) -> _Recorders:
    """The histograms, created on first use; the mode is fixed for the process from then on."""
    global _recorders
    with _recorders_lock:
        if _recorders is None:
            directory = metrics_dir(settings)
            if directory:
                os.makedirs(directory, exist_ok=True)
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
                # Chosen here rather than by the variable at import time: settings come later.
                values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]
                    process_identifier=_process_id
                )
            _recorders = _Recorders(multiprocess=bool(directory))
        return _recorders


def _observing_failed() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("could not record a metric; further failures are not logged", exc_info=True)


def observe_step(settings: Settings, kind: str, step: str, seconds: float) -> None:
    try:
        recorders = _recorders_for(settings)
        recorders.step_duration.labels(kind=kind, step=step).observe(max(0.0, seconds))
    except Exception:
        _observing_failed()


def observe_delivery(settings: Settings, outcome: str, seconds: float) -> None:
    try:
        recorders = _recorders_for(settings)
        recorders.delivery_latency.labels(outcome=outcome).observe(max(0.0, seconds))
        recorders.delivery_attempts.labels(outcome=outcome).inc()
    except Exception:
        _observing_failed()


def count_operation_started(settings: Settings, kind: str) -> None:
    try:
        _recorders_for(settings).operations_started.labels(kind=kind).inc()
    except Exception:
        _observing_failed()


def count_operation_ended(settings: Settings, kind: str, state: str) -> None:
    try:
        _recorders_for(settings).operations_ended.labels(kind=kind, state=state).inc()
    except Exception:
        _observing_failed()


# --- the database and the broker, read at scrape time -----------------------------------------


class DatabaseCollector(Collector):
    """Counts and ages derived from the tables (and queue depth from Redis) at scrape time."""

    def __init__(self, db: Database):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "rotator_metrics_source_up",
            "1 when /metrics could read this source (database, broker), 0 when it failed.",
            labels=["source"],
        )
        try:
            families = self._from_database()
        except Exception:
            log.warning("metrics: the database did not answer", exc_info=True)
            families = []
        up.add_metric(["database"], 1.0 if families else 0.0)
        yield from families
        if _is_redis(self.db):
            depth = self._queue_depth()
            up.add_metric(["broker"], 0.0 if depth is None else 1.0)
            if depth is not None:
                yield depth
        yield up

    def _from_database(self) -> list[Metric]:
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from models import circuit, clock, heartbeat
        from models.delivery import Delivery, DeliveryState, Outcome
        from models.operation import TERMINAL_STATES, Operation, OperationKind
        from models.org_secret import ExpiredBy, OrgSecret, SecretState
        from models.reads import READ_ONLY_OPTION

        # Reads only: on SQLite a scrape must not take the write lock (models.db._sqlite_begin).
        connection = self.db.engine.connect().execution_options(**{READ_ONLY_OPTION: True})
        with connection, Session(connection) as session:
            oldest = session.scalar(
                select(func.min(Operation.created_at)).where(Operation.finished_at.is_(None))
            )
            # The most recently due expired row (index on state, valid_until); a row expired by
            # a second rotation inside its window is not the sweeper's doing.
            lag_row = session.execute(
                select(OrgSecret.expired_at, OrgSecret.valid_until)
                .where(
                    OrgSecret.state == SecretState.EXPIRED,
                    OrgSecret.valid_until.is_not(None),
                    OrgSecret.expired_by != ExpiredBy.ROTATION,
                )
                .order_by(OrgSecret.valid_until.desc())
                .limit(1)
            ).first()
            last_tick = heartbeat.latest(session)
            circuits_open = circuit.open_count(session)
            # Only attempts being sent hold a lease: bounded by the data plane's slots.
            in_flight = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.leased_until > clock.now(),
                )
            )
        now = clock.now()

        # Every label shows, at 0 until a process counts one (the counts merge into these).
        kinds = sorted(str(kind) for kind in OperationKind)
        started_family = CounterMetricFamily(OPERATIONS_STARTED, _STARTED_HELP, labels=["kind"])
        ended_family = CounterMetricFamily(OPERATIONS_ENDED, _ENDED_HELP, labels=["kind", "state"])
        for kind in kinds:
            started_family.add_metric([kind], 0)
            for state in sorted(str(state) for state in TERMINAL_STATES):
                ended_family.add_metric([kind, state], 0)
        attempts_family = CounterMetricFamily(DELIVERY_ATTEMPTS, _ATTEMPTS_HELP, labels=["outcome"])
        for outcome in sorted(str(outcome) for outcome in Outcome):
            attempts_family.add_metric([outcome], 0)

        families: list[Metric] = [started_family, ended_family, attempts_family]
        families.append(
            GaugeMetricFamily(
                "rotator_deliveries_in_flight",
                "Delivery attempts being sent now (claimed, not yet recorded), every worker.",
                value=float(in_flight or 0),
            )
        )
        families.append(
            GaugeMetricFamily(
                "rotator_endpoint_circuits_open",
                "Endpoints whose receiver kept failing: their deliveries wait (no retry spent).",
                value=float(circuits_open),
            )
        )
        families.append(
            GaugeMetricFamily(
                "rotator_oldest_unfinished_operation_age_seconds",
                "Age of the oldest operation not in a final state (0 when none is).",
                value=0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
            )
        )
        if lag_row is not None and lag_row.expired_at is not None:
            families.append(
                GaugeMetricFamily(
                    "rotator_org_secret_expiry_lag_seconds",
                    "How long after valid_until the most recently due org secret was marked "
                    "expired (by the ETA task or the sweeper).",
                    value=(lag_row.expired_at - lag_row.valid_until).total_seconds(),
                )
            )
        families.append(
            GaugeMetricFamily(
                "rotator_beat_last_tick_age_seconds",
                "Seconds since a periodic tick last ran to completion (+Inf before the first).",
                value=math.inf
                if last_tick is None
                else max(0.0, (now - last_tick).total_seconds()),
            )
        )
        return families

    def _queue_depth(self) -> Metric | None:
        """LLEN of each Celery queue on Redis; None on another broker or when Redis fails."""
        if not _is_redis(self.db):
            return None
        family = GaugeMetricFamily(
            "rotator_queue_depth",
            "Messages waiting in the broker (Redis list length), by Celery queue.",
            labels=["queue"],
        )
        try:
            client = _redis(self.db.settings.broker_url)
            for queue in _queue_names():
                keys = [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS]
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.llen(key)
                family.add_metric([queue], float(sum(pipe.execute())))
        except Exception:
            log.warning("metrics: the broker did not answer", exc_info=True)
            return None
        return family


def _is_redis(db: Database) -> bool:
    return db.settings.broker_url.startswith(("redis://", "rediss://"))


@cache
def _redis(url: str) -> Redis:
    from redis import Redis

    return Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _queue_names() -> list[str]:
    from workers.app import app

    return sorted(str(name) for name in app.amqp.queues)


# --- the scrape -------------------------------------------------------------------------------


class _Merged(Collector):
    """Several sources as one: families of the same name are merged, equal samples summed."""

    def __init__(self, sources: Iterable[Collector]):
        self.sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for source in self.sources:
            for family in source.collect():
                seen = merged.get(family.name)
                if seen is None:
                    merged[family.name] = family
                    continue
                index = {
                    (s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(seen.samples)
                }
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key in index:
                        old = seen.samples[index[key]]
                        seen.samples[index[key]] = old._replace(value=old.value + sample.value)
                    else:
                        seen.samples.append(sample)
        yield from merged.values()


def sources(db: Database) -> list[Collector]:
    """What a scrape in this process reads: the database, the files, this process's memory."""
    found: list[Collector] = [DatabaseCollector(db)]
    directory = metrics_dir(db.settings)
    if directory and os.path.isdir(directory):
        found.append(MultiProcessCollector(None, path=directory))  # type: ignore[no-untyped-call]
    recorders = _recorders
    if recorders is not None and not recorders.multiprocess:
        found.append(recorders.registry)
    return found


def exposition(db: Database) -> bytes:
    """The text exposition format of every Rotator metric, as ``GET /metrics`` serves it."""
    return generate_latest(_Merged(sources(db)))
