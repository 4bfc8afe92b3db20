"""Celery workers: deliveries, safe-migrate steps, org-secret expiry.

``celery -A workers worker`` finds ``app`` here.
"""

from workers.app import app

__all__ = ["app"]
