"""Fixtures of the operation tests that drive ``workers.operations.advance`` by hand."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rotator.settings import Settings
from tests.factories import Tenant, make_tenant
from tests.receivers import ScriptedReceiver, scripted_receiver
from tests.support import overridden

# Short enough to reach by moving the clock, long enough that an advance right after a failed
# probe is early (more than 1 s ahead).
BACKOFF_INITIAL_S, BACKOFF_MAX_S = 2.0, 8.0


@pytest.fixture
def loopback(settings: Settings) -> Iterator[Settings]:
    """Loopback http:// receivers allowed, and the backoff above."""
    with overridden(
        settings,
        allow_insecure_urls=True,
        migrate_backoff_initial_seconds=BACKOFF_INITIAL_S,
        migrate_backoff_max_seconds=BACKOFF_MAX_S,
        delivery_timeout_seconds=3.0,
    ) as changed:
        yield changed


@pytest.fixture
def tenant(database) -> Tenant:
    return make_tenant(database)


@pytest.fixture
def accepting(loopback: Settings) -> Iterator[ScriptedReceiver]:
    with scripted_receiver(200) as receiver:
        yield receiver


@pytest.fixture
def refusing(loopback: Settings) -> Iterator[ScriptedReceiver]:
    with scripted_receiver(401) as receiver:
        yield receiver
