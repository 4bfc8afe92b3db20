"""The demo receiver: a real HTTP server on loopback, signed requests sent with httpx."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import (
    AcceptedDelivery,
    DemoReceiver,
    decode_secret,
    serve,
    signature_headers,
)
from tests.processes import BIN, free_port, rotator_env, start, stop, wait_http

OLD_SECRET = "BU3aA56KLn/gYzL+2yE0kZ9wD3jA2QAnLaWKkjNl8Z0="
NEW_SECRET = base64.b64encode(bytes(range(32))).decode()
WRONG_SECRET = base64.b64encode(b"w" * 32).decode()
ORG_SECRET = base64.b64encode(b"o" * 32).decode()
SIGNATURE_HEADERS = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "X-AmCore-Signature",
    "X-AmCore-Org-Signature",
)


def event_body(event_id: str, event_type: str = "campaign.approved") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "type": event_type,
            "api_version": "2026-04-01",
            "created_at": "2026-04-01T00:00:00Z",
            "org_id": "0190a5a0-0000-7000-8000-000000000000",
            "data": {"campaign_id": "c1"},
        }
    ).encode()


def signed(
    body: bytes,
    secret: str = OLD_SECRET,
    *,
    msg_id: str = "evt_1",
    timestamp: int | None = None,
    org: tuple[str, ...] = (),
) -> dict[str, str]:
    return signature_headers(
        endpoint_key=decode_secret(secret),
        msg_id=msg_id,
        timestamp=int(time.time()) if timestamp is None else timestamp,
        body=body,
        org_keys=[decode_secret(s) for s in org],
    )


def post(
    http: httpx.Client, body: bytes, headers: dict[str, str], path: str = "/hooks"
) -> httpx.Response:
    return http.post(path, content=body, headers={"Content-Type": "application/json", **headers})


class Running:
    def __init__(self, demo: DemoReceiver, http: httpx.Client) -> None:
        self.demo = demo
        self.http = http

    def events(self) -> list[dict[str, Any]]:
        response = self.http.get("/events")
        assert response.status_code == 200
        events: list[dict[str, Any]] = response.json()["events"]
        return events


def _running(demo: DemoReceiver) -> Iterator[Running]:
    server = serve(demo, "127.0.0.1", free_port())
    host, port = server.server_address[:2]
    try:
        with httpx.Client(base_url=f"http://{host!s}:{port}", timeout=5) as http:
            yield Running(demo, http)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[Running]:
    yield from _running(DemoReceiver([OLD_SECRET]))


@pytest.fixture
def org_receiver() -> Iterator[Running]:
    yield from _running(DemoReceiver([OLD_SECRET], org_secrets=[ORG_SECRET]))


# --- deliveries -------------------------------------------------------------------------------


def test_healthz(receiver: Running) -> None:
    response = receiver.http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True}


def test_valid_delivery_is_accepted_and_logged(receiver: Running) -> None:
    body = event_body("evt_ok")
    headers = signed(body, msg_id="evt_ok")
    assert set(SIGNATURE_HEADERS[:4]) <= set(headers)  # both schemes are on the request

    response = post(receiver.http, body, headers)

    assert response.status_code == 200
    assert response.json() == {"ok": True}
    [event] = receiver.events()
    assert event["id"] == "evt_ok"
    assert event["type"] == "campaign.approved"
    assert event["scheme"] == "standard"
    assert event["secret_index"] == 0
    assert event["status"] == 200
    assert event["received_at"].endswith("Z")


def test_amcore_only_delivery_takes_the_event_id_from_the_body(receiver: Running) -> None:
    body = event_body("evt_amcore")
    headers = {"X-AmCore-Signature": signed(body)["X-AmCore-Signature"]}

    assert post(receiver.http, body, headers).status_code == 200
    [event] = receiver.events()
    assert (event["id"], event["scheme"]) == ("evt_amcore", "amcore")


def test_any_post_path_is_a_delivery(receiver: Running) -> None:
    body = event_body("evt_path")
    assert post(receiver.http, body, signed(body), path="/some/where").status_code == 200


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        pytest.param(lambda body: signed(body, WRONG_SECRET), "BadSignature", id="wrong-secret"),
        pytest.param(
            lambda body: signed(body, timestamp=int(time.time()) - 3600),
            "StaleTimestamp",
            id="stale",
        ),
        pytest.param(lambda body: {}, "MissingHeaders", id="missing"),
        pytest.param(
            lambda body: {"X-AmCore-Signature": "t=1,v1=zz"}, "MalformedHeader", id="malformed"
        ),
    ],
)
def test_unverifiable_delivery_is_401(receiver: Running, headers: Any, error: str) -> None:
    body = event_body("evt_bad")

    response = post(receiver.http, body, headers(body))

    assert response.status_code == 401
    assert response.json() == {"ok": False, "error": error}
    [event] = receiver.events()
    assert (event["status"], event["error"], event["id"]) == (401, error, None)


def test_tampered_body_is_401(receiver: Running) -> None:
    body = event_body("evt_t")
    response = post(receiver.http, body.replace(b"c1", b"c2"), signed(body))
    assert response.status_code == 401
    assert response.json()["error"] == "BadSignature"


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b"\xff\xfe", b"[" * 100_000])
def test_verified_body_that_is_not_a_json_object_is_400(receiver: Running, body: bytes) -> None:
    response = post(receiver.http, body, signed(body))
    assert response.status_code == 400
    assert response.json() == {"ok": False, "error": "InvalidEvent"}


def test_oversized_body_is_413(receiver: Running) -> None:
    body = b"{" + b" " * (1024 * 1024) + b"}"
    assert post(receiver.http, body, signed(body)).status_code == 413
    assert receiver.http.get("/healthz").status_code == 200


def test_unknown_get_path_is_404(receiver: Running) -> None:
    assert receiver.http.get("/nope").status_code == 404


# --- org signature ----------------------------------------------------------------------------


def test_org_signature_is_checked_when_org_secrets_are_given(org_receiver: Running) -> None:
    body = event_body("evt_org")
    ok = post(org_receiver.http, body, signed(body, msg_id="evt_org", org=(ORG_SECRET,)))
    assert ok.status_code == 200
    assert org_receiver.events()[-1]["org_secret_index"] == 0

    missing = post(org_receiver.http, body, signed(body, msg_id="evt_org"))
    assert (missing.status_code, missing.json()["error"]) == (401, "MissingHeaders")

    wrong = post(org_receiver.http, body, signed(body, msg_id="evt_org", org=(WRONG_SECRET,)))
    assert (wrong.status_code, wrong.json()["error"]) == (401, "BadSignature")


def test_without_org_secrets_the_org_header_is_not_required(receiver: Running) -> None:
    body = event_body("evt_no_org")
    assert post(receiver.http, body, signed(body)).status_code == 200
    assert receiver.events()[-1]["org_secret_index"] is None


# --- rotation on the receiver side ------------------------------------------------------------


def test_rotation_add_then_remove_secret(receiver: Running) -> None:
    body = event_body("evt_rot")
    assert post(receiver.http, body, signed(body, NEW_SECRET)).status_code == 401

    receiver.demo.add_secret(NEW_SECRET)
    assert receiver.demo.secrets() == [NEW_SECRET, OLD_SECRET]
    assert post(receiver.http, body, signed(body, NEW_SECRET)).status_code == 200
    assert post(receiver.http, body, signed(body, OLD_SECRET)).status_code == 200
    assert [e["secret_index"] for e in receiver.events()[-2:]] == [0, 1]

    assert receiver.demo.remove_secret(OLD_SECRET) is True
    assert receiver.demo.remove_secret(OLD_SECRET) is False  # repeated removal is harmless
    assert receiver.demo.secrets() == [NEW_SECRET]
    old = post(receiver.http, body, signed(body, OLD_SECRET))
    assert (old.status_code, old.json()["error"]) == (401, "BadSignature")
    assert post(receiver.http, body, signed(body, NEW_SECRET)).status_code == 200


def test_secret_list_rules() -> None:
    demo = DemoReceiver([OLD_SECRET])
    demo.add_secret(NEW_SECRET)
    demo.add_secret(OLD_SECRET)  # already held: moves to the front, no duplicate
    assert demo.secrets() == [OLD_SECRET, NEW_SECRET]
    assert demo.remove_secret("whsec_" + NEW_SECRET) is True  # matched by key, not by spelling
    with pytest.raises(ValueError, match="last secret"):
        demo.remove_secret(OLD_SECRET)
    demo.set_secrets([NEW_SECRET, OLD_SECRET])
    assert demo.secrets() == [NEW_SECRET, OLD_SECRET]
    with pytest.raises(ValueError, match="at least one"):
        demo.set_secrets([])
    with pytest.raises(ValueError, match="at least one"):
        DemoReceiver([])
    with pytest.raises(ValueError, match="base64") as info:
        demo.add_secret("not-a-secret")
    assert "not-a-secret" not in str(info.value)
    with pytest.raises(TypeError):
        DemoReceiver(OLD_SECRET)
    assert demo.secrets() == [NEW_SECRET, OLD_SECRET]  # failed changes left it untouched


def test_event_log_is_bounded_and_copied() -> None:
    demo = DemoReceiver([OLD_SECRET], max_events=2)
    for n in range(3):
        body = event_body(f"evt_{n}")
        assert demo.handle(signed(body, msg_id=f"evt_{n}"), body)[0] == 200
    events = demo.events()
    assert [e["id"] for e in events] == ["evt_1", "evt_2"]
    events[0]["id"] = "changed"
    assert demo.events()[0]["id"] == "evt_1"


def test_handle_accepts_header_pairs_and_refuses_conflicting_duplicates() -> None:
    demo = DemoReceiver([OLD_SECRET])
    body = event_body("evt_pairs")
    pairs = list(signed(body).items())
    assert demo.handle(pairs, body) == (200, {"ok": True})
    conflicting = [*pairs, ("Webhook-Signature", "v1," + base64.b64encode(b"x" * 32).decode())]
    assert demo.handle(conflicting, body) == (401, {"ok": False, "error": "MalformedHeader"})


# --- the extension point ----------------------------------------------------------------------


def test_on_event_sees_verified_events_with_the_matching_secret() -> None:
    seen: list[tuple[dict[str, Any], AcceptedDelivery]] = []

    class Recording(DemoReceiver):
        def on_event(self, event: dict[str, Any], accepted: AcceptedDelivery) -> None:
            seen.append((event, accepted))

    demo = Recording([NEW_SECRET, OLD_SECRET])
    body = event_body("evt_hook", "webhook.secret_handoff")
    assert demo.handle(signed(body, OLD_SECRET, msg_id="evt_hook"), body)[0] == 200
    demo.handle(signed(body, WRONG_SECRET), body)  # rejected: never reaches the hook

    [(event, accepted)] = seen
    assert event["id"] == "evt_hook"
    assert accepted.secret == OLD_SECRET
    assert accepted.delivery.secret_index == 1
    assert OLD_SECRET not in repr(accepted)


def test_on_event_failure_is_500_without_the_message() -> None:
    class Failing(DemoReceiver):
        def on_event(self, event: dict[str, Any], accepted: AcceptedDelivery) -> None:
            raise RuntimeError("secret stuff")

    demo = Failing([OLD_SECRET])
    body = event_body("evt_fail")
    assert demo.handle(signed(body), body) == (500, {"ok": False, "error": "HandlerError"})
    [event] = demo.events()
    assert (event["status"], event["error"]) == (500, "RuntimeError")


# --- what gets printed ------------------------------------------------------------------------


def test_printed_line_names_the_event_and_never_a_secret_or_signature(
    capsys: pytest.CaptureFixture[str], receiver: Running
) -> None:
    receiver.demo.add_secret(NEW_SECRET)
    body = event_body("evt_printed")
    headers = signed(body, OLD_SECRET, msg_id="evt_printed")
    assert post(receiver.http, body, headers).status_code == 200
    wrong = signed(body, WRONG_SECRET, msg_id="evt_wrong")
    assert post(receiver.http, body, wrong).status_code == 401

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 2
    assert "evt_printed" in lines[0]
    assert "campaign.approved" in lines[0]
    assert "secret=#1" in lines[0]
    assert "BadSignature" in lines[1]
    for secret in (OLD_SECRET, NEW_SECRET, WRONG_SECRET):
        assert secret not in out
        assert decode_secret(secret).hex() not in out
    for sent in (headers, wrong):
        amcore = sent["X-AmCore-Signature"].split("v1=", 1)[1]
        standard = sent["webhook-signature"].removeprefix("v1,")
        assert amcore[:16] not in out
        assert standard[:16] not in out


def test_printing_can_go_to_a_given_stream() -> None:
    import io

    stream = io.StringIO()
    demo = DemoReceiver([OLD_SECRET], out=stream)
    body = event_body("evt_stream")
    demo.handle(signed(body, msg_id="evt_stream"), body)
    assert "evt_stream" in stream.getvalue()


def test_handles_concurrent_deliveries_while_secrets_change(receiver: Running) -> None:
    base = str(receiver.http.base_url)
    errors: list[int] = []

    def deliver(n: int) -> None:
        body = event_body(f"evt_c{n}")
        with httpx.Client(base_url=base, timeout=5) as http:
            for _ in range(5):
                status = post(http, body, signed(body, msg_id=f"evt_c{n}")).status_code
                if status != 200:
                    errors.append(status)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for n in range(20):  # churn a second secret; OLD_SECRET stays accepted throughout
        receiver.demo.add_secret(NEW_SECRET)
        receiver.demo.remove_secret(NEW_SECRET)
        receiver.demo.set_secrets([OLD_SECRET, WRONG_SECRET] if n % 2 else [OLD_SECRET])
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(receiver.events()) == 40


# --- the real command line --------------------------------------------------------------------


@pytest.mark.e2e
def test_rotator_receiver_cli_end_to_end(tmp_path: Any) -> None:
    port = free_port()
    log = tmp_path / "receiver.log"
    proc = start(
        [str(BIN / "rotator"), "receiver", "--port", str(port), "--secret", OLD_SECRET],
        rotator_env(),
        log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", proc, log)
        body = event_body("evt_cli")
        with httpx.Client(base_url=base, timeout=5) as http:
            assert post(http, body, signed(body, msg_id="evt_cli")).status_code == 200
            assert post(http, body, signed(body, WRONG_SECRET)).status_code == 401
            assert [e["id"] for e in http.get("/events").json()["events"]] == ["evt_cli", None]
    finally:
        started = time.monotonic()
        code = stop(proc, signal.SIGTERM, timeout=10)
        elapsed = time.monotonic() - started
    out = log.read_text()
    assert code == 0, out
    assert elapsed < 5, out
    assert f"127.0.0.1:{port}" in out
    assert "evt_cli" in out
    assert OLD_SECRET not in out


@pytest.mark.e2e
def test_rotator_receiver_cli_refuses_a_bad_secret_without_echoing_it(tmp_path: Any) -> None:
    log = tmp_path / "bad.log"
    proc = start(
        [str(BIN / "rotator"), "receiver", "--port", str(free_port()), "--secret", "hunter2=="],
        rotator_env(),
        log,
    )
    assert proc.wait(timeout=30) == 2
    out = log.read_text()
    assert "secret" in out
    assert "hunter2" not in out


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["environment", "file"])
def test_rotator_receiver_takes_secrets_from_the_environment_or_a_file(
    tmp_path: Any, source: str
) -> None:
    """Not from the command line, which every user of the machine can read (ps)."""
    port = free_port()
    command = [str(BIN / "rotator"), "receiver", "--port", str(port)]
    env = rotator_env()
    if source == "environment":
        env["ROTATOR_RECEIVER_SECRETS"] = f"{NEW_SECRET}, {OLD_SECRET}"
        env["ROTATOR_RECEIVER_ORG_SECRETS"] = ORG_SECRET
    else:
        (tmp_path / "secrets").write_text(f"# newest first\n{NEW_SECRET}\n\n{OLD_SECRET}\n")
        (tmp_path / "org-secrets").write_text(f"{ORG_SECRET}\n")
        command += ["--secret-file", str(tmp_path / "secrets")]
        command += ["--org-secret-file", str(tmp_path / "org-secrets")]
    log = tmp_path / "receiver.log"
    proc = start(command, env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", proc, log)
        visible = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        with httpx.Client(base_url=base, timeout=5) as http:
            statuses = {}
            for name, secret, org in (
                ("old", OLD_SECRET, ORG_SECRET),
                ("new", NEW_SECRET, ORG_SECRET),
                ("wrong", WRONG_SECRET, ORG_SECRET),
                ("wrong_org", OLD_SECRET, WRONG_SECRET),
            ):
                body = event_body(f"evt_{name}")
                headers = signed(body, secret, msg_id=f"evt_{name}", org=(org,))
                statuses[name] = post(http, body, headers).status_code
    finally:
        stop(proc)
    assert statuses == {"old": 200, "new": 200, "wrong": 401, "wrong_org": 401}
    out = log.read_text()
    for secret in (OLD_SECRET, NEW_SECRET, ORG_SECRET):
        assert secret.encode() not in visible
        assert secret not in out


@pytest.mark.parametrize(
    ("argv", "environment", "message"),
    [
        ([], {}, "no endpoint secret: give --secret, --secret-file or ROTATOR_RECEIVER_SECRETS"),
        ([], {"ROTATOR_RECEIVER_SECRETS": " , "}, "no endpoint secret"),
        (["--secret", OLD_SECRET, "--secret-file", "FILE"], {}, "--secret or --secret-file"),
        (["--secret-file", "MISSING"], {}, "cannot read --secret-file"),
        (["--secret-file", "FILE"], {"ROTATOR_RECEIVER_ORG_SECRETS": "hunter2=="}, "not valid"),
        (["--secret-file", "BAD"], {}, "not valid"),
    ],
)
def test_rotator_receiver_refuses_missing_or_bad_secrets_without_echoing_them(
    tmp_path: Any, monkeypatch: Any, capsys: Any, argv: list[str], environment: dict, message: str
) -> None:
    from rotator.cli import main

    (tmp_path / "FILE").write_text(f"{OLD_SECRET}\n")
    (tmp_path / "BAD").write_text("hunter2==\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROTATOR_RECEIVER_SECRETS", raising=False)
    monkeypatch.delenv("ROTATOR_RECEIVER_ORG_SECRETS", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["receiver", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "hunter2" not in err
    assert OLD_SECRET not in err
