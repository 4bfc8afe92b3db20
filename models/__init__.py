"""The truth: tables, sessions and the domain rules that change them.

Importing this package registers every table on ``Base.metadata`` (Alembic and
``create_schema`` rely on that).
"""

from models.base import Base
from models.endpoint import WebhookEndpoint
from models.org import ApiKey, Organization

__all__ = ["ApiKey", "Base", "Organization", "WebhookEndpoint"]
