"""Celery workers: deliveries, safe-migrate steps, org-secret expiry.

``celery -A workers worker`` finds ``app`` here. It is loaded on first access, so importing a
leaf module such as ``workers.names`` does not build the Celery app.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from workers.app import app

        return app
    raise AttributeError(name)
