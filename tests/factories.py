"""Plain factory functions for test data (real rows through the domain functions)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from models.db import Database
from models.org import create_org, issue_key


@dataclass(frozen=True)
class Tenant:
    org_id: uuid.UUID
    key_id: uuid.UUID
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def make_tenant(db: Database, *, name: str = "Acme", scopes: Iterable[str] = ()) -> Tenant:
    with db.session() as session:
        org = create_org(session, name)
        issued = issue_key(session, org.id, scopes)
    return Tenant(org_id=issued.org_id, key_id=issued.key_id, api_key=issued.api_key)


def add_key(db: Database, tenant: Tenant, scopes: Iterable[str]) -> Tenant:
    with db.session() as session:
        issued = issue_key(session, tenant.org_id, scopes)
    return Tenant(org_id=tenant.org_id, key_id=issued.key_id, api_key=issued.api_key)


def endpoint_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "url": "https://hooks.example.com/rotator",
        "events": ["wallet.balance_low", "brand.vetted"],
        "description": "ops hooks",
    }
    body.update(overrides)
    return body
