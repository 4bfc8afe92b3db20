"""workers/http.py against a real HTTP server on 127.0.0.1.

Every request in this file goes to 127.0.0.1 (or is refused before a connection exists): the
SSRF tests point at the same live server and assert it never saw a connection, which is what
proves the guard acts on the connected address rather than on the URL text.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpcore
import httpx
import pytest

from workers.http import (
    EXCERPT_BYTES,
    USER_AGENT,
    BlockedDestination,
    GuardedBackend,
    ResolutionFailed,
    Sender,
    SendResult,
    blocked_reason,
    parse_retry_after,
)

HUGE_BYTES = 1 << 30  # announced by /huge; the client must stop long before
PATTERN = b"abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


class ReceiverServer(ThreadingHTTPServer):
    """Records every accepted connection and request; routes are plain functions by path."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.connections = 0
        self.requests: list[Recorded] = []
        self.release = threading.Event()  # lets /slow finish at teardown
        self.huge_done = threading.Event()
        self.huge_written = 0
        self.routes: dict[str, Callable[[Handler], None]] = {
            "/ok": lambda h: h.respond(200, b'{"received": true}'),
            "/error": lambda h: h.respond(500, b"boom", {"Retry-After": "5"}),
            "/ratelimit": lambda h: h.respond(429, b"slow down", {"Retry-After": "7"}),
            "/unavailable": lambda h: h.respond(
                503, b"", {"Retry-After": formatdate(time.time() + 120, usegmt=True)}
            ),
            "/redirect": lambda h: h.respond(302, b"", {"Location": self.url("/target")}),
            "/target": lambda h: h.respond(200, b"target"),
            "/slow": _slow,
            "/huge": _huge,
            "/truncated": _truncated,
        }

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up early (timeouts, huge bodies) are expected here."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable

    @property
    def receiver(self) -> ReceiverServer:
        return cast(ReceiverServer, self.server)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.receiver.requests.append(Recorded(self.path, headers, body))
        route = self.receiver.routes.get(self.path)
        if route is None:
            self.respond(404, b"no route")
        else:
            route(self)

    def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _slow(handler: Handler) -> None:
    handler.receiver.release.wait(5)
    handler.respond(200, b"late")


