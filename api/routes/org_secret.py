"""/v1/webhook-secret: the organization's signing secret (docs/api.md, "Organization secret")."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import Caller, require
from api.errors import responses
from api.schemas import OrgSecretRotated
from models import org_secret
from models.clock import rfc3339
from models.db import settings_of
from models.org import Scope
from workers.enqueue import send_after_commit
from workers.names import TaskName

router = APIRouter(prefix="/v1/webhook-secret", tags=["org secret"])

Admin = Annotated[Caller, Depends(require(Scope.ORG_ADMIN_WRITE))]

# Longer windows are left to the sweeper rather than held as a countdown in the broker.
MAX_EXPIRY_COUNTDOWN_S = 900


def _rotate(session: Session, org_id: uuid.UUID) -> dict[str, Any]:
    rotation = org_secret.rotate(session, org_id)
    grace = settings_of(session).org_secret_grace_seconds
    if rotation.previous_id is not None and grace <= MAX_EXPIRY_COUNTDOWN_S:
        send_after_commit(
            session, TaskName.ORG_SECRET_EXPIRE, rotation.previous_id, countdown=grace + 1
        )
    return {
        "webhook_secret": rotation.secret,
        "rotated_at": rfc3339(rotation.rotated_at),
        "previous_valid_until": rfc3339(rotation.rotated_at + timedelta(seconds=grace)),
    }


@router.post("/rotate", response_model=OrgSecretRotated, responses=responses(401, 403))
async def rotate_org_secret(caller: Admin) -> JSONResponse:
    """Mint a new organization secret, shown once; the previous one signs for 5 more minutes."""
    return JSONResponse(await caller.run(_rotate))
