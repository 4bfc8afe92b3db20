"""Both delivery signature schemes, in the one place the sender and every receiver share.

Rotator signs each delivery twice with the endpoint key (docs/receivers.md):

- AmCore: ``X-AmCore-Signature: t=<t>,v1=<hex HMAC-SHA256(key, "<t>\\n<body>")>``, plus
  ``X-AmCore-Org-Signature`` in the same shape with one ``v1`` per valid org key.
- Standard Webhooks: ``webhook-id``, ``webhook-timestamp`` and
  ``webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<t>.<body>")>``.

Keeping the signer and the verifier on the same byte layout is what guarantees that whatever
the workers send, ``receiver.verify`` accepts. Standard library only, so receivers can vendor it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence

__all__ = [
    "AMCORE_ORG_SIGNATURE_HEADER",
    "AMCORE_SIGNATURE_HEADER",
    "WEBHOOK_ID_HEADER",
    "WEBHOOK_SIGNATURE_HEADER",
    "WEBHOOK_TIMESTAMP_HEADER",
    "amcore_header",
    "amcore_payload",
    "decode_secret",
    "sign_amcore",
    "sign_standard",
    "signature_headers",
    "standard_payload",
]

AMCORE_SIGNATURE_HEADER = "X-AmCore-Signature"
AMCORE_ORG_SIGNATURE_HEADER = "X-AmCore-Org-Signature"
WEBHOOK_ID_HEADER = "webhook-id"
WEBHOOK_TIMESTAMP_HEADER = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER = "webhook-signature"

WHSEC_PREFIX = "whsec_"
# Rotator's own secrets: 32 random bytes, standard base64 (docs/api.md, "Endpoints").
ROTATOR_SECRET_BYTES = 32
# Standard Webhooks allows secrets of 24 to 64 bytes behind the "whsec_" prefix.
WHSEC_MIN_BYTES = 24
WHSEC_MAX_BYTES = 64

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
# Visible ASCII only: the id travels in an HTTP header and is part of the signed content.
_MSG_ID = re.compile(r"[\x21-\x7e]+")


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray):
        raise TypeError("signing key must be bytes")
    if not key:
        raise ValueError("signing key must not be empty")


def _check_timestamp(timestamp: int) -> None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be an int (unix seconds)")
    if timestamp < 0:
        raise ValueError("timestamp must not be negative")


def _check_msg_id(msg_id: str) -> None:
    if not isinstance(msg_id, str) or _MSG_ID.fullmatch(msg_id) is None:
        raise ValueError("message id must be non-empty visible ASCII without spaces")


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def amcore_payload(timestamp: int, body: bytes) -> bytes:
    """The exact bytes the AmCore scheme authenticates; shared so signer and verifier agree."""
    return str(timestamp).encode("ascii") + b"\n" + body


def standard_payload(msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The exact bytes Standard Webhooks authenticates; shared so signer and verifier agree."""
    return f"{msg_id}.{timestamp}.".encode() + body


def sign_amcore(key: bytes, timestamp: int, body: bytes) -> str:
    """Sign for ``X-AmCore-Signature`` receivers, so AgentMessage-era integrations keep working.

    Binding the timestamp into the MAC is what lets receivers reject replays by age.
    """
    _check_key(key)
    _check_timestamp(timestamp)
    return hmac.new(bytes(key), amcore_payload(timestamp, body), hashlib.sha256).hexdigest()


def amcore_header(timestamp: int, signatures: Sequence[str]) -> str:
    """Assemble an AmCore header; several ``v1`` entries let a rotating key overlap with its
    successor without receivers having to know which one is current.

    Entries are validated so a malformed signature cannot smuggle extra fields into the header.
    """
    _check_timestamp(timestamp)
    if isinstance(signatures, str):
        raise TypeError("signatures must be a sequence of hex strings, not a single string")
    if not signatures:
        raise ValueError("at least one signature is required")
    for sig in signatures:
        if not isinstance(sig, str) or _HEX_SHA256.fullmatch(sig) is None:
            raise ValueError("each signature must be 64 lowercase hex characters")
    return ",".join([f"t={timestamp}", *(f"v1={sig}" for sig in signatures)])


def sign_standard(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Sign in the Standard Webhooks format, so receivers can use any off-the-shelf verifier
    (e.g. the ``standardwebhooks`` package) instead of our code.
    """
    _check_key(key)
    _check_msg_id(msg_id)
    _check_timestamp(timestamp)
    digest = _hmac_sha256(bytes(key), standard_payload(msg_id, timestamp, body))
    return "v1," + base64.b64encode(digest).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """Turn a secret as a human or the API hands it over into the HMAC key.

    Both forms are accepted because receivers get Rotator's bare base64 secret from the API but
    may keep it in Standard Webhooks tooling that stores it as ``whsec_<base64>``. The bare form
    must be exactly Rotator's 32 bytes: a hex string or an API key pasted by mistake is refused
    here instead of surfacing later as a puzzling signature mismatch. Errors never echo the input.
    """
    if not isinstance(secret, str):
        raise TypeError("secret must be a str")
    text = secret.strip()
    prefixed = text.startswith(WHSEC_PREFIX)
    if prefixed:
        text = text[len(WHSEC_PREFIX) :]
        # Standard Webhooks tooling sometimes drops the padding; restore it before decoding.
        text += "=" * (-len(text) % 4)
    if not text:
        raise ValueError("secret is empty")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("secret is not valid standard base64") from None
    if base64.b64encode(key).decode("ascii") != text:
        # Non-canonical encodings (stray bits in the last char) would let two strings name the
        # same key; refusing them keeps "same secret" a plain string comparison.
        raise ValueError("secret is not canonical base64")
    if prefixed:
        if not WHSEC_MIN_BYTES <= len(key) <= WHSEC_MAX_BYTES:
            raise ValueError(
                f"whsec_ secret must decode to {WHSEC_MIN_BYTES}-{WHSEC_MAX_BYTES} bytes"
            )
    elif len(key) != ROTATOR_SECRET_BYTES:
        raise ValueError(f"secret must decode to exactly {ROTATOR_SECRET_BYTES} bytes")
    return key


def signature_headers(
    *,
    endpoint_key: bytes,
    msg_id: str,
    timestamp: int,
    body: bytes,
    org_keys: Sequence[bytes] = (),
) -> dict[str, str]:
    """Every signature header of one delivery attempt, built from one timestamp.

    Building them together guarantees both schemes (and the org signature) cover the same
    ``t``; callers pass a fresh timestamp per attempt so retries are never rejected as stale.
    ``org_keys`` is current first, then the previous key while it is still valid.
    """
    if isinstance(org_keys, bytes | bytearray):
        raise TypeError("org_keys must be a sequence of keys, not a single key")
    headers = {
        AMCORE_SIGNATURE_HEADER: amcore_header(
            timestamp, [sign_amcore(endpoint_key, timestamp, body)]
        ),
        WEBHOOK_ID_HEADER: msg_id,
        WEBHOOK_TIMESTAMP_HEADER: str(timestamp),
        WEBHOOK_SIGNATURE_HEADER: sign_standard(endpoint_key, msg_id, timestamp, body),
    }
    if org_keys:
        headers[AMCORE_ORG_SIGNATURE_HEADER] = amcore_header(
            timestamp, [sign_amcore(key, timestamp, body) for key in org_keys]
        )
    return headers
