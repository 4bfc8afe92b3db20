import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from receiver import (
    amcore_header,
    decode_secret,
    sign_amcore,
    sign_standard,
    signature_headers,
)

# Standard Webhooks' published test vector (the reference libraries all check it).
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TIMESTAMP = 1614265330
SW_PAYLOAD = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# Known answer computed outside Python:
#   printf '1700000000\n{"id":"evt_1"}' \
#     | openssl dgst -sha256 -hmac rotator-known-answer-key-32bytes
KA_KEY = b"rotator-known-answer-key-32bytes"
KA_TIMESTAMP = 1700000000
KA_BODY = b'{"id":"evt_1"}'
KA_HEX = "b91580f5593e6cc69d7d2af26c0ac4f35217303117510c07bf044fe516ddcd74"

ROTATOR_SECRET = "BU3aA56KLn/gYzL+2yE0kZ9wD3jA2QAnLaWKkjNl8Z0="  # from the API docs sample


def test_standard_webhooks_public_vector() -> None:
    key = decode_secret(SW_SECRET)
    assert sign_standard(key, SW_MSG_ID, SW_TIMESTAMP, SW_PAYLOAD) == SW_SIGNATURE


def test_sign_amcore_known_answer() -> None:
    assert sign_amcore(KA_KEY, KA_TIMESTAMP, KA_BODY) == KA_HEX


def test_sign_amcore_matches_independent_hmac() -> None:
    key = decode_secret(ROTATOR_SECRET)
    body = b'{"id": "evt_x", "data": {}}'
    expected = hmac.new(key, b"1714000000\n" + body, hashlib.sha256).hexdigest()
    assert sign_amcore(key, 1714000000, body) == expected


def test_sign_standard_matches_independent_hmac() -> None:
    key = decode_secret(ROTATOR_SECRET)
    body = b'{"a":1}'
    mac = hmac.new(key, b"evt_1.1714000000." + body, hashlib.sha256).digest()
    assert sign_standard(key, "evt_1", 1714000000, body) == "v1," + base64.b64encode(mac).decode()


def test_signatures_depend_on_every_input() -> None:
    base = sign_standard(KA_KEY, "evt_1", 100, b"x")
    assert sign_standard(KA_KEY, "evt_2", 100, b"x") != base
    assert sign_standard(KA_KEY, "evt_1", 101, b"x") != base
    assert sign_standard(KA_KEY, "evt_1", 100, b"y") != base
    assert sign_standard(KA_KEY[::-1], "evt_1", 100, b"x") != base
    assert sign_amcore(KA_KEY, 100, b"x") != sign_amcore(KA_KEY, 101, b"x")


def test_amcore_header_single_and_multiple() -> None:
    a, b = "a" * 64, "0123456789abcdef" * 4
    assert amcore_header(1700000000, [a]) == f"t=1700000000,v1={a}"
    assert amcore_header(1700000000, [a, b]) == f"t=1700000000,v1={a},v1={b}"


@pytest.mark.parametrize(
    "signatures",
    [[], ["A" * 64], ["a" * 63], ["a" * 64 + ",v1=" + "b" * 64], ["g" * 64]],
)
def test_amcore_header_refuses_bad_signatures(signatures: list[str]) -> None:
    with pytest.raises(ValueError, match="signature"):
        amcore_header(1, signatures)


def test_amcore_header_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        amcore_header(1, "a" * 64)


def test_signing_refuses_empty_key_negative_time_and_bad_id() -> None:
    with pytest.raises(ValueError, match="empty"):
        sign_amcore(b"", 1, b"x")
    with pytest.raises(ValueError, match="negative"):
        sign_amcore(KA_KEY, -1, b"x")
    for bad_id in ["", "has space", "new\nline", "é"]:
        with pytest.raises(ValueError, match="message id"):
            sign_standard(KA_KEY, bad_id, 1, b"x")


def test_decode_secret_rotator_format() -> None:
    key = decode_secret(ROTATOR_SECRET)
    assert len(key) == 32
    assert base64.b64encode(key).decode() == ROTATOR_SECRET
    assert decode_secret(ROTATOR_SECRET + "\n") == key  # pasted from a file


