"""A handed-off secret is installed only when the org signature verifies, where the receiver
knows its organization's secret(s); without one, the handoff is trusted with a warning."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver import (
    AcceptedDelivery,
    BadSignature,
    DemoReceiver,
    HandoffError,
    MissingHeaders,
    UnverifiedHandoffWarning,
    decode_secret,
    open_handoff,
    open_handoff_delivery,
    seal_handoff,
    signature_headers,
    verify,
)
from receiver.handoff import HANDOFF_EVENT

OLD_SECRET = base64.b64encode(bytes(range(100, 132))).decode()
NEW_SECRET = base64.b64encode(bytes(range(200, 232))).decode()
PLANTED_SECRET = base64.b64encode(b"p" * 32).decode()
ORG_SECRET = base64.b64encode(b"o" * 32).decode()
PREVIOUS_ORG_SECRET = base64.b64encode(b"q" * 32).decode()
FORGED_ORG_SECRET = base64.b64encode(b"f" * 32).decode()
EVENT_ID = "evt_0190a5a0-1111-7000-8000-000000000001"


def handoff_body(new_secret: str = NEW_SECRET) -> bytes:
    data = seal_handoff(
        old_secret=OLD_SECRET,
        new_secret=new_secret,
        event_id=EVENT_ID,
        old_endpoint_id="0190a5a0-2222-7000-8000-000000000002",
        new_endpoint_id="0190a5a0-3333-7000-8000-000000000003",
    )
    event = {
        "id": EVENT_ID,
        "type": HANDOFF_EVENT,
        "api_version": "2026-04-01",
        "created_at": "2026-04-01T00:00:00Z",
        "org_id": "0190a5a0-0000-7000-8000-000000000000",
        "data": data,
    }
    return json.dumps(event).encode()


def signed(body: bytes, *org_secrets: str) -> dict[str, str]:
    """Headers exactly as the workers sign a delivery (receiver.signing.signature_headers)."""
    return signature_headers(
        endpoint_key=decode_secret(OLD_SECRET),
        msg_id=EVENT_ID,
        timestamp=int(time.time()),
        body=body,
        org_keys=[decode_secret(secret) for secret in org_secrets],
    )


# --- the kit --------------------------------------------------------------------------------


def test_with_org_secrets_a_handoff_signed_by_the_org_opens_without_a_warning(recwarn):
    body = handoff_body()
    handoff = open_handoff_delivery(
        signed(body, ORG_SECRET), body, [OLD_SECRET], org_secrets=[ORG_SECRET]
    )
    assert handoff.secret == NEW_SECRET
    assert not [w for w in recwarn if issubclass(w.category, UnverifiedHandoffWarning)]


def test_the_previous_org_secret_still_admits_a_handoff_during_its_window():
    body = handoff_body()
    headers = signed(body, ORG_SECRET, PREVIOUS_ORG_SECRET)
    handoff = open_handoff_delivery(headers, body, [OLD_SECRET], org_secrets=[PREVIOUS_ORG_SECRET])
    assert handoff.secret == NEW_SECRET


@pytest.mark.parametrize(
    ("org_signers", "error"),
    [((), MissingHeaders), ((FORGED_ORG_SECRET,), BadSignature)],
    ids=["no-org-signature", "forged-org-signature"],
)
def test_a_holder_of_the_old_secret_alone_cannot_plant_a_secret(org_signers, error):
    # Whoever holds the old endpoint secret can seal and sign a handoff of their own making...
    body = handoff_body(new_secret=PLANTED_SECRET)
    headers = signed(body, *org_signers)
    # ...which the endpoint signature alone would accept:
    with pytest.warns(UnverifiedHandoffWarning):
        assert open_handoff_delivery(headers, body, [OLD_SECRET], org_secrets=()).secret == (
            PLANTED_SECRET
        )
    # A receiver that knows the org secret refuses it.
    with pytest.raises(error):
        open_handoff_delivery(headers, body, [OLD_SECRET], org_secrets=[ORG_SECRET])


def test_open_handoff_warns_without_an_org_signature_and_takes_only_an_org_one():
    body = handoff_body()
    headers = signed(body, ORG_SECRET)
    event = json.loads(body)
    with pytest.warns(UnverifiedHandoffWarning):
        assert open_handoff(event, OLD_SECRET).secret == NEW_SECRET
    endpoint_proof = verify(headers, body, [OLD_SECRET])
    with pytest.raises(HandoffError):
        open_handoff(event, OLD_SECRET, org_signature=endpoint_proof)
    org_proof = verify(headers, body, [ORG_SECRET], scheme="org")
    assert open_handoff(event, OLD_SECRET, org_signature=org_proof).secret == NEW_SECRET


# --- the demo receiver ----------------------------------------------------------------------


def test_the_demo_with_an_org_secret_installs_only_org_signed_handoffs():
    out = io.StringIO()
    demo = DemoReceiver([OLD_SECRET], org_secrets=[ORG_SECRET], out=out)
    forged = handoff_body(new_secret=PLANTED_SECRET)
    for headers in (signed(forged), signed(forged, FORGED_ORG_SECRET)):
        status, _ = demo.handle(headers, forged)
        assert status == 401
    assert demo.secrets() == [OLD_SECRET]

    body = handoff_body()
    assert demo.handle(signed(body, ORG_SECRET), body) == (200, {"ok": True})
    assert demo.secrets() == [NEW_SECRET, OLD_SECRET]
    assert "warning" not in out.getvalue()


def test_the_demo_refuses_a_handoff_handed_to_on_event_without_the_org_proof():
    demo = DemoReceiver([OLD_SECRET], org_secrets=[ORG_SECRET], out=io.StringIO())
    body = handoff_body(new_secret=PLANTED_SECRET)
    endpoint_only = AcceptedDelivery(verify(signed(body), body, [OLD_SECRET]), OLD_SECRET)
    with pytest.raises(HandoffError):
        demo.on_event(json.loads(body), endpoint_only)
    assert demo.secrets() == [OLD_SECRET]


def test_the_demo_without_an_org_secret_installs_with_a_warning_line():
    out = io.StringIO()
    demo = DemoReceiver([OLD_SECRET], out=out)
    body = handoff_body()
    assert demo.handle(signed(body, ORG_SECRET), body) == (200, {"ok": True})
    assert demo.secrets() == [NEW_SECRET, OLD_SECRET]
    assert "handoff: warning: trusted on the endpoint signature alone" in out.getvalue()


def test_the_receiver_kit_imports_without_the_rest_of_rotator():
    root = Path(__file__).resolve().parents[2]
    blocked = ["api", "models", "workers", "schedules", "rotator", "sqlalchemy", "pydantic"]
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import json, receiver, receiver.server, receiver.handoff\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert loaded.isdisjoint(blocked)


@pytest.mark.parametrize(("org", "warned"), [([], True), (["--org-secret", ORG_SECRET], False)])
def test_the_demo_command_warns_at_start_when_it_has_no_org_secret(org, warned):
    rotator = Path(sys.executable).parent / "rotator"
    command = [str(rotator), "receiver", "--port", "0", "--secret", OLD_SECRET, *org]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "listening on" in first
        proc.send_signal(2)  # SIGINT: a clean stop
        proc.wait(timeout=30)
        rest = proc.stdout.read()  # through the same buffer readline filled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ("no --org-secret" in rest) is warned
    assert OLD_SECRET not in first + rest
