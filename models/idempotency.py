"""``Idempotency-Key``: the same key and body return the first response again for 24 hours.

The first response is kept sealed (it may carry a secret shown once) and bound to the API key
that made it: only that API key gets it again. The same Idempotency-Key with a different body,
or from another API key of the organization, is refused (422).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ForeignKey, LargeBinary, String, UniqueConstraint, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models.base import Base, IdMixin, UTCDateTime
from models.db import box_of
from models.errors import ValidationFailed
from models.ids import new_id

MAX_KEY_LENGTH = 255
# Printable ASCII, no space at either end (HTTP trims header values), as api/schemas.py states.
KEY_PATTERN = r"^[!-~](?:[ -~]*[!-~])?$"
_KEY = re.compile(KEY_PATTERN.removeprefix("^").removesuffix("$"))
RETENTION = timedelta(hours=24)


class IdempotencyKey(IdMixin, Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("org_id", "key"),)

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    key: Mapped[str] = mapped_column(String(MAX_KEY_LENGTH))
    request_sha256: Mapped[str] = mapped_column(String(64))
    # The API key whose request made the response. None: stored before responses were bound
    # to keys (migration 0008), and replayed to no key.
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    response_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


def request_fingerprint(*parts: Any) -> str:
    return hashlib.sha256(
        json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def check_key(key: str) -> None:
    if len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise ValidationFailed(
            {"Idempotency-Key": f"must be 1-{MAX_KEY_LENGTH} printable ASCII characters"}
        )


class DifferentRequest(ValidationFailed):
    """The key was used, by this API key, for another request."""

    def __init__(self) -> None:
        super().__init__({"Idempotency-Key": "was already used with a different request"})


def response_context(row_id: uuid.UUID) -> str:
    return f"idempotency.response:{row_id}"


def recall(
    session: Session, org_id: uuid.UUID, key: str, fingerprint: str, *, api_key_id: uuid.UUID
) -> dict[str, Any] | None:
    """The stored first response for this key, None if unused (or expired).

    422 when another API key made it (never its body: it may hold a secret shown once), and
    ``DifferentRequest`` when this API key made it for another request.
    """
    check_key(key)
    row = session.scalars(
        select(IdempotencyKey)
        .where(IdempotencyKey.org_id == org_id, IdempotencyKey.key == key)
        .with_for_update()
    ).one_or_none()
    if row is None:
        return None
    if row.created_at <= clock.now() - RETENTION:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row.id))
        session.flush()
        return None
    if row.api_key_id is None or row.api_key_id != api_key_id:
        raise ValidationFailed({"Idempotency-Key": "was already used by another API key"})
    if row.request_sha256 != fingerprint:
        raise DifferentRequest()
    response: dict[str, Any] = json.loads(
        box_of(session).decrypt(row.response_ciphertext, context=response_context(row.id))
    )
    return response


def remember(
    session: Session,
    org_id: uuid.UUID,
    key: str,
    fingerprint: str,
    response: dict[str, Any],
    *,
    api_key_id: uuid.UUID,
) -> None:
    row_id = new_id()
    try:
        with session.begin_nested():
            session.add(
                IdempotencyKey(
                    id=row_id,
                    org_id=org_id,
                    key=key,
                    request_sha256=fingerprint,
                    api_key_id=api_key_id,
                    response_ciphertext=box_of(session).encrypt(
                        json.dumps(response).encode(), context=response_context(row_id)
                    ),
                    created_at=clock.now(),
                )
            )
    except IntegrityError:
        # A concurrent request with this key committed first. The same request would have
        # waited on the same endpoint's lock and found it in ``recall``: this one is another.
        raise DifferentRequest() from None


def once(
    session: Session,
    org_id: uuid.UUID,
    key: str | None,
    fingerprint: str,
    start: Callable[[], dict[str, Any]],
    *,
    api_key_id: uuid.UUID,
) -> dict[str, Any]:
    """``start()``'s response, remembered under ``key``; or, when this API key already made this
    request under ``key``, its first response again without starting anything. Without a key,
    just ``start()``."""
    if key is None:
        return start()
    stored = recall(session, org_id, key, fingerprint, api_key_id=api_key_id)
    if stored is not None:
        return stored
    response = start()
    remember(session, org_id, key, fingerprint, response, api_key_id=api_key_id)
    return response
