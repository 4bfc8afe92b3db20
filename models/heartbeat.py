"""Heartbeats: when each periodic tick last ran to completion (the operators' "is beat alive?").

One row per tick name. A tick writes its row in the same transaction as its work, so a tick that
fails leaves its heartbeat old. ``/metrics`` turns the newest one into
``rotator_beat_last_tick_age_seconds``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models.base import Base, UTCDateTime


class Heartbeat(Base):
    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


def record(session: Session, name: str) -> None:
    """Upsert ``name``'s heartbeat to now (one statement: two beats racing are harmless)."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(Heartbeat).values(name=name, at=clock.now())
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[Heartbeat.name], set_={"at": statement.excluded.at}
        )
    )


def latest(session: Session) -> datetime | None:
    """When the most recent tick of any kind ran; None before the first one."""
    return session.scalar(select(func.max(Heartbeat.at)))
