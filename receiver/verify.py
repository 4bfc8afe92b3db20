"""Receiver-side verification of Rotator deliveries, for both signature schemes.

The byte layouts come from ``receiver.signing`` (the same code the workers sign with), so a
delivery Rotator sends always verifies here. Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from receiver.signing import (
    AMCORE_ORG_SIGNATURE_HEADER,
    AMCORE_SIGNATURE_HEADER,
    WEBHOOK_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    amcore_payload,
    decode_secret,
    standard_payload,
)

__all__ = [
    "BadSignature",
    "MalformedHeader",
    "MissingHeaders",
    "Scheme",
    "StaleTimestamp",
    "VerificationError",
    "VerifiedDelivery",
    "parse_event",
    "verify",
]

Scheme = Literal["amcore", "standard", "org"]

DEFAULT_TOLERANCE_S = 300
_SHA256_BYTES = 32
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Unix seconds fit in far fewer digits; the cap keeps int() cheap on hostile input.
_MAX_TIMESTAMP_DIGITS = 15
_STANDARD_HEADERS = (WEBHOOK_ID_HEADER, WEBHOOK_TIMESTAMP_HEADER, WEBHOOK_SIGNATURE_HEADER)


class VerificationError(Exception):
    """Base of every reason to reject a delivery; catch this one to answer 400/401.

    Messages name the problem only: never a secret, a computed signature or a header value.
    """


class MissingHeaders(VerificationError):
    """The headers the chosen scheme needs are absent (or empty)."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing: tuple[str, ...] = tuple(missing)
        super().__init__("missing signature headers: " + ", ".join(self.missing))


class MalformedHeader(VerificationError):
    """A signature header is present but cannot be parsed."""


class StaleTimestamp(VerificationError):
    """The signed timestamp is outside the tolerance window, so this may be a replay."""


class BadSignature(VerificationError):
    """No signature in the header matches any of the given secrets."""


@dataclass(frozen=True, slots=True)
class VerifiedDelivery:
    """What was proven about a delivery, so callers can log which secret still gets used
    (``secret_index``) and deduplicate on ``msg_id`` (Standard Webhooks only; None otherwise).
    """

    scheme: Scheme
    timestamp: int
    msg_id: str | None
    secret_index: int


