"""Prometheus metrics: what ``GET /metrics`` shows and where it comes from. This module holds
the names and what processes count; ``api/scrape.py`` reads the rest and serves the whole.

Two sources, merged at scrape time:

- **Read from the database when scraped**: the oldest unfinished operation, the org-secret
  sweeper's lag and beat's last tick (``api.scrape.DatabaseCollector``: a few queries, each
  answered from an index over a bounded set of rows), and queue depth from Redis.
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
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from rotator.settings import Settings

log = logging.getLogger("rotator.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

STEP_DURATION = "rotator_operation_step_duration_seconds"
DELIVERY_LATENCY = "rotator_delivery_latency_seconds"
DELIVERY_ATTEMPTS = "rotator_delivery_attempts"  # exposed as rotator_delivery_attempts_total
ATTEMPTS_HELP = "Delivery attempts made, by outcome (counted by the processes that make them)."
OPERATIONS_STARTED = "rotator_operations_started"
STARTED_HELP = "Operations started, by kind (counted as each start commits)."
OPERATIONS_ENDED = "rotator_operations_ended"
ENDED_HELP = "Operations that reached a final state, by kind and state."
# A step takes milliseconds (create an endpoint) to a day (wait for a receiver).
STEP_BUCKETS = (0.01, 0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86_400, math.inf)
# An attempt takes milliseconds up to the delivery timeout (at most 60 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf)


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
            DELIVERY_ATTEMPTS, ATTEMPTS_HELP, ["outcome"], registry=self.registry
        )
        self.operations_started = Counter(
            OPERATIONS_STARTED, STARTED_HELP, ["kind"], registry=self.registry
        )
        self.operations_ended = Counter(
            OPERATIONS_ENDED, ENDED_HELP, ["kind", "state"], registry=self.registry
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


def local_registry() -> CollectorRegistry | None:
    """This process's histograms and counters when they are kept in memory (no metrics
    directory), for its own scrape; None when they are in files or nothing was recorded."""
    recorders = _recorders
    if recorders is not None and not recorders.multiprocess:
        return recorders.registry
    return None
