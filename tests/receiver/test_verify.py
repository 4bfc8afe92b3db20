import base64
import dataclasses
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from receiver import (
    BadSignature,
    MalformedHeader,
    MissingHeaders,
    StaleTimestamp,
    VerificationError,
    VerifiedDelivery,
    decode_secret,
    parse_event,
    sign_amcore,
    sign_standard,
    signature_headers,
    verify,
)

NOW = 1_714_000_000
OLD_SECRET = "BU3aA56KLn/gYzL+2yE0kZ9wD3jA2QAnLaWKkjNl8Z0="
NEW_SECRET = base64.b64encode(bytes(range(32))).decode()
UNRELATED_SECRET = base64.b64encode(b"u" * 32).decode()
ORG_CURRENT = base64.b64encode(b"c" * 32).decode()
ORG_PREVIOUS = base64.b64encode(b"p" * 32).decode()
BODY = b'{"id":"evt_1","type":"campaign.approved","data":{"campaign_id":"c1"}}'
MSG_ID = "evt_1"

Scheme = Literal["standard", "amcore", "org"]
STANDARD = ("webhook-id", "webhook-timestamp", "webhook-signature")


def signed(
    secret: str = OLD_SECRET,
    *,
    body: bytes = BODY,
    timestamp: int = NOW,
    org: tuple[str, ...] = (),
) -> dict[str, str]:
    return signature_headers(
        endpoint_key=decode_secret(secret),
        msg_id=MSG_ID,
        timestamp=timestamp,
        body=body,
        org_keys=[decode_secret(s) for s in org],
    )


def only(headers: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in names}


def amcore_hex(secret: str, timestamp: int = NOW, body: bytes = BODY) -> str:
    return sign_amcore(decode_secret(secret), timestamp, body)


def standard_sig(secret: str, timestamp: int = NOW, body: bytes = BODY) -> str:
    return sign_standard(decode_secret(secret), MSG_ID, timestamp, body)


# --- happy paths ------------------------------------------------------------------------------


def test_auto_prefers_standard_webhooks() -> None:
    result = verify(signed(), BODY, [OLD_SECRET], now=NOW)
    assert result == VerifiedDelivery("standard", NOW, MSG_ID, 0)


def test_auto_falls_back_to_amcore() -> None:
    headers = only(signed(), "X-AmCore-Signature")
    assert verify(headers, BODY, [OLD_SECRET], now=NOW) == VerifiedDelivery("amcore", NOW, None, 0)


def test_auto_falls_back_to_amcore_when_standard_set_incomplete() -> None:
    headers = only(signed(), "X-AmCore-Signature", "webhook-id")
    assert verify(headers, BODY, [OLD_SECRET], now=NOW).scheme == "amcore"


def test_explicit_amcore_ignores_standard_headers() -> None:
    headers = signed()
    headers["webhook-signature"] = "v1," + base64.b64encode(b"\0" * 32).decode()
    assert verify(headers, BODY, [OLD_SECRET], now=NOW, scheme="amcore").scheme == "amcore"


def test_header_names_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in signed().items()}
    assert verify(headers, BODY, [OLD_SECRET], now=NOW).scheme == "standard"
    lower = {k.lower(): v for k, v in only(signed(), "X-AmCore-Signature").items()}
    assert verify(lower, BODY, [OLD_SECRET], now=NOW).scheme == "amcore"


def test_raw_key_bytes_and_whsec_secrets_accepted() -> None:
    key = decode_secret(OLD_SECRET)
    assert verify(signed(), BODY, [key], now=NOW).secret_index == 0
    assert verify(signed(), BODY, ["whsec_" + OLD_SECRET], now=NOW).secret_index == 0


def test_default_now_is_the_clock() -> None:
    t = int(time.time())
    assert verify(signed(timestamp=t), BODY, [OLD_SECRET]).timestamp == t


def test_accepts_headers_signed_by_standardwebhooks_library() -> None:
    t = int(time.time())
    sig = Webhook(OLD_SECRET).sign(MSG_ID, datetime.fromtimestamp(t, tz=UTC), BODY.decode())
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(t), "webhook-signature": sig}
    assert verify(headers, BODY, [OLD_SECRET]) == VerifiedDelivery("standard", t, MSG_ID, 0)