def _normalise_headers(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in out and out[key] != value:
            # Two different values for one header: trusting either would be a guess.
            raise MalformedHeader(f"conflicting values for header {key}")
        out[key] = value
    return out


def _get(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name.lower())
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse_timestamp(value: str, header: str) -> int:
    value = value.strip()
    if not (0 < len(value) <= _MAX_TIMESTAMP_DIGITS and value.isascii() and value.isdigit()):
        raise MalformedHeader(f"{header}: timestamp must be unix seconds")
    return int(value)


def _parse_amcore(value: str, header: str) -> tuple[int, list[bytes]]:
    timestamp: int | None = None
    signatures: list[bytes] = []
    for part in value.split(","):
        key, sep, item = part.partition("=")
        key, item = key.strip(), item.strip()
        if not sep or not key:
            raise MalformedHeader(f"{header}: expected comma-separated key=value pairs")
        if key == "t":
            if timestamp is not None:
                raise MalformedHeader(f"{header}: more than one t=")
            timestamp = _parse_timestamp(item, header)
        elif key == "v1":
            if _HEX_SHA256.fullmatch(item) is None:
                raise MalformedHeader(f"{header}: v1 must be 64 hex characters")
            signatures.append(bytes.fromhex(item))
        # Other keys (future versions) are skipped, so a new scheme can be added alongside v1.
    if timestamp is None:
        raise MalformedHeader(f"{header}: no t=")
    if not signatures:
        raise MalformedHeader(f"{header}: no v1= signature")
    return timestamp, signatures


def _parse_standard_signatures(value: str) -> list[bytes]:
    signatures: list[bytes] = []
    for entry in value.split():
        version, sep, encoded = entry.partition(",")
        if not sep or not version:
            raise MalformedHeader(f"{WEBHOOK_SIGNATURE_HEADER}: expected 'v1,<base64>' entries")
        if version != "v1":
            continue  # e.g. v1a (asymmetric): not ours to check, not an error either
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedHeader(f"{WEBHOOK_SIGNATURE_HEADER}: v1 is not base64") from None
        if len(raw) != _SHA256_BYTES:
            raise MalformedHeader(f"{WEBHOOK_SIGNATURE_HEADER}: v1 is not an HMAC-SHA256")
        signatures.append(raw)
    if not signatures:
        raise MalformedHeader(f"{WEBHOOK_SIGNATURE_HEADER}: no v1 signature")
    return signatures


def _check_fresh(timestamp: int, now: float, tolerance_s: int) -> None:
    if timestamp < now - tolerance_s:
        raise StaleTimestamp(f"timestamp is more than {tolerance_s}s in the past")
    if timestamp > now + tolerance_s:
        raise StaleTimestamp(f"timestamp is more than {tolerance_s}s in the future")


def _match(keys: Sequence[bytes], payload: bytes, candidates: Sequence[bytes]) -> int:
    for index, key in enumerate(keys):
        expected = hmac.new(key, payload, hashlib.sha256).digest()
        matched = False
        for candidate in candidates:
            # No short-circuit: every comparison runs, each one constant-time.
            matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return index
    raise BadSignature("no signature matches any of the given secrets")


def _keys(secrets: Sequence[str | bytes]) -> list[bytes]:
    if isinstance(secrets, str | bytes | bytearray):
        # A lone string is a Sequence too; iterating its characters would be a silent bug.
        raise TypeError("secrets must be a sequence of secrets, not a single secret")
    keys: list[bytes] = []
    for secret in secrets:
        key = decode_secret(secret) if isinstance(secret, str) else bytes(secret)
        if not key:
            raise ValueError("a secret must not be empty")
        keys.append(key)
    if not keys:
        raise ValueError("at least one secret is required")
    return keys


def _pick_scheme(headers: Mapping[str, str]) -> Scheme:
    if all(_get(headers, name) is not None for name in _STANDARD_HEADERS):
        return "standard"
    if _get(headers, AMCORE_SIGNATURE_HEADER) is not None:
        return "amcore"
    missing = [n for n in (*_STANDARD_HEADERS, AMCORE_SIGNATURE_HEADER) if _get(headers, n) is None]
    raise MissingHeaders(missing)


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Sequence[str | bytes],
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
    scheme: Literal["auto", "amcore", "standard", "org"] = "auto",
) -> VerifiedDelivery:
    """Prove a delivery came from Rotator, recently, before acting on its body.

    ``body`` must be the raw request bytes: re-serialised JSON will not match. ``secrets`` may
    hold several entries so a receiver keeps accepting the old secret while a rotation is in
    flight; ``secret_index`` in the result tells which one matched, so the old one can be
    dropped once it stops matching. ``tolerance_s`` bounds replay of captured deliveries.
    ``"auto"`` prefers Standard Webhooks headers and falls back to ``X-AmCore-Signature``;
    ``"org"`` checks ``X-AmCore-Org-Signature`` against organization secrets instead.

    Raises a ``VerificationError`` subclass for a delivery to reject, and ``ValueError`` /
    ``TypeError`` for a misconfigured caller (bad secret, no secrets), so the two never blur.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError("body must be the raw request bytes")
    if tolerance_s < 0:
        raise ValueError("tolerance_s must not be negative")
    if scheme not in ("auto", "amcore", "standard", "org"):
        raise ValueError("scheme must be one of auto, amcore, standard, org")
    keys = _keys(secrets)
    current = time.time() if now is None else now
    raw = bytes(body)
    lowered = _normalise_headers(headers)

    chosen: Scheme = _pick_scheme(lowered) if scheme == "auto" else scheme
    if chosen == "standard":
        msg_id = _get(lowered, WEBHOOK_ID_HEADER)
        stamp = _get(lowered, WEBHOOK_TIMESTAMP_HEADER)
        sig = _get(lowered, WEBHOOK_SIGNATURE_HEADER)
        if msg_id is None or stamp is None or sig is None:
            raise MissingHeaders([n for n in _STANDARD_HEADERS if _get(lowered, n) is None])
        timestamp = _parse_timestamp(stamp, WEBHOOK_TIMESTAMP_HEADER)
        candidates = _parse_standard_signatures(sig)
        _check_fresh(timestamp, current, tolerance_s)
        index = _match(keys, standard_payload(msg_id, timestamp, raw), candidates)
        return VerifiedDelivery("standard", timestamp, msg_id, index)

    header = AMCORE_ORG_SIGNATURE_HEADER if chosen == "org" else AMCORE_SIGNATURE_HEADER
    value = _get(lowered, header)
    if value is None:
        raise MissingHeaders([header])
    timestamp, candidates = _parse_amcore(value, header)
    _check_fresh(timestamp, current, tolerance_s)
    index = _match(keys, amcore_payload(timestamp, raw), candidates)
    return VerifiedDelivery(chosen, timestamp, None, index)


def parse_event(body: bytes) -> dict[str, Any]:
    """Decode a body only after ``verify`` accepted it; refuses anything but a JSON object so
    handlers can index it without type checks.
    """
    event = json.loads(body)
    if not isinstance(event, dict):
        raise ValueError("event body must be a JSON object")
    return event
