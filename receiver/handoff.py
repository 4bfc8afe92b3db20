"""The in-band secret handoff: the new endpoint secret, sealed under the old one.

A ``webhook.secret_handoff`` event is delivered to the OLD endpoint, signed with the old
secret like any delivery. Its ``data`` carries the new secret sealed with AES-256-GCM under a
key derived from the old secret, so only a holder of the old secret can open it::

    key   = HKDF-SHA256(ikm = old secret bytes, salt = event id (UTF-8),
                        info = "rotator secret handoff v1", length = 32)
    data  = {"version": 1, "old_endpoint_id", "new_endpoint_id",
             "algorithm": "AES-256-GCM+HKDF-SHA256",
             "nonce": base64(12 bytes), "sealed_secret": base64(ciphertext + 16-byte tag)}
    AAD   = "<event id>|<old_endpoint_id>|<new_endpoint_id>"

The associated data binds the sealed secret to this event and this pair of endpoints, so a
handoff cannot be replayed into another event or re-pointed at another endpoint.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from receiver.signing import decode_secret

HANDOFF_EVENT = "webhook.secret_handoff"
HANDOFF_INFO = b"rotator secret handoff v1"
ALGORITHM = "AES-256-GCM+HKDF-SHA256"
_NONCE_BYTES = 12


class HandoffError(Exception):
    """The handoff cannot be opened: wrong secret, tampered, or not a handoff at all."""


@dataclass(frozen=True)
class Handoff:
    new_endpoint_id: str
    old_endpoint_id: str
    secret: str = field(repr=False)  # standard base64, like every Rotator endpoint secret


def _key(old_secret: str | bytes, event_id: str) -> bytes:
    raw = old_secret if isinstance(old_secret, bytes) else decode_secret(old_secret)
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=event_id.encode(), info=HANDOFF_INFO
    ).derive(raw)


def _aad(event_id: str, old_endpoint_id: str, new_endpoint_id: str) -> bytes:
    return f"{event_id}|{old_endpoint_id}|{new_endpoint_id}".encode()


def seal_handoff(
    *,
    old_secret: str | bytes,
    new_secret: str,
    event_id: str,
    old_endpoint_id: str,
    new_endpoint_id: str,
) -> dict[str, Any]:
    """The ``data`` of a handoff event (Rotator's side)."""
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(_key(old_secret, event_id)).encrypt(
        nonce, decode_secret(new_secret), _aad(event_id, old_endpoint_id, new_endpoint_id)
    )
    return {
        "version": 1,
        "old_endpoint_id": old_endpoint_id,
        "new_endpoint_id": new_endpoint_id,
        "algorithm": ALGORITHM,
        "nonce": base64.b64encode(nonce).decode(),
        "sealed_secret": base64.b64encode(sealed).decode(),
    }


def open_handoff(event: Mapping[str, Any], old_secret: str | bytes) -> Handoff:
    """Open a verified ``webhook.secret_handoff`` event with the old secret (the receiver's side).

    Verify the delivery's signature first (``receiver.verify``); this checks that the sealed
    secret was made for this event and these endpoints by a holder of ``old_secret``.
    """
    if event.get("type") != HANDOFF_EVENT:
        raise HandoffError("not a webhook.secret_handoff event")
    data = event.get("data")
    event_id = event.get("id")
    if not isinstance(data, Mapping) or not isinstance(event_id, str):
        raise HandoffError("malformed handoff event")
    try:
        # ``type(...) is int``: JSON true and 1.0 compare equal to 1 but are not version 1.
        if type(data["version"]) is not int or data["version"] != 1:
            raise HandoffError("unsupported handoff version")
        if data["algorithm"] != ALGORITHM:
            raise HandoffError("unsupported handoff version")
        old_id, new_id = str(data["old_endpoint_id"]), str(data["new_endpoint_id"])
        nonce = base64.b64decode(data["nonce"], validate=True)
        sealed = base64.b64decode(data["sealed_secret"], validate=True)
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise HandoffError("malformed handoff data") from None
    try:
        raw = AESGCM(_key(old_secret, event_id)).decrypt(
            nonce, sealed, _aad(event_id, old_id, new_id)
        )
    except (InvalidTag, ValueError):
        raise HandoffError("the handoff does not open with this secret") from None
    return Handoff(
        new_endpoint_id=new_id, old_endpoint_id=old_id, secret=base64.b64encode(raw).decode()
    )
