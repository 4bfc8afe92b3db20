"""Every task and its queue, by name: tasks are published by name, never by import."""

from __future__ import annotations

from enum import StrEnum


class TaskName(StrEnum):
    pass
