"""The in-band secret handoff, from the receiver package alone: seal, open, tamper, apply."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import io
import json
import time
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from receiver import (
    DemoReceiver,
    Handoff,
    HandoffError,
    decode_secret,
    open_handoff,
    seal_handoff,
    signature_headers,
)
from receiver.handoff import ALGORITHM, HANDOFF_EVENT, HANDOFF_INFO

# These tests open handoffs without an org signature on purpose; the warning that this earns is
# tested in test_handoff_org_signature.py.
pytestmark = pytest.mark.filterwarnings("ignore::receiver.handoff.UnverifiedHandoffWarning")

OLD_SECRET = base64.b64encode(bytes(range(100, 132))).decode()
NEW_SECRET = base64.b64encode(bytes(range(200, 232))).decode()
OTHER_SECRET = base64.b64encode(b"x" * 32).decode()
EVENT_ID = "evt_0190a5a0-1111-7000-8000-000000000001"
OLD_ID = "0190a5a0-2222-7000-8000-000000000002"
NEW_ID = "0190a5a0-3333-7000-8000-000000000003"


def sealed(
    *,
    old_secret: str | bytes = OLD_SECRET,
    new_secret: str = NEW_SECRET,
    event_id: str = EVENT_ID,
) -> dict[str, Any]:
    return seal_handoff(
        old_secret=old_secret,
        new_secret=new_secret,
        event_id=event_id,
        old_endpoint_id=OLD_ID,
        new_endpoint_id=NEW_ID,
    )


def handoff_event(data: dict[str, Any], event_id: str = EVENT_ID) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": HANDOFF_EVENT,
        "api_version": "2026-04-01",
        "created_at": "2026-04-01T00:00:00Z",
        "org_id": "0190a5a0-0000-7000-8000-000000000000",
        "data": data,
    }


def flip_b64(value: str) -> str:
    """The same base64 field with its first byte changed (still valid base64, same length)."""
    raw = bytearray(base64.b64decode(value))
    raw[0] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


# --- seal and open ------------------------------------------------------------------------------


def test_seal_then_open_with_the_old_secret_returns_the_new_secret_and_ids():
    data = sealed()
    assert set(data) == {
        "version",
        "old_endpoint_id",
        "new_endpoint_id",
        "algorithm",
        "nonce",
        "sealed_secret",
    }
    assert data["version"] == 1
    assert data["algorithm"] == ALGORITHM == "AES-256-GCM+HKDF-SHA256"
    assert len(base64.b64decode(data["nonce"], validate=True)) == 12
    # 32 secret bytes + a 16-byte tag.
    assert len(base64.b64decode(data["sealed_secret"], validate=True)) == 48

    opened = open_handoff(handoff_event(data), OLD_SECRET)

    assert opened == Handoff(new_endpoint_id=NEW_ID, old_endpoint_id=OLD_ID, secret=NEW_SECRET)
    assert opened.secret == NEW_SECRET
    assert NEW_SECRET not in repr(opened)


def test_open_accepts_the_old_secret_as_raw_bytes_or_in_whsec_form():
    data = sealed()
    assert open_handoff(handoff_event(data), decode_secret(OLD_SECRET)).secret == NEW_SECRET
    whsec = "whsec_" + OLD_SECRET
    assert open_handoff(handoff_event(data), whsec).secret == NEW_SECRET


def test_every_seal_uses_a_fresh_nonce():
    first, second = sealed(), sealed()
    assert first["nonce"] != second["nonce"]
    assert first["sealed_secret"] != second["sealed_secret"]
    assert open_handoff(handoff_event(second), OLD_SECRET).secret == NEW_SECRET


@pytest.mark.parametrize(
    "secret",
    [
        OTHER_SECRET,
        NEW_SECRET,  # the new secret does not open its own handoff
        b"x" * 32,
        base64.b64encode(b"short").decode(),  # not even a valid Rotator secret
        "not base64 at all!",
    ],
    ids=["other", "new", "raw-bytes", "short", "garbage"],
)
def test_opening_with_any_other_secret_fails(secret):
    with pytest.raises(HandoffError):
        open_handoff(handoff_event(sealed()), secret)


# --- tampering ----------------------------------------------------------------------------------


def _tampered_nonce(data: dict[str, Any]) -> None:
    data["nonce"] = flip_b64(data["nonce"])


def _tampered_sealed(data: dict[str, Any]) -> None:
    data["sealed_secret"] = flip_b64(data["sealed_secret"])


def _tampered_tag(data: dict[str, Any]) -> None:
    raw = bytearray(base64.b64decode(data["sealed_secret"]))
    raw[-1] ^= 0x80
    data["sealed_secret"] = base64.b64encode(bytes(raw)).decode()


def _truncated_sealed(data: dict[str, Any]) -> None:
    data["sealed_secret"] = base64.b64encode(base64.b64decode(data["sealed_secret"])[:32]).decode()


DATA_TAMPERS = {
    "nonce-flipped": _tampered_nonce,
    "nonce-short": lambda d: d.update(nonce=base64.b64encode(b"\0" * 4).decode()),
    "nonce-not-base64": lambda d: d.update(nonce="***"),
    "nonce-not-a-string": lambda d: d.update(nonce=12),
    "nonce-missing": lambda d: d.pop("nonce"),
    "sealed-flipped": _tampered_sealed,
    "sealed-tag-flipped": _tampered_tag,
    "sealed-truncated": _truncated_sealed,
    "sealed-empty": lambda d: d.update(sealed_secret=""),
    "sealed-not-base64": lambda d: d.update(sealed_secret="%%%%"),
    "sealed-missing": lambda d: d.pop("sealed_secret"),
    "old-id-changed": lambda d: d.update(old_endpoint_id=NEW_ID),
    "old-id-other": lambda d: d.update(old_endpoint_id="0190a5a0-4444-7000-8000-000000000004"),
    "old-id-missing": lambda d: d.pop("old_endpoint_id"),
    "new-id-changed": lambda d: d.update(new_endpoint_id=OLD_ID),
    "new-id-other": lambda d: d.update(new_endpoint_id="0190a5a0-5555-7000-8000-000000000005"),
    "new-id-missing": lambda d: d.pop("new_endpoint_id"),
    "ids-swapped": lambda d: d.update(old_endpoint_id=NEW_ID, new_endpoint_id=OLD_ID),
    "version-2": lambda d: d.update(version=2),
    "version-0": lambda d: d.update(version=0),
    "version-string": lambda d: d.update(version="1"),
    "version-true": lambda d: d.update(version=True),
    "version-float": lambda d: d.update(version=1.0),
    "version-null": lambda d: d.update(version=None),
    "version-missing": lambda d: d.pop("version"),
    "algorithm-other": lambda d: d.update(algorithm="AES-128-GCM+HKDF-SHA256"),
    "algorithm-lowercase": lambda d: d.update(algorithm=ALGORITHM.lower()),
    "algorithm-null": lambda d: d.update(algorithm=None),
    "algorithm-missing": lambda d: d.pop("algorithm"),
}


@pytest.mark.parametrize("tamper", DATA_TAMPERS.values(), ids=DATA_TAMPERS.keys())
def test_tampering_with_the_data_fails(tamper):
    data = sealed()
    assert open_handoff(handoff_event(data), OLD_SECRET).secret == NEW_SECRET
    changed = copy.deepcopy(data)
    tamper(changed)
    assert json.dumps(changed) != json.dumps(data)
    with pytest.raises(HandoffError):
        open_handoff(handoff_event(changed), OLD_SECRET)


@pytest.mark.parametrize(
    "event_id",
    [
        "evt_0190a5a0-1111-7000-8000-000000000009",  # another event
        EVENT_ID + " ",
        EVENT_ID.upper(),
        "",
    ],
    ids=["other", "trailing-space", "upper", "empty"],
)
def test_moving_the_handoff_into_another_event_fails(event_id):
    with pytest.raises(HandoffError):
        open_handoff(handoff_event(sealed(), event_id=event_id), OLD_SECRET)


@pytest.mark.parametrize(
    "event",
    [
        {**handoff_event(sealed()), "id": None},
        {key: value for key, value in handoff_event(sealed()).items() if key != "id"},
        {**handoff_event(sealed()), "id": 42},
    ],
    ids=["null", "missing", "number"],
)
def test_a_handoff_without_a_string_event_id_fails(event):
    with pytest.raises(HandoffError):
        open_handoff(event, OLD_SECRET)


@pytest.mark.parametrize(
    "event",
    [
        {**handoff_event(sealed()), "type": "campaign.approved"},
        {**handoff_event(sealed()), "type": "webhook.test"},
        {key: value for key, value in handoff_event(sealed()).items() if key != "type"},
        {**handoff_event(sealed()), "data": None},
        {**handoff_event(sealed()), "data": [sealed()]},
        {**handoff_event(sealed()), "data": json.dumps(sealed())},
        {**handoff_event(sealed()), "data": {}},
    ],
    ids=["other-type", "test-type", "no-type", "null-data", "list-data", "string-data", "empty"],
)
def test_something_that_is_not_a_handoff_fails(event):
    with pytest.raises(HandoffError):
        open_handoff(event, OLD_SECRET)


# --- what the sealed data reveals ---------------------------------------------------------------


def test_the_sealed_data_never_contains_the_new_secret_in_any_encoding():
    raw = decode_secret(NEW_SECRET)
    for _ in range(20):  # several nonces: no lucky encoding slips through
        data = sealed()
        text = json.dumps(data)
        encodings = [
            NEW_SECRET,
            NEW_SECRET.rstrip("="),
            base64.urlsafe_b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            "whsec_" + NEW_SECRET,
            raw.hex(),
            raw.hex().upper(),
            base64.b32encode(raw).decode().rstrip("="),
            base64.b85encode(raw).decode(),
        ]
        for encoded in encodings:
            assert encoded not in text
            assert encoded.lower() not in text.lower()
        for field in ("nonce", "sealed_secret"):
            blob = base64.b64decode(data[field])
            assert raw not in blob
            assert raw[:8] not in blob  # not even a prefix of the secret, in the clear
        assert raw.decode("latin-1") not in text
        assert OLD_SECRET not in text
        assert decode_secret(OLD_SECRET).hex() not in text


# --- the documented format is the implemented one -----------------------------------------------


def _hkdf_sha256_by_hand(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869, written out with hmac: extract, then expand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def test_the_key_derivation_and_sealing_match_the_documented_format():
    assert HANDOFF_INFO == b"rotator secret handoff v1"
    old_key = decode_secret(OLD_SECRET)
    data = sealed()

    by_library = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=EVENT_ID.encode(),
        info=b"rotator secret handoff v1",
    ).derive(old_key)
    by_hand = _hkdf_sha256_by_hand(old_key, EVENT_ID.encode(), b"rotator secret handoff v1")
    assert by_library == by_hand

    aad = f"{EVENT_ID}|{OLD_ID}|{NEW_ID}".encode()
    opened = AESGCM(by_hand).decrypt(
        base64.b64decode(data["nonce"]), base64.b64decode(data["sealed_secret"]), aad
    )
    assert opened == decode_secret(NEW_SECRET)

    # And the other way round: a handoff sealed by hand, per the docs, opens with open_handoff.
    nonce = bytes(range(12))
    by_docs = {
        "version": 1,
        "old_endpoint_id": OLD_ID,
        "new_endpoint_id": NEW_ID,
        "algorithm": "AES-256-GCM+HKDF-SHA256",
        "nonce": base64.b64encode(nonce).decode(),
        "sealed_secret": base64.b64encode(
            AESGCM(by_hand).encrypt(nonce, decode_secret(NEW_SECRET), aad)
        ).decode(),
    }
    assert open_handoff(handoff_event(by_docs), OLD_SECRET).secret == NEW_SECRET


def test_a_different_salt_or_info_gives_a_key_that_does_not_open_it():
    old_key = decode_secret(OLD_SECRET)
    data = sealed()
    aad = f"{EVENT_ID}|{OLD_ID}|{NEW_ID}".encode()
    for salt, info in [
        (b"", b"rotator secret handoff v1"),
        (EVENT_ID.encode(), b"rotator secret handoff v2"),
        (EVENT_ID.encode(), b""),
    ]:
        key = _hkdf_sha256_by_hand(old_key, salt, info)
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(
                base64.b64decode(data["nonce"]), base64.b64decode(data["sealed_secret"]), aad
            )


# --- the demo receiver applies it ---------------------------------------------------------------


def body_of(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def signed_with(secret: str, body: bytes, msg_id: str = EVENT_ID) -> dict[str, str]:
    return signature_headers(
        endpoint_key=decode_secret(secret), msg_id=msg_id, timestamp=int(time.time()), body=body
    )


def campaign_event(event_id: str) -> bytes:
    return body_of(
        {
            "id": event_id,
            "type": "campaign.approved",
            "api_version": "2026-04-01",
            "created_at": "2026-04-01T00:00:00Z",
            "org_id": "0190a5a0-0000-7000-8000-000000000000",
            "data": {"campaign_id": "c1"},
        }
    )


@pytest.fixture
def demo() -> DemoReceiver:
    return DemoReceiver([OLD_SECRET], out=io.StringIO())


def test_a_signed_handoff_installs_the_new_secret(demo):
    new_delivery = campaign_event("evt_after")
    # Before the handoff the receiver refuses a delivery signed with the new secret.
    status, _ = demo.handle(signed_with(NEW_SECRET, new_delivery, "evt_after"), new_delivery)
    assert status == 401

    body = body_of(handoff_event(sealed()))
    status, answer = demo.handle(signed_with(OLD_SECRET, body), body)

    assert (status, answer) == (200, {"ok": True})
    assert demo.secrets() == [NEW_SECRET, OLD_SECRET]  # grew by one, newest first
    status, answer = demo.handle(signed_with(NEW_SECRET, new_delivery, "evt_after"), new_delivery)
    assert (status, answer) == (200, {"ok": True})
    assert demo.events()[-1]["secret_index"] == 0
    # The old secret still verifies: the old endpoint sends until Rotator deletes it.
    old_delivery = campaign_event("evt_old")
    assert demo.handle(signed_with(OLD_SECRET, old_delivery, "evt_old"), old_delivery)[0] == 200
    handled = demo.events()[1]
    assert handled["type"] == HANDOFF_EVENT
    assert handled["status"] == 200


def test_the_handoff_opens_with_whichever_held_secret_signed_it():
    demo = DemoReceiver([OTHER_SECRET, OLD_SECRET], out=io.StringIO())
    body = body_of(handoff_event(sealed()))
    assert demo.handle(signed_with(OLD_SECRET, body), body) == (200, {"ok": True})
    assert demo.secrets() == [NEW_SECRET, OTHER_SECRET, OLD_SECRET]


def test_a_handoff_signed_with_a_wrong_secret_is_rejected_and_installs_nothing(demo):
    body = body_of(handoff_event(sealed()))
    status, answer = demo.handle(signed_with(OTHER_SECRET, body), body)
    assert status == 401
    assert answer["ok"] is False
    assert demo.secrets() == [OLD_SECRET]
    # Signed with the NEW secret it carries: still not trusted.
    assert demo.handle(signed_with(NEW_SECRET, body), body)[0] == 401
    assert demo.secrets() == [OLD_SECRET]
    assert [event["status"] for event in demo.events()] == [401, 401]


def test_a_handoff_sealed_under_another_secret_but_signed_with_the_held_one_fails(demo):
    # Signed correctly, but sealed for someone who holds OTHER_SECRET: it cannot be opened.
    body = body_of(handoff_event(sealed(old_secret=OTHER_SECRET)))
    assert demo.handle(signed_with(OLD_SECRET, body), body) == (
        500,
        {"ok": False, "error": "HandlerError"},
    )
    assert demo.secrets() == [OLD_SECRET]


@pytest.mark.parametrize(
    "tamper",
    [
        _tampered_nonce,
        _tampered_sealed,
        lambda d: d.update(old_endpoint_id="0190a5a0-4444-7000-8000-000000000004"),
        lambda d: d.update(new_endpoint_id="0190a5a0-5555-7000-8000-000000000005"),
        lambda d: d.update(version=2),
        lambda d: d.update(algorithm="AES-128-GCM"),
    ],
    ids=["nonce", "sealed", "old-id", "new-id", "version", "algorithm"],
)
def test_a_tampered_but_correctly_signed_handoff_is_a_handler_error(demo, tamper):
    data = sealed()
    tamper(data)
    body = body_of(handoff_event(data))
    status, answer = demo.handle(signed_with(OLD_SECRET, body), body)
    assert (status, answer) == (500, {"ok": False, "error": "HandlerError"})
    assert demo.secrets() == [OLD_SECRET]
    (record,) = demo.events()
    assert record["status"] == 500
    assert record["error"] == "HandoffError"


def test_a_handoff_moved_into_another_event_and_re_signed_is_a_handler_error(demo):
    body = body_of(handoff_event(sealed(), event_id="evt_replayed"))
    status, answer = demo.handle(signed_with(OLD_SECRET, body, "evt_replayed"), body)
    assert (status, answer) == (500, {"ok": False, "error": "HandlerError"})
    assert demo.secrets() == [OLD_SECRET]


def test_the_receiver_log_never_shows_either_secret():
    out = io.StringIO()
    demo = DemoReceiver([OLD_SECRET], out=out)
    body = body_of(handoff_event(sealed()))
    assert demo.handle(signed_with(OLD_SECRET, body), body)[0] == 200
    printed = out.getvalue()
    assert NEW_ID in printed  # the handoff line names the endpoints
    for secret in (OLD_SECRET, NEW_SECRET):
        assert secret not in printed
        assert secret not in json.dumps(demo.events())
