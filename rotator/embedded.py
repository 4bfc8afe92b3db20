"""``rotator dev``: the API, a Celery worker, the delivery dispatcher and beat in one process.

The broker is Celery's in-memory transport, which only works inside one process: that is the
point of this mode. The worker runs a thread pool in a background thread and consumes both
queues; deliveries are sent by the data plane's dispatcher (its own threads, as in a delivery
worker), so a delivery backlog never holds up an operation step here either. Beat runs as a
thread: the whole service is one command with nothing else to start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from celery.beat import EmbeddedService
from celery.worker import WorkController
from celery.worker import state as worker_state

from rotator.settings import Settings

log = logging.getLogger("rotator.dev")


class _Worker(WorkController):
    """A worker whose readiness can be awaited from another thread."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def on_consumer_ready(self, consumer: object) -> None:
        self.ready.set()


@contextmanager
def background_services(settings: Settings, *, concurrency: int = 4) -> Iterator[None]:
    """Run a worker and beat in this process until the block exits."""
    from models.db import get_database
    from schedules.beat import beat_schedule
    from workers import dispatcher
    from workers.app import app

    app.loader.import_default_modules()
    app.conf.beat_schedule = beat_schedule(settings)
    worker = _Worker(
        app=app,
        pool="threads",
        concurrency=concurrency,
        hostname="rotator-dev@localhost",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel=settings.log_level,
    )
    worker_thread = threading.Thread(target=worker.start, name="celery-worker", daemon=True)
    worker_thread.start()
    if not worker.ready.wait(timeout=30):
        raise RuntimeError("embedded Celery worker did not start")
    dispatcher.running(get_database())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    beat = EmbeddedService(
        app, thread=True, schedule_filename=str(settings.data_dir / "celerybeat-schedule")
    )
    beat.start()  # type: ignore[union-attr]  # thread=True always gives the threaded service
    log.info("embedded worker and beat running on %s", settings.broker_url)
    try:
        yield
    finally:
        beat.stop()
        dispatcher.stop_running()
        worker.stop(in_sighandler=False)
        worker_thread.join(timeout=10)
        # Celery keeps "shutting down" in module state; clear it so a later worker can start.
        worker_state.should_terminate = None
