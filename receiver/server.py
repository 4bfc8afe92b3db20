"""A small demo webhook receiver: verifies Rotator deliveries and keeps a log of what arrived.

``rotator receiver --port 9000 --secret-file FILE`` runs it (docs/receivers.md); tests and
operators point endpoints at it to watch deliveries and secret rotations from the receiving side.
Standard library and the rest of ``receiver`` only (whose handoff needs ``cryptography``), so it
runs without the rest of Rotator.

HTTP surface:

- ``POST <any path>``: a delivery. 200 ``{"ok": true}`` once it verifies; 401
  ``{"ok": false, "error": "<VerificationError subclass>"}`` when it does not; 400 when a verified
  body is not a JSON object; 411/413 when the body has no length or is too large.
- ``GET /healthz``: 200 ``{"ok": true}``.
- ``GET /events``: 200 ``{"events": [...]}``, oldest first (ids, types, schemes, statuses,
  secret indexes; never a secret or a signature).

The accepted secrets are a list, newest first, that can change while the server runs
(``add_secret`` / ``remove_secret`` / ``set_secrets``): that is the receiver's half of a
rotation. ``DemoReceiver.on_event`` applies an in-band ``webhook.secret_handoff``: with org
secrets configured, only once ``X-AmCore-Org-Signature`` verified too; without, it says so in a
warning line each time.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, TextIO

from receiver.handoff import HANDOFF_EVENT, HandoffError, open_handoff
from receiver.handoff import _open as _open_without_org_signature  # the demo warns by itself
from receiver.signing import decode_secret
from receiver.verify import (
    DEFAULT_TOLERANCE_S,
    MalformedHeader,
    VerificationError,
    VerifiedDelivery,
    parse_event,
    verify,
)

__all__ = [
    "AcceptedDelivery",
    "DemoReceiver",
    "MAX_BODY_BYTES",
    "run",
    "serve",
]

Secret = str | bytes
HeaderSource = Mapping[str, str] | Iterable[tuple[str, str]]

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_EVENTS = 1000
# How often serve_forever checks for shutdown: bounds how long SIGTERM (or a test) waits.
_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class AcceptedDelivery:
    """What ``handle`` proved about a delivery, handed to ``DemoReceiver.on_event``.

    ``secret`` is the endpoint secret that matched (the handoff derives its key from it); it is
    left out of ``repr`` so logging this object never prints it.
    """

    delivery: VerifiedDelivery
    secret: Secret = field(repr=False)
    org_delivery: VerifiedDelivery | None = None


def _key(secret: Secret) -> bytes:
    """The HMAC key a secret names; raises ValueError/TypeError (never echoing it) if invalid."""
    if isinstance(secret, str):
        return decode_secret(secret)
    if isinstance(secret, bytes | bytearray):
        if not secret:
            raise ValueError("a secret must not be empty")
        return bytes(secret)
    raise TypeError("a secret must be a base64 str or raw key bytes")


def _checked(secrets: Iterable[Secret], what: str) -> list[tuple[Secret, bytes]]:
    if isinstance(secrets, str | bytes | bytearray):
        raise TypeError(f"{what} must be a sequence of secrets, not a single secret")
    pairs: list[tuple[Secret, bytes]] = []
    for secret in secrets:
        key = _key(secret)
        if all(key != known for _, known in pairs):  # the same key twice would only add noise
            pairs.append((secret, key))
    return pairs


def _header_dict(headers: HeaderSource) -> dict[str, str]:
    """Lower-cased header names; a header repeated with different values is refused."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        if key in out and out[key] != value:
            raise MalformedHeader(f"conflicting values for header {key}")
        out[key] = value
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _printable(value: Any, limit: int = 100) -> str | None:
    """A verified body field, safe to print on one line (no control characters, bounded)."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


class DemoReceiver:
    """The receiver's state: accepted secrets (newest first) and a bounded log of deliveries.

    Thread-safe: the HTTP server calls ``handle`` from one thread per request while operators
    (or a future handoff) change the secrets.
    """

    def __init__(
        self,
        secrets: Sequence[Secret],
        *,
        org_secrets: Sequence[Secret] = (),
        tolerance_s: int = DEFAULT_TOLERANCE_S,
        max_events: int = DEFAULT_MAX_EVENTS,
        out: TextIO | None = None,
    ) -> None:
        if isinstance(tolerance_s, bool) or not isinstance(tolerance_s, int) or tolerance_s < 0:
            raise ValueError("tolerance_s must be a non-negative int")
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self._lock = threading.Lock()
        self._print_lock = threading.Lock()
        self._secrets = _checked(secrets, "secrets")
        if not self._secrets:
            raise ValueError("at least one secret is required")
        self._org_secrets = _checked(org_secrets, "org_secrets")
        self.tolerance_s = tolerance_s
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._out = out

    # --- secrets ------------------------------------------------------------------------------

    def add_secret(self, secret: Secret) -> None:
        """Accept ``secret`` too, as the newest; adding a known one just moves it to the front."""
        key = _key(secret)
        with self._lock:
            self._secrets = [(secret, key)] + [p for p in self._secrets if p[1] != key]

    def remove_secret(self, secret: Secret) -> bool:
        """Stop accepting ``secret`` (matched by key, so ``whsec_`` and bare forms are one).

        Returns whether it was held, so a repeated removal is harmless. Removing the last secret
        is refused with ValueError: a receiver that accepts nothing is a misconfiguration.
        """
        key = _key(secret)
        with self._lock:
            kept = [p for p in self._secrets if p[1] != key]
            if len(kept) == len(self._secrets):
                return False
            if not kept:
                raise ValueError("cannot remove the last secret")
            self._secrets = kept
            return True

    def set_secrets(self, secrets: Sequence[Secret]) -> None:
        """Replace every accepted secret at once (newest first)."""
        pairs = _checked(secrets, "secrets")
        if not pairs:
            raise ValueError("at least one secret is required")
        with self._lock:
            self._secrets = pairs

    def secrets(self) -> list[Secret]:
        """The accepted secrets as given, newest first; ``secret_index`` counts into this list."""
        with self._lock:
            return [secret for secret, _ in self._secrets]

    def org_secret_count(self) -> int:
        """How many org secrets are checked (0: the org signature is not required)."""
        with self._lock:
            return len(self._org_secrets)

    def events(self) -> list[dict[str, Any]]:
        """The delivery log, oldest first (copies: callers cannot change it)."""
        with self._lock:
            return [dict(event) for event in self._events]

    # --- deliveries ---------------------------------------------------------------------------

    def handle(self, headers: HeaderSource, body: bytes) -> tuple[int, dict[str, Any]]:
        """Verify one delivery and answer it: ``(status, JSON body)``.

        The signature is checked before the body is parsed, so nothing unauthenticated is acted
        on. With org secrets configured, ``X-AmCore-Org-Signature`` must verify as well.
        """
        with self._lock:
            pairs = list(self._secrets)
            org_keys = [key for _, key in self._org_secrets]
        try:
            lowered = _header_dict(headers)
            delivery = verify(
                lowered, body, [key for _, key in pairs], tolerance_s=self.tolerance_s
            )
            org_delivery = None
            if org_keys:
                org_delivery = verify(
                    lowered, body, org_keys, tolerance_s=self.tolerance_s, scheme="org"
                )
        except VerificationError as exc:
            return self._reject(401, type(exc).__name__)

        try:
            event = parse_event(body)
        except (ValueError, RecursionError):
            return self._reject(400, "InvalidEvent")

        record: dict[str, Any] = {
            "id": _printable(delivery.msg_id or event.get("id")),
            "type": _printable(event.get("type")),
            "scheme": delivery.scheme,
            "secret_index": delivery.secret_index,
            "org_secret_index": None if org_delivery is None else org_delivery.secret_index,
            "status": 200,
            "error": None,
            "received_at": _now(),
        }
        accepted = AcceptedDelivery(delivery, pairs[delivery.secret_index][0], org_delivery)
        try:
            self.on_event(event, accepted)
        except Exception as exc:
            # Only the class name: an exception message could quote the event or a key.
            record.update(status=500, error=type(exc).__name__)
        self._record(record)
        self._print_event(record)
        if record["status"] != 200:
            return record["status"], {"ok": False, "error": "HandlerError"}
        return 200, {"ok": True}

    def on_event(self, event: dict[str, Any], accepted: AcceptedDelivery) -> None:
        """Act on a verified event: apply an in-band ``webhook.secret_handoff``.

        ``accepted.secret`` is the old secret that signed the handoff; it opens the sealed new
        secret, which is installed next to it. Override to act on other events. An exception
        here answers 500, so Rotator retries the delivery.
        """
        if event.get("type") != HANDOFF_EVENT:
            return
        if self.org_secret_count():
            # ``handle`` already refused a delivery whose org signature did not verify; an
            # override that calls this must not get around it.
            if accepted.org_delivery is None or accepted.org_delivery.scheme != "org":
                raise HandoffError("the handoff carries no verified org signature")
            handoff = open_handoff(event, accepted.secret, org_signature=accepted.org_delivery)
        else:
            self._emit(
                "handoff: warning: trusted on the endpoint signature alone; give --org-secret "
                "so that only Rotator (not any holder of the old secret) can hand off a secret"
            )
            handoff = _open_without_org_signature(event, accepted.secret)
        # Keep the old secret too: the old endpoint goes on sending until Rotator deletes it.
        self.add_secret(handoff.secret)
        self._emit(
            f"handoff: installed the secret of endpoint {handoff.new_endpoint_id} "
            f"(replacing {handoff.old_endpoint_id})"
        )

    # --- internals ----------------------------------------------------------------------------

    def _reject(self, status: int, error: str) -> tuple[int, dict[str, Any]]:
        # Nothing from an unverified request is recorded: its id and type could be anything.
        record: dict[str, Any] = {
            "id": None,
            "type": None,
            "scheme": None,
            "secret_index": None,
            "org_secret_index": None,
            "status": status,
            "error": error,
            "received_at": _now(),
        }
        self._record(record)
        self._emit(f"rejected delivery: {error} -> {status}")
        return status, {"ok": False, "error": error}

    def _record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(record)

    def _print_event(self, record: dict[str, Any]) -> None:
        line = (
            f"event {record['id']} type={record['type']} scheme={record['scheme']}"
            f" secret=#{record['secret_index']}"
        )
        if record["org_secret_index"] is not None:
            line += f" org_secret=#{record['org_secret_index']}"
        line += f" -> {record['status']}"
        if record["error"]:
            line += f" ({record['error']})"
        self._emit(line)

    def _emit(self, line: str) -> None:
        with self._print_lock:
            # sys.stdout is looked up per line so redirection (and pytest's capsys) applies.
            print(line, file=self._out or sys.stdout, flush=True)


# --- HTTP ---------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: DemoReceiver


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "RotatorDemoReceiver/1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches on
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, {"ok": True})
        elif path == "/events":
            self._send(200, {"events": self.server.receiver.events()})
        else:
            self._send(404, {"ok": False, "error": "NotFound"})

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches on
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._send(411, {"ok": False, "error": "LengthRequired"})
            return
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0:
            self._send(400, {"ok": False, "error": "BadContentLength"})
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as a request
            self._send(413, {"ok": False, "error": "PayloadTooLarge"})
            return
        body = self.rfile.read(length)
        status, payload = self.server.receiver.handle(self.headers.items(), body)
        self._send(status, payload)

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        """Silenced: ``DemoReceiver`` prints one line per delivery instead."""


def serve(receiver: DemoReceiver, host: str = "127.0.0.1", port: int = 9000) -> ThreadingHTTPServer:
    """Bind ``host:port`` and serve in a background daemon thread; returns the running server.

    Port 0 picks a free port (read it from ``server.server_address``). Stop with
    ``server.shutdown()`` then ``server.server_close()``.
    """
    server = _Server((host, port), _Handler)
    server.receiver = receiver
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _POLL_INTERVAL_S},
        name="demo-receiver",
        daemon=True,
    )
    thread.start()
    return server


def run(receiver: DemoReceiver, host: str = "127.0.0.1", port: int = 9000) -> int:
    """Serve until SIGINT or SIGTERM, then shut down cleanly; returns the exit code (0).

    Must be called from the main thread (signal handlers can only be installed there).
    """
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = serve(receiver, host, port)
        try:
            bound_host, bound_port = server.server_address[:2]
            counts = f"{len(receiver.secrets())} secret(s), {receiver.org_secret_count()} org"
            receiver._emit(
                f"rotator receiver listening on http://{bound_host!s}:{bound_port}"
                f" ({counts} secret(s), tolerance {receiver.tolerance_s}s)"
            )
            if not receiver.org_secret_count():
                receiver._emit(
                    "warning: no --org-secret: an in-band handoff will be trusted on the endpoint "
                    "signature alone"
                )
            while not stop.wait(_POLL_INTERVAL_S):
                pass
        finally:
            server.shutdown()
            server.server_close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    receiver._emit("rotator receiver stopped")
    return 0
