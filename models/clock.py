"""Wall-clock time for every domain rule, in one place.

Validity windows are decided when read (docs/architecture.md, invariant 5), so every rule
asks this module for "now"; tests that move time do it here instead of sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_offset = timedelta(0)


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC) + _offset


def travel(delta: timedelta) -> None:
    """Shift this process's clock (tests only: models time passing without sleeping)."""
    global _offset
    _offset += delta


def reset() -> None:
    global _offset
    _offset = timedelta(0)


def rfc3339(value: datetime) -> str:
    """RFC 3339 UTC with a ``Z`` suffix and millisecond precision, as the contract shows."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
