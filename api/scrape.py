"""``GET /metrics``: what processes counted (rotator/metrics.py) merged with what is read from
the database and the broker at scrape time (docs/operating.md, "Metrics and alerts")."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from functools import cache

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis import Redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import circuit, clock, heartbeat
from models.db import Database
from models.delivery import Delivery, DeliveryState, Outcome
from models.operation import TERMINAL_STATES, Operation, OperationKind
from models.org_secret import ExpiredBy, OrgSecret, SecretState
from models.reads import READ_ONLY_OPTION
from rotator.metrics import (
    ATTEMPTS_HELP,
    DELIVERY_ATTEMPTS,
    ENDED_HELP,
    OPERATIONS_ENDED,
    OPERATIONS_STARTED,
    STARTED_HELP,
    local_registry,
    metrics_dir,
)
from workers.app import app

log = logging.getLogger("rotator.metrics")

# kombu's Redis transport keeps a queue's prioritised messages under these suffixed keys.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


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
        started_family = CounterMetricFamily(OPERATIONS_STARTED, STARTED_HELP, labels=["kind"])
        ended_family = CounterMetricFamily(OPERATIONS_ENDED, ENDED_HELP, labels=["kind", "state"])
        for kind in kinds:
            started_family.add_metric([kind], 0)
            for state in sorted(str(state) for state in TERMINAL_STATES):
                ended_family.add_metric([kind, state], 0)
        attempts_family = CounterMetricFamily(DELIVERY_ATTEMPTS, ATTEMPTS_HELP, labels=["outcome"])
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
    return Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _queue_names() -> list[str]:
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
    registry = local_registry()
    if registry is not None:
        found.append(registry)
    return found


def exposition(db: Database) -> bytes:
    """The text exposition format of every Rotator metric, as ``GET /metrics`` serves it."""
    return generate_latest(_Merged(sources(db)))
