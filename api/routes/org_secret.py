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
from workers.org_secrets import expire_later

router = APIRouter(prefix="/v1/webhook-secret", tags=["org secret"])

Admin = Annotated[Caller, Depends(require(Scope.ORG_ADMIN_WRITE))]


def _rotate(session: Session, org_id: uuid.UUID) -> dict[str, Any]:
    rotation = org_secret.rotate(session, org_id)
    expire_later(session, rotation)
    grace = settings_of(session).org_secret_grace_seconds
    return {
        "webhook_secret": rotation.secret,
        "rotated_at": rfc3339(rotation.rotated_at),
        "previous_valid_until": rfc3339(rotation.rotated_at + timedelta(seconds=grace)),
    }


@router.post("/rotate", response_model=OrgSecretRotated, responses=responses(401, 403))
async def rotate_org_secret(caller: Admin) -> JSONResponse:
    """Mint a new organization secret, shown once; the previous one signs for 5 more minutes."""
    return JSONResponse(await caller.run(_rotate))
