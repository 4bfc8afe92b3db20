"""The beat schedule, as one table of data.

Each entry names a task (by ``TaskName``), how often it runs, and when an unconsumed tick
expires: a tick that waited longer than its period is superseded by the next one anyway.
"""

from __future__ import annotations

from typing import Any

from rotator.settings import Settings
from workers.names import TaskName

# (task, period in seconds)
TICKS: tuple[tuple[TaskName, float], ...] = (
    (TaskName.DELIVERY_RECONCILE, 15.0),
    (TaskName.OPERATION_RECONCILE, 15.0),
    (TaskName.POLICY_TICK, 15.0),
    (TaskName.ORG_SECRET_SWEEP, 30.0),
    # Each run deletes for at most about 20 s (models.retention.TICK_BUDGET_S).
    (TaskName.RETENTION_PRUNE, 300.0),
)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    scale = settings.beat_period_scale
    return {
        str(name): {
            "task": str(name),
            "schedule": period * scale,
            "options": {"expires": period * scale},
        }
        for name, period in TICKS
    }