def test_decode_secret_whsec_format() -> None:
    key = decode_secret(SW_SECRET)
    assert key == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert len(key) == 24
    assert decode_secret("whsec_" + ROTATOR_SECRET) == decode_secret(ROTATOR_SECRET)
    # padding dropped, as some Standard Webhooks tooling does
    assert decode_secret("whsec_" + ROTATOR_SECRET.rstrip("=")) == decode_secret(ROTATOR_SECRET)


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "   ",
        "whsec_",
        "not base64 at all!!",
        "am_live_abcdefghijklmnopqrstuvwxyz01234567",  # an API key pasted by mistake
        "a" * 64,  # hex: valid base64, but 48 bytes
        base64.b64encode(b"k" * 31).decode(),  # wrong length
        ROTATOR_SECRET.replace("+", "-").replace("/", "_"),  # urlsafe alphabet
        ROTATOR_SECRET[:-2] + "1=",  # non-canonical trailing bits
        "whsec_" + base64.b64encode(b"k" * 16).decode(),  # too short for Standard Webhooks
        "whsec_" + base64.b64encode(b"k" * 65).decode(),  # too long
    ],
)
def test_decode_secret_rejects(secret: str) -> None:
    with pytest.raises(ValueError, match="secret") as info:
        decode_secret(secret)
    if secret.strip():
        assert secret.strip() not in str(info.value)


def test_signature_headers_without_org() -> None:
    key = decode_secret(ROTATOR_SECRET)
    body = b'{"id":"evt_1","type":"webhook.test"}'
    headers = signature_headers(endpoint_key=key, msg_id="evt_1", timestamp=1714000000, body=body)
    assert headers == {
        "X-AmCore-Signature": f"t=1714000000,v1={sign_amcore(key, 1714000000, body)}",
        "webhook-id": "evt_1",
        "webhook-timestamp": "1714000000",
        "webhook-signature": sign_standard(key, "evt_1", 1714000000, body),
    }


def test_signature_headers_with_org_keys_in_order() -> None:
    key, org_current, org_previous = b"e" * 32, b"c" * 32, b"p" * 32
    body = b"{}"
    headers = signature_headers(
        endpoint_key=key,
        msg_id="evt_1",
        timestamp=5,
        body=body,
        org_keys=[org_current, org_previous],
    )
    assert headers["X-AmCore-Org-Signature"] == (
        f"t=5,v1={sign_amcore(org_current, 5, body)},v1={sign_amcore(org_previous, 5, body)}"
    )
    assert set(headers) == {
        "X-AmCore-Signature",
        "X-AmCore-Org-Signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }


def test_signature_headers_refuses_single_org_key_as_bytes() -> None:
    with pytest.raises(TypeError):
        signature_headers(
            endpoint_key=b"e",
            msg_id="m",
            timestamp=1,
            body=b"",
            org_keys=b"k",  # type: ignore[arg-type]
        )


# Cross-checks against the independent `standardwebhooks` package. It reads the clock itself,
# so these sign with the current time.


def test_our_headers_verify_with_standardwebhooks_library() -> None:
    body = json.dumps({"id": "evt_0190", "type": "webhook.test", "data": {"n": 1}}).encode()
    headers = signature_headers(
        endpoint_key=decode_secret(ROTATOR_SECRET),
        msg_id="evt_0190",
        timestamp=int(time.time()),
        body=body,
        org_keys=[b"o" * 32],
    )
    payload = Webhook(ROTATOR_SECRET).verify(body, headers)
    assert payload == {"id": "evt_0190", "type": "webhook.test", "data": {"n": 1}}


def test_tampered_body_fails_with_standardwebhooks_library() -> None:
    body = b'{"id":"evt_1","amount":100}'
    headers = signature_headers(
        endpoint_key=decode_secret(ROTATOR_SECRET),
        msg_id="evt_1",
        timestamp=int(time.time()),
        body=body,
    )
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(ROTATOR_SECRET).verify(b'{"id":"evt_1","amount":999}', headers)


def test_wrong_secret_fails_with_standardwebhooks_library() -> None:
    body = b"{}"
    headers = signature_headers(
        endpoint_key=decode_secret(ROTATOR_SECRET),
        msg_id="evt_1",
        timestamp=int(time.time()),
        body=body,
    )
    other = base64.b64encode(b"z" * 32).decode()
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(other).verify(body, headers)


def test_standardwebhooks_library_agrees_on_public_vector() -> None:
    lib = Webhook(SW_SECRET).sign(
        SW_MSG_ID, datetime.fromtimestamp(SW_TIMESTAMP, tz=UTC), SW_PAYLOAD.decode()
    )
    ours = sign_standard(decode_secret(SW_SECRET), SW_MSG_ID, SW_TIMESTAMP, SW_PAYLOAD)
    assert lib == ours == SW_SIGNATURE
