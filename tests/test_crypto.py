import base64
import secrets

import pytest
from sqlalchemy import text

from models.crypto import DecryptionError, SecretBox
from models.db import Database
from models.endpoint import create_endpoint, signing_key
from models.rekey import reencrypt_all
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
            }
        with rotated.session() as session:
            assert reencrypt_all(session) == {
                "webhook_endpoints": 0,
                "org_secrets": 0,
                "operations": 0,
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
