"""Publishing task messages after the commit that made their work visible (invariant 2).

Messages queued in one transaction are published together, on one producer connection, once
that transaction commits; a rollback drops them. Arguments are ids only: a message never
carries a secret.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from models.db import after_commit, transaction_state
from workers.app import app
from workers.names import TaskName

_OUTBOX = "outbox"


@dataclass(frozen=True)
class Message:
    name: TaskName
    args: tuple[str, ...]
    countdown: float | None = None


def message(name: TaskName, *ids: uuid.UUID | str, countdown: float | None = None) -> Message:
    return Message(name, tuple(str(value) for value in ids), countdown)


def publish(messages: Sequence[Message]) -> None:
    """Publish now, on one producer connection."""
    if not messages:
        return
    with app.producer_or_acquire() as producer:
        for item in messages:
            app.send_task(
                str(item.name),
                args=list(item.args),
                countdown=None if item.countdown is None else max(0.0, item.countdown),
                producer=producer,
            )


def send(name: TaskName, *ids: uuid.UUID | str, countdown: float | None = None) -> None:
    publish([message(name, *ids, countdown=countdown)])


def send_after_commit(
    session: Session, name: TaskName, *ids: uuid.UUID | str, countdown: float | None = None
) -> None:
    """Publish once ``session`` commits; nothing is sent if it rolls back."""
    state = transaction_state(session)
    outbox: list[Message] | None = state.get(_OUTBOX)
    if outbox is None:
        outbox = state[_OUTBOX] = []
        pending = outbox
        after_commit(session, lambda: publish(pending))
    outbox.append(message(name, *ids, countdown=countdown))
