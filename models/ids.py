"""Identifier sources: UUIDv7 for rows, ULIDs for requests, ``evt_`` ids for events."""

from __future__ import annotations

import uuid

import uuid6
from ulid import ULID


def new_id() -> uuid.UUID:
    """A UUIDv7: time-ordered, so new rows land at the end of the primary-key index."""
    return uuid.UUID(bytes=uuid6.uuid7().bytes)


def new_request_id() -> str:
    return str(ULID())


def new_event_id() -> str:
    return f"evt_{new_id()}"
