"""The truth: tables, sessions and the domain rules that change them.

Importing this package registers every table on ``Base.metadata`` (Alembic and
``create_schema`` rely on that).
"""

from models.base import Base
from models.circuit import EndpointCircuit
from models.delivery import Delivery, DeliveryAttempt, Event
from models.endpoint import WebhookEndpoint
from models.heartbeat import Heartbeat
from models.idempotency import IdempotencyKey
from models.operation import Operation, OperationStep
from models.org import ApiKey, Organization
from models.org_secret import OrgSecret
from models.policy import RotationPolicy
from models.provider import Provider
from models.retention import INDEXES as RETENTION_INDEXES

__all__ = [
    "ApiKey",
    "Base",
    "Delivery",
    "EndpointCircuit",
    "DeliveryAttempt",
    "Event",
    "Heartbeat",
    "IdempotencyKey",
    "Operation",
    "OperationStep",
    "OrgSecret",
    "Organization",
    "Provider",
    "RETENTION_INDEXES",
    "RotationPolicy",
    "WebhookEndpoint",
]
