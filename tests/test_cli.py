"""The operator's command line, against the test database."""

import asyncio
import json
import uuid

import pytest
from sqlalchemy import select

from models.db import Database
from models.errors import Unauthorized
from models.org import ApiKey, Principal, PrincipalCache, authenticate
from rotator.cli import main


def _run(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _authenticate(database: Database, api_key: str) -> Principal:
    async def run() -> Principal:
        try:
            return await authenticate(database.reads, api_key, PrincipalCache(0))
        finally:
            await database.reads.close()

    return asyncio.run(run())


def test_orgs_create_prints_one_json_object_with_all_scopes_by_default(capsys, database):
    out = _run(capsys, "orgs", "create", "--name", "Acme")
    assert set(out) == {"org_id", "key_id", "api_key", "scopes"}
    assert sorted(out["scopes"]) == sorted(
        ["webhooks:read", "webhooks:write", "org:admin:write", "events:write"]
    )
    principal = _authenticate(database, out["api_key"])
    assert principal.org_id == uuid.UUID(out["org_id"])


def test_keys_create_with_scopes_then_revoke(capsys, database):
    org = _run(capsys, "orgs", "create", "--name", "Acme")
    key = _run(capsys, "keys", "create", "--org", org["org_id"], "--scopes", "webhooks:read")
    assert key["scopes"] == ["webhooks:read"]
    assert _run(capsys, "keys", "revoke", key["key_id"]) == {
        "key_id": key["key_id"],
        "revoked": True,
    }
    with pytest.raises(Unauthorized):
        _authenticate(database, key["api_key"])
    with database.session() as session:
        stored = session.scalars(select(ApiKey.key_hash)).all()
    assert key["api_key"] not in stored


def test_unknown_scope_is_refused_and_nothing_is_created(capsys, database):
    assert main(["orgs", "create", "--name", "Acme", "--scopes", "webhooks:read,root"]) == 1
    assert "unknown scope" in capsys.readouterr().err
    with database.session() as session:
        assert session.scalars(select(ApiKey)).all() == []


def test_keys_for_an_unknown_org_fail_cleanly(capsys):
    assert main(["keys", "create", "--org", str(uuid.uuid4())]) == 1
    assert "not found" in capsys.readouterr().err


def test_secrets_genkey_prints_a_usable_key(capsys):
    from rotator.settings import Settings

    assert main(["secrets", "genkey"]) == 0
    key = capsys.readouterr().out.strip()
    assert len(Settings(encryption_keys=[key]).encryption_key_bytes()[0]) == 32
