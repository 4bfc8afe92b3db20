"""What several test modules share and that is not a fixture: which pass runs, settings changed
for a block, settings handed to a child process. Fixtures live in ``conftest.py``; tests import
helpers from here (and from ``factories``, ``receivers``, ``processes``, ``live``), never from
``conftest``.

Importing this module imports nothing of the project, so ``conftest`` can use it before it sets
the environment the project reads its settings from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rotator.settings import Settings

BACKEND = os.environ.get("ROTATOR_TEST_BACKEND", "embedded")
if BACKEND not in ("embedded", "real"):
    raise RuntimeError(f"ROTATOR_TEST_BACKEND must be 'embedded' or 'real', not {BACKEND!r}")

# What end-to-end tests run with: loopback receivers, a retry schedule of moments, short beats.
E2E_SETTINGS: dict[str, Any] = {
    "allow_insecure_urls": True,
    "delivery_retry_schedule": [0.3, 0.3, 0.3],
    "delivery_retry_jitter": 0.0,
    "delivery_timeout_seconds": 3.0,
    "beat_period_scale": 0.1,
}


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ROTATOR_ environment a child process reads them from."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"ROTATOR_{name.upper()}"] = str(value)
    return env


@contextmanager
def overridden(settings: Settings, **values: Any) -> Iterator[Settings]:
    """Change the live settings object (every session reads it) for the block's duration."""
    saved = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield settings
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)


@contextmanager
def published_tasks() -> Iterator[list[tuple[str, list[str], Any]]]:
    """Every task message published in the block: (task name, args, eta or None)."""
    from celery.signals import before_task_publish

    seen: list[tuple[str, list[str], Any]] = []

    def capture(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append((sender, list(body[0]), (headers or {}).get("eta")))

    before_task_publish.connect(capture, weak=False)
    try:
        yield seen
    finally:
        before_task_publish.disconnect(capture)
