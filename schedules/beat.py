"""The beat schedule, as one table of data.

Each entry names a task (by ``TaskName``), how often it runs, and when an unconsumed tick
expires: a tick that waited longer than its period is superseded by the next one anyway.
"""

from __future__ import annotations

from typing import Any

from rotator.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    del settings
    return {}
