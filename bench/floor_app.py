"""The floor for ``bench/migrate_bench.py``: chains of four no-op tasks on Rotator's Celery app.

A chain is ``bench.floor.task1`` → ``task2`` → ``task3`` → ``task4``; each task enqueues the
next with ``apply_async`` (as one ``operation.advance`` enqueues the next), and the last one
appends ``[chain id, started, finished]`` (unix seconds) to a Redis list on the broker's own
Redis database, which the benchmark reads back.

The tasks are registered on the project's app (``workers.app.app``), so the broker, serializer,
acks, prefetch and event settings are exactly Rotator's. Load them into a Rotator worker with::

    rotator worker --pool prefork --concurrency 2 -I bench.floor_app

(the repository root on ``PYTHONPATH``), or run them alone with
``celery -A bench.floor_app worker``. Importing this module costs nothing else; it sends nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any

from workers.app import app

__all__ = ["DONE_KEY", "app", "floor_task1", "start_chain"]

DONE_KEY = "bench:floor:done"

_redis: Any = None


def _client() -> Any:
    """One Redis client per process, made lazily (after the prefork pool has forked)."""
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(str(app.conf.broker_url))
    return _redis


@app.task(name="bench.floor.task4")
def floor_task4(chain_id: str, started: float) -> None:
    _client().rpush(DONE_KEY, json.dumps([chain_id, started, time.time()]))


@app.task(name="bench.floor.task3")
def floor_task3(chain_id: str, started: float) -> None:
    floor_task4.apply_async(args=(chain_id, started))


@app.task(name="bench.floor.task2")
def floor_task2(chain_id: str, started: float) -> None:
    floor_task3.apply_async(args=(chain_id, started))


@app.task(name="bench.floor.task1")
def floor_task1(chain_id: str, started: float) -> None:
    floor_task2.apply_async(args=(chain_id, started))


def start_chain(chain_id: str, producer: Any = None) -> None:
    """Publish the first task of a chain (``started`` is now, as seen by the publisher)."""
    floor_task1.apply_async(args=(chain_id, time.time()), producer=producer)
