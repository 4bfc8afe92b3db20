"""A Rotator worker with benchmark-only settings (prototype, bench only).

Usage (what ``bench/migrate_bench.py --worker-module bench.migrate_tuned --tuned ...`` runs)::

    .venv/bin/python -m bench.migrate_tuned --tuned noping \\
        --pool prefork --concurrency 2 ...celery worker options...

It is the project's Celery app, settings and tasks, unchanged, with any of:

* ``noping``: the engine's ``pool_pre_ping`` off (one ``;`` round trip fewer per session).
* ``noevents``: Celery task events off (affects the floor's tasks in the same worker as well).

Nothing here changes the project; it only shows what such settings would be worth.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models.db as models_db  # noqa: E402 - after the path fix above
import workers.operations  # noqa: E402, F401 - registers the project's tasks
from rotator.settings import get_settings  # noqa: E402
from workers.app import app  # noqa: E402

OPTIONS = frozenset({"noping", "noevents"})


def _without_pre_ping() -> None:
    make_engine = models_db.make_engine

    def patched(settings: Any) -> Any:
        engine = make_engine(settings)
        engine.pool._pre_ping = False  # bench-only: the project sets pool_pre_ping=True
        return engine

    models_db.make_engine = patched


def install(options: frozenset[str]) -> None:
    unknown = options - OPTIONS
    if unknown:
        raise SystemExit(f"unknown --tuned option(s): {', '.join(sorted(unknown))}")
    if "noping" in options:
        _without_pre_ping()
    if "noevents" in options:
        app.conf.worker_send_task_events = False
        app.conf.task_send_sent_event = False


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