def test_result_is_frozen() -> None:
    result = verify(signed(), BODY, [OLD_SECRET], now=NOW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.secret_index = 1  # type: ignore[misc]


# --- missing headers --------------------------------------------------------------------------


def test_no_headers_at_all() -> None:
    with pytest.raises(MissingHeaders) as info:
        verify({"Content-Type": "application/json"}, BODY, [OLD_SECRET], now=NOW)
    assert info.value.missing == (*STANDARD, "X-AmCore-Signature")


def test_standard_scheme_names_the_missing_headers() -> None:
    headers = only(signed(), "webhook-id")
    with pytest.raises(MissingHeaders) as info:
        verify(headers, BODY, [OLD_SECRET], now=NOW, scheme="standard")
    assert info.value.missing == ("webhook-timestamp", "webhook-signature")


def test_amcore_scheme_missing_header() -> None:
    headers = only(signed(), *STANDARD)
    with pytest.raises(MissingHeaders) as info:
        verify(headers, BODY, [OLD_SECRET], now=NOW, scheme="amcore")
    assert info.value.missing == ("X-AmCore-Signature",)


def test_org_scheme_missing_header() -> None:
    with pytest.raises(MissingHeaders) as info:
        verify(signed(), BODY, [ORG_CURRENT], now=NOW, scheme="org")
    assert info.value.missing == ("X-AmCore-Org-Signature",)


def test_empty_header_value_counts_as_missing() -> None:
    headers = signed()
    headers["webhook-signature"] = "  "
    with pytest.raises(MissingHeaders) as info:
        verify(headers, BODY, [OLD_SECRET], now=NOW, scheme="standard")
    assert info.value.missing == ("webhook-signature",)


# --- malformed headers ------------------------------------------------------------------------

GOOD_HEX = "ab" * 32


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        f"v1={GOOD_HEX}",  # no t
        f"t={NOW}",  # no v1
        f"t={NOW},v0={GOOD_HEX}",  # no v1 among known entries
        f"t=abc,v1={GOOD_HEX}",
        f"t=-5,v1={GOOD_HEX}",
        f"t=1.5,v1={GOOD_HEX}",
        f"t={'9' * 40},v1={GOOD_HEX}",
        f"t={NOW},t={NOW},v1={GOOD_HEX}",
        f"t={NOW},v1={GOOD_HEX},",
        f"t={NOW},v1=zz",
        f"t={NOW},v1={GOOD_HEX[:-2]}",
        f"t={NOW},v1={base64.b64encode(bytes(32)).decode()}",
    ],
)
def test_malformed_amcore_header(value: str) -> None:
    with pytest.raises(MalformedHeader, match="X-AmCore-Signature"):
        verify({"X-AmCore-Signature": value}, BODY, [OLD_SECRET], now=NOW)


@pytest.mark.parametrize(
    "value",
    [
        "v1",
        ",abc",
        "v1,not*base64",
        "v1," + base64.b64encode(b"short").decode(),
        "v2," + base64.b64encode(bytes(32)).decode(),  # no v1 at all
    ],
)
def test_malformed_standard_signature(value: str) -> None:
    headers = signed()
    headers["webhook-signature"] = value
    with pytest.raises(MalformedHeader, match="webhook-signature"):
        verify(headers, BODY, [OLD_SECRET], now=NOW)


@pytest.mark.parametrize("value", ["abc", "-1", "1614265330.5", "1e9", "٣٤٥", "1" * 16])
def test_malformed_standard_timestamp(value: str) -> None:
    headers = signed()
    headers["webhook-timestamp"] = value
    with pytest.raises(MalformedHeader, match="webhook-timestamp"):
        verify(headers, BODY, [OLD_SECRET], now=NOW)


def test_conflicting_duplicate_headers_are_malformed() -> None:
    headers = only(signed(), "X-AmCore-Signature")
    headers["x-amcore-signature"] = f"t={NOW},v1={GOOD_HEX}"
    with pytest.raises(MalformedHeader, match="conflicting"):
        verify(headers, BODY, [OLD_SECRET], now=NOW)


