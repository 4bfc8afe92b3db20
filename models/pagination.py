"""Keyset pagination on (created_at, id), newest first, with opaque cursors."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from models.errors import ValidationFailed

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


# A cursor is "<microseconds since the epoch>-<id as 32 hex digits>": opaque to clients, and
# every string of this shape is one the server can take (the published schema states it, so
# a generator that follows the schema never makes a cursor the server refuses). 16 digits reach
# the year 2286.
CURSOR_PATTERN = "^(?:[0-9]{1,16}-[0-9a-f]{32})?$"
_CURSOR = re.compile(r"([0-9]{1,16})-([0-9a-f]{32})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    return f"{(created_at - _EPOCH) // _MICROSECOND}-{row_id.hex}"


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise ValidationFailed({"cursor": "invalid cursor"})
    return _EPOCH + int(match[1]) * _MICROSECOND, uuid.UUID(hex=match[2])


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
