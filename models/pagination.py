"""Keyset pagination on (created_at, id), newest first, with opaque cursors."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from models.errors import ValidationFailed

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        value = datetime.fromisoformat(created), uuid.UUID(row_id)
        if value[0].tzinfo is not None:
            value[0].astimezone(UTC)  # raises OverflowError out of range
    except (binascii.Error, ValueError, TypeError, AttributeError, OverflowError):
        raise ValidationFailed({"cursor": "invalid cursor"}) from None
    if value[0].tzinfo is None:
        raise ValidationFailed({"cursor": "invalid cursor"})
    return value


def paginate(
    session: Session,
    query: Select[Any],
    *,
    created_at: InstrumentedAttribute[datetime],
    id_column: InstrumentedAttribute[uuid.UUID],
    limit: int,
    cursor: str | None,
) -> Page[Any]:
    if cursor:
        after_created, after_id = decode_cursor(cursor)
        query = query.where(
            or_(created_at < after_created, and_(created_at == after_created, id_column < after_id))
        )
    rows = list(
        session.scalars(query.order_by(created_at.desc(), id_column.desc()).limit(limit + 1))
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(getattr(last, created_at.key), getattr(last, id_column.key))
    return Page(items=rows, next_cursor=next_cursor)