# --- stale timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["standard", "amcore"])
def test_too_old(scheme: Scheme) -> None:
    headers = signed(timestamp=NOW - 301)
    with pytest.raises(StaleTimestamp, match="past"):
        verify(headers, BODY, [OLD_SECRET], now=NOW, scheme=scheme)


@pytest.mark.parametrize("scheme", ["standard", "amcore"])
def test_too_new(scheme: Scheme) -> None:
    headers = signed(timestamp=NOW + 301)
    with pytest.raises(StaleTimestamp, match="future"):
        verify(headers, BODY, [OLD_SECRET], now=NOW, scheme=scheme)


def test_stale_org_signature() -> None:
    headers = signed(timestamp=NOW - 3600, org=(ORG_CURRENT,))
    with pytest.raises(StaleTimestamp):
        verify(headers, BODY, [ORG_CURRENT], now=NOW, scheme="org")


def test_tolerance_edges_are_inclusive() -> None:
    assert verify(signed(timestamp=NOW - 300), BODY, [OLD_SECRET], now=NOW).timestamp == NOW - 300
    assert verify(signed(timestamp=NOW + 300), BODY, [OLD_SECRET], now=NOW).timestamp == NOW + 300


def test_custom_tolerance() -> None:
    headers = signed(timestamp=NOW - 10)
    with pytest.raises(StaleTimestamp):
        verify(headers, BODY, [OLD_SECRET], now=NOW, tolerance_s=5)
    assert verify(headers, BODY, [OLD_SECRET], now=NOW, tolerance_s=10).timestamp == NOW - 10


# --- bad signatures ---------------------------------------------------------------------------


def assert_no_secret_material(exc: VerificationError, secret: str, timestamp: int = NOW) -> None:
    text = f"{exc!s} {exc!r}"
    key = decode_secret(secret)
    for leak in (
        secret,
        key.hex(),
        amcore_hex(secret, timestamp),
        standard_sig(secret, timestamp).removeprefix("v1,"),
    ):
        assert leak not in text


@pytest.mark.parametrize("scheme", ["standard", "amcore"])
def test_wrong_secret(scheme: Scheme) -> None:
    with pytest.raises(BadSignature) as info:
        verify(signed(), BODY, [UNRELATED_SECRET], now=NOW, scheme=scheme)
    assert_no_secret_material(info.value, UNRELATED_SECRET)
    assert_no_secret_material(info.value, OLD_SECRET)


@pytest.mark.parametrize("scheme", ["standard", "amcore"])
def test_tampered_body(scheme: Scheme) -> None:
    tampered = BODY.replace(b"c1", b"c2")
    assert tampered != BODY
    with pytest.raises(BadSignature):
        verify(signed(), tampered, [OLD_SECRET], now=NOW, scheme=scheme)


def test_timestamp_swapped_without_resigning() -> None:
    headers = signed(timestamp=NOW - 1000)
    headers["webhook-timestamp"] = str(NOW)
    with pytest.raises(BadSignature):
        verify(headers, BODY, [OLD_SECRET], now=NOW)
    amcore = {"X-AmCore-Signature": f"t={NOW},v1={amcore_hex(OLD_SECRET, NOW - 1000)}"}
    with pytest.raises(BadSignature):
        verify(amcore, BODY, [OLD_SECRET], now=NOW)


def test_message_id_swapped() -> None:
    headers = signed()
    headers["webhook-id"] = "evt_2"
    with pytest.raises(BadSignature):
        verify(headers, BODY, [OLD_SECRET], now=NOW)


def test_endpoint_signature_is_not_an_org_signature() -> None:
    headers = signed()
    headers["X-AmCore-Org-Signature"] = headers["X-AmCore-Signature"]
    with pytest.raises(BadSignature):
        verify(headers, BODY, [ORG_CURRENT], now=NOW, scheme="org")


