"""The Celery application, configured from ``Settings`` and nowhere else.

The values below are the ones docs/architecture.md ("Celery settings that matter") lists; a
test asserts them. Messages carry ids only; the database is the truth.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from rotator import logs
from rotator.settings import Settings, get_settings
from workers.names import TaskName

# Task modules the worker imports at start-up (by name, so importing this module stays cheap).
TASK_MODULES = [
    "workers.deliveries",
    "workers.operations",
    "workers.org_secrets",
    "schedules.ticks",
]

# Two planes, two queues (docs/operating.md, "Isolation"): operation steps, org-secret expiry
# and the beat ticks on one, the data plane's wake-ups on the other, each with workers of its
# own (``rotator worker -Q control`` / ``-Q deliveries``); a worker without -Q takes both.
CONTROL_QUEUE = "control"
DELIVERY_QUEUE = "deliveries"
TASK_ROUTES = {str(TaskName.DELIVERY_SEND): {"queue": DELIVERY_QUEUE}}

# A task killed by its hard limit is redelivered; keep every limit far below the time Redis
# waits before redelivering an unacknowledged message.
SOFT_TIME_LIMIT_S = 60
HARD_TIME_LIMIT_S = 90
VISIBILITY_TIMEOUT_S = 3600


def _transport_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    if settings.broker_url.startswith("memory://"):
        # The in-memory transport polls; its 1 s default would add a second to every step.
        options["polling_interval"] = 0.05
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": _transport_options(settings),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": SOFT_TIME_LIMIT_S,
        "task_time_limit": HARD_TIME_LIMIT_S,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "include": TASK_MODULES,
        "task_queues": (Queue(CONTROL_QUEUE), Queue(DELIVERY_QUEUE)),
        "task_default_queue": CONTROL_QUEUE,
        "task_routes": TASK_ROUTES,
        # The beat schedule is installed by schedules.ticks, one of TASK_MODULES: beat imports
        # them before it builds its scheduler (docs/architecture.md, "Celery settings that
        # matter").
    }


def create_celery(settings: Settings) -> Celery:
    app = Celery("rotator", set_as_current=True)
    app.conf.update(celery_config(settings))
    return app


app = create_celery(get_settings())
# Celery leaves logging to rotator.logs (JSON lines); each task binds its task_id for them.
logs.connect_celery()