def _huge(handler: Handler) -> None:
    chunk = PATTERN * (65536 // len(PATTERN))
    handler.send_response(200)
    handler.send_header("Content-Length", str(HUGE_BYTES))
    handler.end_headers()
    try:
        while handler.receiver.huge_written < HUGE_BYTES:
            handler.wfile.write(chunk)
            handler.receiver.huge_written += len(chunk)
    finally:
        handler.close_connection = True
        handler.receiver.huge_done.set()


def _truncated(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    handler.wfile.write(b"only ten b")
    handler.wfile.flush()
    handler.close_connection = True


@pytest.fixture
def receiver() -> Iterator[ReceiverServer]:
    server = ReceiverServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def insecure() -> Iterator[Sender]:
    with Sender(timeout_s=5, allow_insecure=True) as sender:
        yield sender


@pytest.fixture
def strict() -> Iterator[Sender]:
    with Sender(timeout_s=5, allow_insecure=False) as sender:
        yield sender


# --- responses ---------------------------------------------------------------------------


def test_200_with_body(insecure: Sender, receiver: ReceiverServer) -> None:
    result = insecure.post(receiver.url("/ok"), b"{}", {"Content-Type": "application/json"})
    assert result.ok
    assert result.status == 200
    assert result.body_excerpt == '{"received": true}'
    assert result.error is None
    assert result.retry_after_s is None
    assert 0 <= result.elapsed_ms < 5000


def test_500_is_a_failure_and_ignores_retry_after(
    insecure: Sender, receiver: ReceiverServer
) -> None:
    result = insecure.post(receiver.url("/error"), b"{}", {})
    assert not result.ok
    assert result.status == 500
    assert result.body_excerpt == "boom"
    assert result.error is None
    assert result.retry_after_s is None  # Retry-After is only read on 429/503


def test_429_retry_after_delta_seconds(insecure: Sender, receiver: ReceiverServer) -> None:
    result = insecure.post(receiver.url("/ratelimit"), b"{}", {})
    assert (result.ok, result.status, result.retry_after_s) == (False, 429, 7.0)


def test_503_retry_after_http_date(insecure: Sender, receiver: ReceiverServer) -> None:
    result = insecure.post(receiver.url("/unavailable"), b"{}", {})
    assert result.status == 503
    assert not result.ok
    assert result.retry_after_s is not None
    assert 110 <= result.retry_after_s <= 121  # HTTP-dates have one-second resolution


def test_redirect_is_not_followed(insecure: Sender, receiver: ReceiverServer) -> None:
    result = insecure.post(receiver.url("/redirect"), b"{}", {})
    assert not result.ok
    assert result.status == 302
    assert result.error == "redirect not followed"
    assert receiver.paths() == ["/redirect"]  # the target was never hit


def test_headers_and_body_arrive_exactly_as_sent(
    insecure: Sender, receiver: ReceiverServer
) -> None:
    body = b'{"id": "evt_1", "data": {"n": 1}}\n\xff\x00 not utf-8'
    headers = {
        "Content-Type": "application/json",
        "X-AmCore-Signature": "t=1700000000,v1=" + "ab" * 32,
        "webhook-id": "evt_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": "v1,c2lnbmF0dXJl",
    }
    result = insecure.post(receiver.url("/ok"), body, {**headers, "User-Agent": "spoofed"})
    assert result.ok
    [recorded] = receiver.requests
    assert recorded.body == body
    for name, value in headers.items():
        assert recorded.headers[name.lower()] == value
    assert recorded.headers["user-agent"] == USER_AGENT
    assert recorded.headers["content-length"] == str(len(body))
    assert recorded.headers["accept-encoding"] == "identity"


def test_connections_are_kept_alive(insecure: Sender, receiver: ReceiverServer) -> None:
    for _ in range(3):
        assert insecure.post(receiver.url("/ok"), b"{}", {}).ok
    assert receiver.connections == 1


def test_timeout(receiver: ReceiverServer) -> None:
    with Sender(timeout_s=0.3, allow_insecure=True) as sender:
        result = sender.post(receiver.url("/slow"), b"{}", {"X-Secret-Header": "s3cr3t"})
    assert result.status is None
    assert not result.ok
    assert result.error == "timeout"
    assert 250 <= result.elapsed_ms < 3000
    assert "s3cr3t" not in repr(result)


def test_huge_body_is_capped(insecure: Sender, receiver: ReceiverServer) -> None:
    started = time.perf_counter()
    result = insecure.post(receiver.url("/huge"), b"{}", {})
    assert result.ok
    assert result.error is None
    expected = (PATTERN * (EXCERPT_BYTES // len(PATTERN) + 1))[:EXCERPT_BYTES]
    assert result.body_excerpt == expected.decode()
    assert time.perf_counter() - started < 5
    # The server's writes failed once we hung up: we did not download the gigabyte.
    assert receiver.huge_done.wait(10)
    assert receiver.huge_written < HUGE_BYTES


def test_excerpt_decodes_with_replacement(insecure: Sender, receiver: ReceiverServer) -> None:
    receiver.routes["/bytes"] = lambda h: h.respond(200, "é".encode() * EXCERPT_BYTES)
    result = insecure.post(receiver.url("/bytes"), b"{}", {})
    # 2048 bytes of two-byte characters: 1024 of them, no half character left over.
    assert result.body_excerpt == "é" * (EXCERPT_BYTES // 2)
    receiver.routes["/latin1"] = lambda h: h.respond(200, b"caf\xe9")
    assert insecure.post(receiver.url("/latin1"), b"{}", {}).body_excerpt == "caf\ufffd"


def test_truncated_body_keeps_the_status(insecure: Sender, receiver: ReceiverServer) -> None:
    result = insecure.post(receiver.url("/truncated"), b"{}", {})
    assert result.status == 200
    assert result.body_excerpt == "only ten b"
    assert result.error == "protocol error while reading body"


def test_connection_refused(insecure: Sender) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    result = insecure.post(f"http://127.0.0.1:{port}/", b"{}", {})
    assert result.status is None
    assert result.error == "connection refused"


def test_https_to_a_plain_http_server_is_a_tls_error(
    insecure: Sender, receiver: ReceiverServer
) -> None:
    result = insecure.post(receiver.url("/ok", scheme="https"), b"{}", {})
    assert result.status is None
    assert result.error is not None
    assert result.error.startswith("tls error")


def test_invalid_urls(insecure: Sender) -> None:
    assert insecure.post("ftp://127.0.0.1/x", b"", {}).error == "invalid url: unsupported scheme"
    assert insecure.post("http://", b"", {}).error == "invalid url"
    assert insecure.post("http://[::1", b"", {}).error == "invalid url"


def test_invalid_header_value_is_reported_not_raised(
    insecure: Sender, receiver: ReceiverServer
) -> None:
    result = insecure.post(receiver.url("/ok"), b"{}", {"X-Bad": "a\r\nInjected: 1"})
    assert result.status is None
    assert result.error == "invalid request"
    assert receiver.requests == []


def test_post_after_close(receiver: ReceiverServer) -> None:
    sender = Sender(timeout_s=5, allow_insecure=True)
    sender.close()
    assert sender.post(receiver.url("/ok"), b"{}", {}).error == "sender closed"


def test_ok_is_2xx_only() -> None:
    def result(status: int | None) -> SendResult:
        return SendResult(status, 1, "", None, None)

    assert [result(s).ok for s in (200, 204, 299)] == [True] * 3
    assert [result(s).ok for s in (None, 100, 199, 300, 302, 404, 500)] == [False] * 7


# --- SSRF guard ----------------------------------------------------------------------------


def test_http_is_refused_without_a_connection(strict: Sender, receiver: ReceiverServer) -> None:
    result = strict.post(receiver.url("/ok"), b"{}", {})
    assert result.status is None
    assert result.error == "blocked destination: https required"
    assert receiver.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]"])
def test_loopback_is_refused(strict: Sender, receiver: ReceiverServer, host: str) -> None:
    result = strict.post(receiver.url("/ok", scheme="https", host=host), b"{}", {})
    assert result.status is None
    assert not result.ok
    assert result.error == "blocked destination: loopback address"
    assert receiver.connections == 0


def _fake_dns(monkeypatch: pytest.MonkeyPatch, name: str, address: str) -> Callable[..., list[Any]]:
    """Make ``name`` resolve to ``address`` (process-wide, for this test only)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host == name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return getaddrinfo


def test_dns_name_resolving_to_loopback_is_refused(
    monkeypatch: pytest.MonkeyPatch, strict: Sender, receiver: ReceiverServer
) -> None:
    _fake_dns(monkeypatch, "receiver.example", "127.0.0.1")
    result = strict.post(receiver.url("/ok", scheme="https", host="receiver.example"), b"", {})
    assert result.error == "blocked destination: loopback address"
    assert receiver.connections == 0


def test_connects_to_the_resolved_address_and_keeps_the_host(
    monkeypatch: pytest.MonkeyPatch, insecure: Sender, receiver: ReceiverServer
) -> None:
    _fake_dns(monkeypatch, "receiver.example", "127.0.0.1")
    result = insecure.post(receiver.url("/ok", host="receiver.example"), b"{}", {})
    assert result.ok
    assert receiver.requests[0].headers["host"] == f"receiver.example:{receiver.port}"


def test_the_guarded_pool_is_installed() -> None:
    """Fails if httpx stops using HTTPTransport._pool the way workers/http.py relies on."""
    with Sender(timeout_s=5, allow_insecure=False, max_connections=7) as sender:
        client_transport = getattr(sender._client, "_transport", None)
        assert client_transport is sender._transport
        pool = getattr(sender._transport, "_pool", None)
        assert isinstance(pool, httpcore.ConnectionPool)
        backend = getattr(pool, "_network_backend", None)
        assert isinstance(backend, GuardedBackend)
        assert backend.allow_private is False
        assert getattr(pool, "_max_connections", None) == 7
        assert getattr(pool, "_http1", None) is True
        assert getattr(pool, "_http2", None) is False
        ssl_context = getattr(pool, "_ssl_context", None)
        assert isinstance(ssl_context, ssl.SSLContext)
        assert ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert ssl_context.check_hostname is True
        # The client must send through that transport, not a proxy mount or a default one.
        assert sender._client._transport_for_url(httpx.URL("https://example.com/")) is (
            sender._transport
        )


# --- TLS through the guarded backend ------------------------------------------------------


def _self_signed_localhost(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_uses_the_hostname_for_sni_and_verifies_the_certificate(
    tmp_path: Path, insecure: Sender
) -> None:
    cert_path, key_path = _self_signed_localhost(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server_names: list[str | None] = []

    def remember(_sock: Any, server_name: str | None, _context: ssl.SSLContext) -> None:
        server_names.append(server_name)

    context.sni_callback = remember
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve_one() -> None:
            try:
                connection, _ = listener.accept()
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass  # the client rejects our self-signed certificate

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        result = insecure.post(f"https://localhost:{port}/", b"{}", {})
        thread.join(5)
    assert result.status is None
    assert result.error == "tls error: certificate verification failed"
    assert server_names == ["localhost"]  # SNI carried the URL's name, not the IP


# --- GuardedBackend, no network -----------------------------------------------------------


class FakeInner(httpcore.NetworkBackend):
    def __init__(self, failing: Sequence[str] = ()) -> None:
        self.failing = set(failing)
        self.calls: list[str] = []

    def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(host)
        if host in self.failing:
            raise httpcore.ConnectError("refused")
        return httpcore.NetworkStream()


def _resolver(*addresses: str) -> Callable[[str, int], list[str]]:
    return lambda host, port: list(addresses)


def test_backend_drops_disallowed_addresses() -> None:
    inner = FakeInner()
    backend = GuardedBackend(
        allow_private=False,
        inner=inner,
        resolve=_resolver("127.0.0.1", "10.0.0.1", "93.184.216.34", "2606:4700::1111"),
    )
    backend.connect_tcp("receiver.example", 443, timeout=1)
    assert inner.calls == ["93.184.216.34"]


def test_backend_falls_back_to_the_next_allowed_address() -> None:
    inner = FakeInner(failing=["2606:4700::1111"])
    backend = GuardedBackend(
        allow_private=False, inner=inner, resolve=_resolver("2606:4700::1111", "93.184.216.34")
    )
    backend.connect_tcp("receiver.example", 443, timeout=1)
    assert inner.calls == ["2606:4700::1111", "93.184.216.34"]


def test_backend_refuses_when_nothing_is_allowed() -> None:
    inner = FakeInner()
    backend = GuardedBackend(
        allow_private=False, inner=inner, resolve=_resolver("169.254.169.254", "10.0.0.1")
    )
    with pytest.raises(BlockedDestination) as refused:
        backend.connect_tcp("metadata.example", 80, timeout=1)
    assert refused.value.reason == "link-local address"
    assert inner.calls == []


def test_backend_allows_everything_when_insecure() -> None:
    inner = FakeInner()
    backend = GuardedBackend(allow_private=True, inner=inner, resolve=_resolver("127.0.0.1"))
    backend.connect_tcp("localhost", 80, timeout=1)
    assert inner.calls == ["127.0.0.1"]


def test_backend_reports_resolution_failures() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    backend = GuardedBackend(allow_private=False, inner=FakeInner(), resolve=fail)
    with pytest.raises(ResolutionFailed):
        backend.connect_tcp("nowhere.invalid", 443, timeout=1)
    backend = GuardedBackend(allow_private=False, inner=FakeInner(), resolve=_resolver())
    with pytest.raises(ResolutionFailed):
        backend.connect_tcp("nowhere.invalid", 443, timeout=1)


def test_backend_refuses_unix_sockets() -> None:
    with pytest.raises(BlockedDestination):
        GuardedBackend(allow_private=True).connect_unix_socket("/run/docker.sock")


# --- address classifier and Retry-After -----------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.1", "private address"),
        ("172.16.0.1", "private address"),
        ("192.168.1.1", "private address"),
        ("169.254.169.254", "link-local address"),
        ("100.64.0.1", "shared address space"),
        ("0.0.0.0", "unspecified address"),  # noqa: S104 - classified, never bound
        ("0.1.2.3", "reserved address"),
        ("127.0.0.1", "loopback address"),
        ("127.255.0.9", "loopback address"),
        ("224.0.0.1", "multicast address"),
        ("240.0.0.1", "reserved address"),
        ("255.255.255.255", "reserved address"),
        ("192.0.2.1", "private address"),
        ("fe80::1", "link-local address"),
        ("fc00::1", "private address"),
        ("fd12:3456::1", "private address"),
        ("fec0::1", "site-local address"),
        ("::1", "loopback address"),
        ("::", "unspecified address"),
        ("ff02::1", "multicast address"),
        ("::ffff:127.0.0.1", "loopback address"),
        ("::ffff:10.0.0.1", "private address"),
        ("::ffff:169.254.169.254", "link-local address"),
        ("2002:7f00:1::", "loopback address"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local address"),  # NAT64 wrapping 169.254.169.254
        ("2001:db8::1", "private address"),
        ("not an address", "unparseable address"),
        ("93.184.216.34", None),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("::ffff:93.184.216.34", None),
    ],
)
def test_blocked_reason(address: str, reason: str | None) -> None:
    assert blocked_reason(address) == reason


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert parse_retry_after(formatdate(now - 90, usegmt=True), now=now) == 0.0
    for unusable in (None, "", "-1", "1.5", "soon", "9" * 50, "Fri, 99 Foo 2024"):
        assert parse_retry_after(unusable, now=now) is None