def test_uppercase_hex_is_accepted() -> None:
    headers = {"X-AmCore-Signature": f"t={NOW},v1={amcore_hex(OLD_SECRET).upper()}"}
    assert verify(headers, BODY, [OLD_SECRET], now=NOW).scheme == "amcore"


# --- several v1 entries -----------------------------------------------------------------------


def test_standard_second_v1_matches() -> None:
    wrong = standard_sig(UNRELATED_SECRET)
    right = standard_sig(OLD_SECRET)
    headers = signed()
    headers["webhook-signature"] = f"{wrong} {right}"
    assert verify(headers, BODY, [OLD_SECRET], now=NOW).secret_index == 0
    headers["webhook-signature"] = f"{wrong} {wrong}"
    with pytest.raises(BadSignature):
        verify(headers, BODY, [OLD_SECRET], now=NOW)


def test_standard_unknown_versions_are_skipped() -> None:
    headers = signed()
    headers["webhook-signature"] = f"v1a,c29tZXRoaW5n  {standard_sig(OLD_SECRET)}"
    assert verify(headers, BODY, [OLD_SECRET], now=NOW).scheme == "standard"


def test_amcore_second_v1_matches() -> None:
    value = f"t={NOW},v1={amcore_hex(UNRELATED_SECRET)},v1={amcore_hex(OLD_SECRET)}"
    result = verify({"X-AmCore-Signature": value}, BODY, [OLD_SECRET], now=NOW)
    assert result == VerifiedDelivery("amcore", NOW, None, 0)
    with pytest.raises(BadSignature):
        verify({"X-AmCore-Signature": value}, BODY, [NEW_SECRET], now=NOW)


def test_amcore_tolerates_spaces_and_unknown_keys() -> None:
    value = f"t={NOW}, v0=zz, v1={amcore_hex(OLD_SECRET)}"
    assert verify({"X-AmCore-Signature": value}, BODY, [OLD_SECRET], now=NOW).timestamp == NOW


# --- rotated secret lists ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["standard", "amcore"])
def test_rotation_old_secret_still_verifies(scheme: Scheme) -> None:
    headers = signed(OLD_SECRET)
    result = verify(headers, BODY, [NEW_SECRET, OLD_SECRET], now=NOW, scheme=scheme)
    assert result.secret_index == 1
    new_headers = signed(NEW_SECRET)
    result = verify(new_headers, BODY, [NEW_SECRET, OLD_SECRET], now=NOW, scheme=scheme)
    assert result.secret_index == 0


@pytest.mark.parametrize("scheme", ["standard", "amcore"])
def test_rotation_unrelated_secret_does_not_verify(scheme: Scheme) -> None:
    headers = signed(UNRELATED_SECRET)
    with pytest.raises(BadSignature) as info:
        verify(headers, BODY, [NEW_SECRET, OLD_SECRET], now=NOW, scheme=scheme)
    for secret in (NEW_SECRET, OLD_SECRET):
        assert_no_secret_material(info.value, secret)


# --- org signature ----------------------------------------------------------------------------


def test_org_signature_with_two_v1_entries() -> None:
    headers = signed(org=(ORG_CURRENT, ORG_PREVIOUS))
    value = headers["X-AmCore-Org-Signature"]
    assert value.count("v1=") == 2
    assert value == (f"t={NOW},v1={amcore_hex(ORG_CURRENT)},v1={amcore_hex(ORG_PREVIOUS)}")
    # a receiver that has not picked up the new org secret yet still verifies via the 2nd entry
    assert verify(headers, BODY, [ORG_PREVIOUS], now=NOW, scheme="org") == VerifiedDelivery(
        "org", NOW, None, 0
    )
    assert verify(headers, BODY, [ORG_CURRENT], now=NOW, scheme="org").secret_index == 0
    assert (
        verify(headers, BODY, [UNRELATED_SECRET, ORG_PREVIOUS], now=NOW, scheme="org").secret_index
        == 1
    )
    with pytest.raises(BadSignature):
        verify(headers, BODY, [UNRELATED_SECRET, OLD_SECRET], now=NOW, scheme="org")
    # the endpoint signature in the same delivery is unaffected
    assert verify(headers, BODY, [OLD_SECRET], now=NOW).scheme == "standard"


