import base64
import secrets
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import LargeBinary, select, text

from models import Base
from models import provider as providers
from models.crypto import DecryptionError, SecretBox
from models.db import Database, get_database, set_database
from models.endpoint import create_endpoint, signing_key
from models.rekey import ENCRYPTED_COLUMNS, reencrypt_all
from tests.factories import make_tenant


def _key() -> bytes:
    return secrets.token_bytes(32)


def test_round_trip_and_fresh_nonce_each_time():
    box = SecretBox([_key()])
    first = box.encrypt(b"s3cret", context="row:1")
    second = box.encrypt(b"s3cret", context="row:1")
    assert first != second
    assert box.decrypt(first, context="row:1") == b"s3cret"
    assert b"s3cret" not in first


def test_ciphertext_is_bound_to_its_row():
    box = SecretBox([_key()])
    sealed = box.encrypt(b"s3cret", context="row:1")
    with pytest.raises(DecryptionError):
        box.decrypt(sealed, context="row:2")


def test_tampering_is_detected():
    box = SecretBox([_key()])
    sealed = bytearray(box.encrypt(b"s3cret", context="c"))
    sealed[-1] ^= 1
    with pytest.raises(DecryptionError):
        box.decrypt(bytes(sealed), context="c")


def test_key_rotation_decrypts_with_any_configured_key_and_encrypts_with_the_first():
    old, new = _key(), _key()
    sealed_old = SecretBox([old]).encrypt(b"v", context="c")
    rotated = SecretBox([new, old])
    assert rotated.decrypt(sealed_old, context="c") == b"v"
    assert not rotated.is_current(sealed_old)
    assert rotated.is_current(rotated.encrypt(b"v", context="c"))
    with pytest.raises(DecryptionError, match="not configured"):
        SecretBox([new]).decrypt(sealed_old, context="c")


def test_reencrypt_moves_every_endpoint_secret_to_the_first_key(database, settings):
    tenant = make_tenant(database)
    with database.session() as session:
        created = create_endpoint(
            session, tenant.org_id, url="https://a.example/h", events=["brand.vetted"]
        )
    secret_bytes = base64.b64decode(created.secret)

    new_key = base64.b64encode(_key()).decode()
    rotated = Database(
        settings.model_copy(update={"encryption_keys": [new_key, *settings.encryption_keys]})
    )
    try:
        with rotated.session() as session:
            assert reencrypt_all(session) == {
                "webhook_endpoints": 1,
                "org_secrets": 0,
                "operations": 0,
                "idempotency_keys": 0,
                "providers": 0,
            }
        with rotated.session() as session:
            assert reencrypt_all(session) == {
                "webhook_endpoints": 0,
                "org_secrets": 0,
                "operations": 0,
                "idempotency_keys": 0,
                "providers": 0,
            }
        only_new = Database(settings.model_copy(update={"encryption_keys": [new_key]}))
        try:
            with only_new.session() as session:
                from models.endpoint import WebhookEndpoint

                endpoint = session.get(WebhookEndpoint, created.endpoint.id)
                assert endpoint is not None
                assert signing_key(session, endpoint) == secret_bytes
        finally:
            only_new.dispose()
    finally:
        rotated.dispose()
    with database.engine.connect() as connection:
        blob = connection.execute(text("SELECT secret_ciphertext FROM webhook_endpoints")).scalar()
    assert secret_bytes not in bytes(blob)


# --- the registry of encrypted columns ----------------------------------------------------------


def test_every_column_that_stores_ciphertext_is_in_the_registry():
    """Ciphertext lives in binary columns named ``*_ciphertext``: each one must be registered,
    or ``secrets reencrypt`` would leave it under a key an operator is about to drop."""
    in_schema = {
        (table.name, column.name)
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if column.name.endswith("_ciphertext") or isinstance(column.type, LargeBinary)
    }
    registered = [(entry.table, entry.name) for entry in ENCRYPTED_COLUMNS]
    assert len(registered) == len(set(registered))
    assert in_schema == set(registered)
    for table, name in registered:
        column = Base.metadata.tables[table].columns[name]
        assert name.endswith("_ciphertext"), (table, name)
        assert isinstance(column.type, LargeBinary), (table, name)


def _sealed_rows(database: Database) -> dict[str, list[tuple[Any, bytes]]]:
    """Every registered column's non-null values, by ``table.column``."""
    found: dict[str, list[tuple[Any, bytes]]] = {}
    with database.engine.connect() as connection:
        for entry in ENCRYPTED_COLUMNS:
            model = entry.column.class_
            rows = connection.execute(
                select(model.id, entry.column).where(entry.column.is_not(None))
            ).all()
            found[f"{entry.table}.{entry.name}"] = [(row_id, bytes(blob)) for row_id, blob in rows]
    return found


def test_reencrypt_reseals_every_registered_column_and_a_retry_still_replays(
    app, client, database, settings
):
    """After ``secrets reencrypt`` under a new first key, the old key can go: every stored
    secret still opens, and a client retrying an Idempotency-Key gets its first response."""
    tenant = make_tenant(database)
    headers = {**tenant.headers, "Idempotency-Key": "retry-after-rekey"}
    for _ in range(3):  # a current, a previous and an expired (wiped) org secret
        assert client.post("/v1/webhook-secret/rotate", headers=tenant.headers).status_code == 200
    source = client.post(
        "/v1/webhooks",
        json={"url": "https://hooks.example.com/h", "events": ["brand.vetted"]},
        headers=tenant.headers,
    ).json()
    first = client.post(f"/v1/webhooks/{source['id']}/migrate", headers=headers)
    assert first.status_code == 202, first.text
    with database.session() as session:
        providers.create(
            session,
            tenant.org_id,
            name="elsewhere",
            base_url="https://provider.example.com",
            api_key="am_live_" + "k" * 34,
        )
    before = _sealed_rows(database)
    assert all(before.values()), before  # every registered column has something to re-seal

    new_key = base64.b64encode(_key()).decode()
    rotated = Database(
        settings.model_copy(update={"encryption_keys": [new_key, *settings.encryption_keys]})
    )
    only_new = Database(settings.model_copy(update={"encryption_keys": [new_key]}))
    original = get_database()
    try:
        with rotated.session() as session:
            counts = reencrypt_all(session)
        expected: dict[str, int] = {}
        for column, rows in before.items():
            table = column.split(".")[0]
            expected[table] = expected.get(table, 0) + len(rows)
        assert counts == expected
        with rotated.session() as session:
            assert set(reencrypt_all(session).values()) == {0}

        after = _sealed_rows(database)
        for entry in ENCRYPTED_COLUMNS:
            for row_id, blob in after[f"{entry.table}.{entry.name}"]:
                only_new.box.decrypt(blob, context=entry.context(uuid.UUID(str(row_id))))

        set_database(only_new)
        with TestClient(app, raise_server_exceptions=False) as own:
            again = own.post(f"/v1/webhooks/{source['id']}/migrate", headers=headers)
            assert again.status_code == 202, again.text
            assert again.json() == first.json()
    finally:
        set_database(original)
        rotated.dispose()
        only_new.dispose()
