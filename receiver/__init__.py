"""What a webhook receiver needs to trust a Rotator delivery: both signature schemes, and a
small demo receiver server (``receiver.server``, run by ``rotator receiver``).

Importable on its own (standard library and ``cryptography`` only), so receivers can depend on
it without the rest of Rotator; the workers sign with the same functions.
"""

from receiver.handoff import (
    Handoff,
    HandoffError,
    UnverifiedHandoffWarning,
    open_handoff,
    open_handoff_delivery,
    seal_handoff,
)
from receiver.server import AcceptedDelivery, DemoReceiver, run, serve
from receiver.signing import (
    AMCORE_ORG_SIGNATURE_HEADER,
    AMCORE_SIGNATURE_HEADER,
    WEBHOOK_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    amcore_header,
    decode_secret,
    sign_amcore,
    sign_standard,
    signature_headers,
)
from receiver.verify import (
    BadSignature,
    MalformedHeader,
    MissingHeaders,
    StaleTimestamp,
    VerificationError,
    VerifiedDelivery,
    parse_event,
    verify,
)

__all__ = [
    "open_handoff",
    "open_handoff_delivery",
    "seal_handoff",
    "UnverifiedHandoffWarning",
    "AMCORE_ORG_SIGNATURE_HEADER",
    "AMCORE_SIGNATURE_HEADER",
    "WEBHOOK_ID_HEADER",
    "WEBHOOK_SIGNATURE_HEADER",
    "WEBHOOK_TIMESTAMP_HEADER",
    "AcceptedDelivery",
    "Handoff",
    "HandoffError",
    "BadSignature",
    "DemoReceiver",
    "MalformedHeader",
    "MissingHeaders",
    "StaleTimestamp",
    "VerificationError",
    "VerifiedDelivery",
    "amcore_header",
    "decode_secret",
    "parse_event",
    "run",
    "serve",
    "sign_amcore",
    "sign_standard",
    "signature_headers",
    "verify",
]
