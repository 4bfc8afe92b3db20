"""Secrets at rest (docs/architecture.md, invariant 6 and "Secrets at rest") and API-key hashing.

Ciphertext layout: version byte, 8-byte key id, 12-byte nonce, AES-256-GCM ciphertext+tag.
The key id picks the decrypting key at once, so several configured keys cost nothing; the
associated data binds a ciphertext to its row, so one row's secret cannot be pasted into another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"
_KID_LEN = 8
_NONCE_LEN = 12


class DecryptionError(Exception):
    """No configured key opens this ciphertext (wrong key set, or tampered data)."""


def _kid(key: bytes) -> bytes:
    return hashlib.sha256(b"rotator key id" + key).digest()[:_KID_LEN]


class SecretBox:
    def __init__(self, keys: Sequence[bytes]):
        if not keys:
            raise ValueError("at least one encryption key is required")
        for key in keys:
            if len(key) != 32:
                raise ValueError("encryption keys must be 32 bytes")
        self._primary = keys[0]
        self._by_kid = {_kid(key): AESGCM(key) for key in keys}
        self._primary_kid = _kid(self._primary)

    def encrypt(self, plaintext: bytes, *, context: str) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._by_kid[self._primary_kid].encrypt(nonce, plaintext, context.encode())
        return _VERSION + self._primary_kid + nonce + sealed

    def decrypt(self, blob: bytes, *, context: str) -> bytes:
        if len(blob) < 1 + _KID_LEN + _NONCE_LEN + 16 or blob[:1] != _VERSION:
            raise DecryptionError("unrecognised ciphertext")
        kid = blob[1 : 1 + _KID_LEN]
        nonce = blob[1 + _KID_LEN : 1 + _KID_LEN + _NONCE_LEN]
        aead = self._by_kid.get(kid)
        if aead is None:
            raise DecryptionError("ciphertext was sealed with a key that is not configured")
        try:
            return aead.decrypt(nonce, blob[1 + _KID_LEN + _NONCE_LEN :], context.encode())
        except InvalidTag:
            raise DecryptionError("ciphertext failed authentication") from None

    def is_current(self, blob: bytes) -> bool:
        """Whether ``blob`` is sealed with the encrypting key (``secrets reencrypt`` skips it)."""
        return blob[1 : 1 + _KID_LEN] == self._primary_kid


def hash_api_key(api_key: str) -> str:
    """API keys carry 34 random characters (~175 bits), so a plain SHA-256 is enough."""
    return hashlib.sha256(api_key.encode()).hexdigest()
