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

Whoever holds the old secret can sign and seal a handoff of their own making, and so plant a
secret of their choosing in the receiver. A receiver that knows its organization's secret(s)
closes that door: ``open_handoff_delivery`` (or ``open_handoff`` given ``org_signature``) then
installs nothing unless ``X-AmCore-Org-Signature`` verifies too (docs/receivers.md, "The in-band
handoff"). Without org secrets the handoff is trusted on the endpoint signature alone, and
``UnverifiedHandoffWarning`` says so.
"""

from __future__ import annotations

import base64
import binascii
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from receiver.signing import decode_secret
from receiver.verify import DEFAULT_TOLERANCE_S, VerifiedDelivery, parse_event, verify

HANDOFF_EVENT = "webhook.secret_handoff"
HANDOFF_INFO = b"rotator secret handoff v1"
ALGORITHM = "AES-256-GCM+HKDF-SHA256"
_NONCE_BYTES = 12


class HandoffError(Exception):
    """The handoff cannot be opened: wrong secret, tampered, or not a handoff at all."""


class UnverifiedHandoffWarning(UserWarning):
    """A handoff was opened without checking its org signature: anyone holding the old endpoint
    secret could have sent it. Give the organization secret(s) to check it."""


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


def open_handoff(
    event: Mapping[str, Any],
    old_secret: str | bytes,
    *,
    org_signature: VerifiedDelivery | None = None,
) -> Handoff:
    """Open a verified ``webhook.secret_handoff`` event with the old secret (the receiver's side).

    Verify the delivery's signature first (``receiver.verify``); this checks that the sealed
    secret was made for this event and these endpoints by a holder of ``old_secret``.
    ``org_signature`` is what ``verify(..., scheme="org")`` proved about the same delivery with
    the organization's secret(s); without it, ``UnverifiedHandoffWarning`` is emitted.
    ``open_handoff_delivery`` does both checks and the opening in one call.
    """
    if org_signature is None:
        warnings.warn(
            "handoff opened on the endpoint signature alone: configure the org secret so that "
            "X-AmCore-Org-Signature is checked",
            UnverifiedHandoffWarning,
            stacklevel=2,
        )
    elif not isinstance(org_signature, VerifiedDelivery) or org_signature.scheme != "org":
        raise HandoffError("org_signature must come from verify(..., scheme='org')")
    return _open(event, old_secret)


def open_handoff_delivery(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Sequence[str | bytes],
    *,
    org_secrets: Sequence[str | bytes],
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Handoff:
    """Verify a handoff delivery and open it: the whole receiver side in one call.

    ``secrets`` are the endpoint secrets held (one of them must have signed it); with
    ``org_secrets`` given, ``X-AmCore-Org-Signature`` must verify with one of them as well, or
    nothing is opened (a ``VerificationError``). ``org_secrets=()`` says the receiver has none:
    the handoff is then trusted on the endpoint signature alone, with an
    ``UnverifiedHandoffWarning``. Raises ``HandoffError`` when the body is no valid handoff.
    """
    delivery = verify(headers, body, secrets, tolerance_s=tolerance_s, now=now)
    org_signature = None
    if org_secrets:
        org_signature = verify(
            headers, body, org_secrets, tolerance_s=tolerance_s, now=now, scheme="org"
        )
    try:
        event = parse_event(body)
    except (ValueError, RecursionError):
        raise HandoffError("the body is not a JSON object") from None
    if org_signature is None:
        warnings.warn(
            "handoff opened on the endpoint signature alone: pass org_secrets so that "
            "X-AmCore-Org-Signature is checked",
            UnverifiedHandoffWarning,
            stacklevel=2,
        )
        return _open(event, secrets[delivery.secret_index])
    return open_handoff(event, secrets[delivery.secret_index], org_signature=org_signature)


def _open(event: Mapping[str, Any], old_secret: str | bytes) -> Handoff:
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
