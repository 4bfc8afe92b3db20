"""Celery workers: deliveries, safe-migrate steps, org-secret expiry.

``celery -A workers worker`` finds ``app`` here. It is loaded on first access, so importing a
leaf module such as ``workers.names`` does not build the Celery app.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from rotator.settings import ConfigurationError

        try:
            from workers.app import app
        except ConfigurationError as exc:
            # ``celery -A workers ...``: Celery would print a traceback; one line per problem is
            # what ``rotator worker`` prints too (docs/operating.md, "Configuration errors").
            import sys

            for line in exc.lines():
                print(f"rotator: configuration error: {line}", file=sys.stderr)
            raise SystemExit(2) from None
        return app
    raise AttributeError(name)