def test_org_signature_with_only_the_current_key() -> None:
    headers = signed(org=(ORG_CURRENT,))
    with pytest.raises(BadSignature):
        verify(headers, BODY, [ORG_PREVIOUS], now=NOW, scheme="org")


def test_org_signature_tampered_body() -> None:
    headers = signed(org=(ORG_CURRENT, ORG_PREVIOUS))
    with pytest.raises(BadSignature):
        verify(headers, BODY + b" ", [ORG_CURRENT, ORG_PREVIOUS], now=NOW, scheme="org")


# --- caller mistakes are not verification failures --------------------------------------------


def test_single_string_instead_of_list() -> None:
    with pytest.raises(TypeError):
        verify(signed(), BODY, OLD_SECRET, now=NOW)


def test_no_secrets() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        verify(signed(), BODY, [], now=NOW)


def test_invalid_secret_is_a_value_error_without_echo() -> None:
    with pytest.raises(ValueError, match="secret") as info:
        verify(signed(), BODY, ["not-a-secret"], now=NOW)
    assert not isinstance(info.value, VerificationError)
    assert "not-a-secret" not in str(info.value)


def test_body_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        verify(signed(), BODY.decode(), [OLD_SECRET], now=NOW)  # type: ignore[arg-type]


def test_bad_tolerance_and_scheme() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        verify(signed(), BODY, [OLD_SECRET], now=NOW, tolerance_s=-1)
    with pytest.raises(ValueError, match="scheme"):
        verify(signed(), BODY, [OLD_SECRET], now=NOW, scheme="hmac")  # type: ignore[arg-type]


def test_exception_hierarchy() -> None:
    for exc in (MissingHeaders, MalformedHeader, StaleTimestamp, BadSignature):
        assert issubclass(exc, VerificationError)
        assert not issubclass(exc, ValueError)


# --- parse_event ------------------------------------------------------------------------------


def test_parse_event() -> None:
    event = parse_event(BODY)
    assert event == {"id": "evt_1", "type": "campaign.approved", "data": {"campaign_id": "c1"}}
    with pytest.raises(ValueError, match="JSON object"):
        parse_event(b"[1, 2]")


# --- properties -------------------------------------------------------------------------------

keys = st.binary(min_size=1, max_size=64)
bodies = st.binary(max_size=512)
timestamps = st.integers(min_value=0, max_value=10**12)
msg_ids = st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True)


@given(key=keys, body=bodies, timestamp=timestamps, msg_id=msg_ids, org_key=keys)
def test_sign_then_verify_round_trips(
    key: bytes, body: bytes, timestamp: int, msg_id: str, org_key: bytes
) -> None:
    headers = signature_headers(
        endpoint_key=key, msg_id=msg_id, timestamp=timestamp, body=body, org_keys=[org_key]
    )
    assert verify(headers, body, [key], now=timestamp) == VerifiedDelivery(
        "standard", timestamp, msg_id, 0
    )
    assert verify(headers, body, [key], now=timestamp, scheme="amcore") == VerifiedDelivery(
        "amcore", timestamp, None, 0
    )
    assert verify(headers, body, [org_key], now=timestamp, scheme="org") == VerifiedDelivery(
        "org", timestamp, None, 0
    )
    # and the Standard Webhooks signature is the textbook HMAC
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()


@given(
    key=keys,
    body=st.binary(min_size=1, max_size=512),
    timestamp=timestamps,
    data=st.data(),
)
def test_flipping_any_body_byte_fails(
    key: bytes, body: bytes, timestamp: int, data: st.DataObject
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(body) - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    tampered = bytearray(body)
    tampered[index] ^= mask
    headers = signature_headers(
        endpoint_key=key, msg_id="evt_p", timestamp=timestamp, body=body, org_keys=[key]
    )
    schemes: tuple[Scheme, ...] = ("standard", "amcore", "org")
    for scheme in schemes:
        with pytest.raises(BadSignature):
            verify(headers, bytes(tampered), [key], now=timestamp, scheme=scheme)
