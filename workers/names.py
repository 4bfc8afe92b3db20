"""Every task, by name: tasks are published by name, never by import."""

from __future__ import annotations

from enum import StrEnum


class TaskName(StrEnum):
    DELIVERY_SEND = "delivery.send"
    DELIVERY_RECONCILE = "delivery.reconcile"
    OPERATION_ADVANCE = "operation.advance"
    OPERATION_RECONCILE = "operation.reconcile"
    POLICY_TICK = "policy.tick"
    ORG_SECRET_EXPIRE = "org_secret.expire"  # noqa: S105 - a task name
    ORG_SECRET_SWEEP = "org_secret.sweep"  # noqa: S105 - a task name
    RETENTION_PRUNE = "retention.prune"
