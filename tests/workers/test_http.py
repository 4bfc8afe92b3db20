"""workers/http.py against a real HTTP server on 127.0.0.1.

Every request in this file goes to 127.0.0.1 (or is refused before a connection exists): the
SSRF tests point at the same live server and assert it never saw a connection, which is what
proves the guard acts on the connected address rather than on the URL text.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpcore
import httpx
import pytest

from rotator.settings import Settings
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
from workers.sending import SenderPool

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


@contextmanager
def _serving() -> Iterator[ReceiverServer]:
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
def receiver() -> Iterator[ReceiverServer]:
    with _serving() as server:
        yield server


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


# --- total deadline, against raw-socket receivers -------------------------------------------

DEADLINE_S = 1.0
# A liveness bound, not a speed claim: a request with a 1 s deadline is over well within this.
LIVENESS_S = DEADLINE_S + 1.5
# Receivers below give up after this long, so a broken deadline fails a test, not hangs it.
GIVE_UP_S = 6.0


class RawReceiver:
    """A loopback TCP server that plays ``script(connection, index)`` on each accepted
    connection (index counts from 0), for receivers no HTTP server library would imitate."""

    def __init__(self, script: Callable[[socket.socket, int], None], *, accept: bool = True):
        self.script = script
        self.stop = threading.Event()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.threads: list[threading.Thread] = []
        self.accepted: list[socket.socket] = []
        if accept:
            self._start(self._accept_loop)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.05)
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            index = self.connections
            self.connections += 1
            self.accepted.append(connection)
            self._start(self._play, connection, index)

    def _play(self, connection: socket.socket, index: int) -> None:
        with connection:
            try:
                self.script(connection, index)
            except OSError:
                pass  # the client hung up: expected once its deadline passes

    def paced(self, every_s: float) -> Iterator[None]:
        """Yields every ``every_s`` seconds until stopped or GIVE_UP_S have passed."""
        started = time.monotonic()
        while not self.stop.wait(every_s) and time.monotonic() - started < GIVE_UP_S:
            yield

    def drip(self, connection: socket.socket, data: bytes, every_s: float) -> None:
        """Send ``data`` one byte at a time, ``every_s`` apart (see :meth:`paced`)."""
        for byte, _ in zip(data, self.paced(every_s), strict=False):
            connection.sendall(bytes([byte]))

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for connection in self.accepted:  # wakes scripts blocked reading a kept-alive one
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)


def _read_request(connection: socket.socket) -> bytes:
    """Read one request head and its Content-Length body (the Sender always sends one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ENDLESS_HEADERS = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: a\r\n" * 10_000


@pytest.fixture
def raw_receivers() -> Iterator[Callable[..., RawReceiver]]:
    made: list[RawReceiver] = []

    def make(script: Callable[[socket.socket, int], None], **kwargs: Any) -> RawReceiver:
        made.append(RawReceiver(script, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _timed_post(sender: Sender, url: str) -> tuple[SendResult, float]:
    started = time.monotonic()
    result = sender.post(url, b'{"n": 1}', {"Content-Type": "application/json"})
    return result, time.monotonic() - started


@pytest.fixture
def deadline_sender() -> Iterator[Sender]:
    with Sender(timeout_s=DEADLINE_S, allow_insecure=True) as sender:
        yield sender


def test_deadline_ends_a_status_line_dripped_byte_by_byte(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    """Each byte arrives well within the per-read timeout; only a total deadline ends it."""

    def script(connection: socket.socket, index: int) -> None:
        _read_request(connection)
        server.drip(connection, ENDLESS_HEADERS, 0.3)

    server = raw_receivers(script)
    result, elapsed = _timed_post(deadline_sender, server.url())
    assert (result.status, result.error, result.body_excerpt) == (None, "timeout", "")
    assert elapsed < LIVENESS_S
    assert result.elapsed_ms >= DEADLINE_S * 1000 - 50  # it did wait for the receiver


def test_deadline_ends_headers_that_never_finish(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    def script(connection: socket.socket, index: int) -> None:
        _read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in server.paced(0.4):  # one whole header line at a time, never the end
            connection.sendall(b"X-Pad: still going\r\n")

    server = raw_receivers(script)
    result, elapsed = _timed_post(deadline_sender, server.url())
    assert (result.status, result.error) == (None, "timeout")
    assert elapsed < LIVENESS_S


def test_deadline_ends_an_endless_body_and_keeps_the_status(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    def script(connection: socket.socket, index: int) -> None:
        _read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nstart:")
        server.drip(connection, b"x" * 1_000_000, 0.2)

    server = raw_receivers(script)
    result, elapsed = _timed_post(deadline_sender, server.url())
    assert result.status == 200
    assert result.error == "timeout while reading body"
    assert result.body_excerpt.startswith("start:x")  # what arrived is kept
    assert elapsed < LIVENESS_S


def test_deadline_ends_a_chunked_body_that_never_ends(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    def script(connection: socket.socket, index: int) -> None:
        _read_request(connection)
        connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 9\r\n")
        connection.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in server.paced(0.2):
            connection.sendall(b"1\r\ny\r\n")

    server = raw_receivers(script)
    result, elapsed = _timed_post(deadline_sender, server.url())
    assert (result.status, result.retry_after_s) == (503, 9.0)
    assert result.error == "timeout while reading body"
    assert result.body_excerpt.startswith("yy")
    assert elapsed < LIVENESS_S


def test_deadline_ends_a_receiver_that_accepts_and_never_answers(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    def script(connection: socket.socket, index: int) -> None:
        _read_request(connection)
        server.stop.wait(GIVE_UP_S)

    server = raw_receivers(script)
    result, elapsed = _timed_post(deadline_sender, server.url())
    assert (result.status, result.error) == (None, "timeout")
    assert server.connections == 1
    assert elapsed < LIVENESS_S


def test_deadline_ends_a_receiver_that_never_accepts(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    """The kernel completes the handshake from the listen backlog; nobody ever reads."""
    server = raw_receivers(lambda connection, index: None, accept=False)
    result, elapsed = _timed_post(deadline_sender, server.url())
    assert (result.status, result.error) == (None, "timeout")
    assert elapsed < LIVENESS_S


def test_deadline_ends_a_tls_handshake_dripped_byte_by_byte(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    # A TLS record header announcing a 16 KiB handshake record, then its bytes, slowly.
    record = b"\x16\x03\x03\x40\x00" + b"\x02" * 0x4000

    def script(connection: socket.socket, index: int) -> None:
        connection.recv(65536)  # the ClientHello
        server.drip(connection, record, 0.2)

    server = raw_receivers(script)
    url = f"https://127.0.0.1:{server.port}/"
    result, elapsed = _timed_post(deadline_sender, url)
    assert (result.status, result.error) == (None, "timeout")
    assert elapsed < LIVENESS_S


def test_deadline_bounds_a_slow_dns_answer(
    monkeypatch: pytest.MonkeyPatch, deadline_sender: Sender, receiver: ReceiverServer
) -> None:
    answered = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host == "slow.example":
            answered.wait(GIVE_UP_S)  # a name server that does not answer
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        result, elapsed = _timed_post(deadline_sender, receiver.url("/ok", host="slow.example"))
    finally:
        answered.set()
    assert (result.status, result.error) == (None, "timeout")
    assert elapsed < LIVENESS_S
    assert receiver.connections == 0


def test_deadline_ends_a_request_body_read_slowly(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    """Every send makes some progress, so no single write times out; the deadline does."""

    def script(connection: socket.socket, index: int) -> None:
        for _ in server.paced(0.05):
            if not connection.recv(1 << 18):
                return

    server = raw_receivers(script)
    started = time.monotonic()
    result = deadline_sender.post(server.url(), b"x" * (64 << 20), {})
    assert (result.status, result.error) == (None, "timeout")
    assert time.monotonic() - started < LIVENESS_S


def test_https_through_the_deadline_stream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, raw_receivers: Callable[..., RawReceiver]
) -> None:
    """A whole request over TLS (a body of several records, a response) goes through the
    deadline-keeping stream that start_tls returns; the client trusts our test certificate."""
    import workers.http as http_module

    cert_path, key_path = _self_signed_localhost(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    client_context = ssl.create_default_context(cafile=str(cert_path))
    monkeypatch.setattr(http_module, "_ssl_context", lambda: client_context)
    received: list[int] = []

    def script(connection: socket.socket, index: int) -> None:
        with server_context.wrap_socket(connection, server_side=True) as tls:
            request = _read_request(tls)
            received.append(len(request))
            tls.sendall(OK_RESPONSE)

    server = raw_receivers(script)
    body = b"y" * 300_000
    with Sender(timeout_s=5, allow_insecure=True) as sender:
        result = sender.post(f"https://localhost:{server.port}/", body, {})
    assert (result.status, result.error, result.body_excerpt) == (200, None, "ok")
    assert len(received) == 1
    assert received[0] > len(body)  # all of it arrived


def test_a_timed_out_connection_is_not_reused(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    """The first connection is left mid-headers; had it gone back to the pool, the next
    request would read the rest of its dripped headers as its own response."""

    def script(connection: socket.socket, index: int) -> None:
        while _read_request(connection):
            if index == 0:
                server.drip(connection, ENDLESS_HEADERS, 0.3)
                return
            connection.sendall(OK_RESPONSE)

    server = raw_receivers(script)
    first, _ = _timed_post(deadline_sender, server.url())
    assert first.error == "timeout"
    second, _ = _timed_post(deadline_sender, server.url())
    assert (second.status, second.error, second.body_excerpt) == (200, None, "ok")
    assert server.connections == 2
    # The new connection, healthy, is kept alive as before.
    assert deadline_sender.post(server.url(), b"{}", {}).ok
    assert server.connections == 2


def test_the_deadline_is_per_request(
    deadline_sender: Sender, raw_receivers: Callable[..., RawReceiver]
) -> None:
    """Each post gets its whole timeout: requests on a kept-alive connection that together
    last longer than the timeout all succeed."""

    def script(connection: socket.socket, index: int) -> None:
        while _read_request(connection):
            server.stop.wait(0.4)
            connection.sendall(OK_RESPONSE)

    server = raw_receivers(script)
    results = [deadline_sender.post(server.url(), b"{}", {}) for _ in range(4)]
    assert [(r.status, r.error) for r in results] == [(200, None)] * 4
    assert server.connections == 1


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


@pytest.mark.parametrize(
    ("allowed", "error"),
    [
        (["127.0.0.0/8"], "tls error: certificate verification failed"),  # connected
        (["::ffff:127.0.0.1/128", "10.0.0.0/8"], "tls error: certificate verification failed"),
        (["10.0.0.0/8", "fd00::/8"], "blocked destination: loopback address"),
        ([], "blocked destination: loopback address"),
    ],
)
def test_allowed_networks_are_reached_over_https(
    tmp_path: Path, allowed: list[str], error: str
) -> None:
    """A strict Sender reaches a private (here: loopback) receiver only when its network is
    listed; TLS and certificate checks still apply to it."""
    cert_path, key_path = _self_signed_localhost(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    accepted: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.2)

        def serve_one() -> None:
            try:
                connection, peer = listener.accept()
            except OSError:
                return  # nobody came: the destination was refused
            accepted.append(peer[0])
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        with Sender(timeout_s=5, allow_insecure=False, allowed_networks=allowed) as sender:
            result = sender.post(f"https://localhost:{port}/", b"{}", {})
        thread.join(5)
    assert (result.status, result.error) == (None, error)
    assert accepted == ([] if error.startswith("blocked") else ["127.0.0.1"])


def test_allowed_networks_do_not_unlock_http(receiver: ReceiverServer) -> None:
    with Sender(timeout_s=5, allow_insecure=False, allowed_networks=["127.0.0.0/8"]) as sender:
        result = sender.post(receiver.url("/ok"), b"{}", {})
    assert result.error == "blocked destination: https required"
    assert receiver.connections == 0


def test_sender_from_settings() -> None:
    from rotator.settings import Settings

    settings = Settings(
        delivery_timeout_seconds=3.5,
        allow_insecure_urls=False,
        allowed_private_networks="10.0.0.0/8, fd00::/8",
    )
    with Sender.from_settings(settings, max_connections=3) as sender:
        assert (sender.timeout_s, sender.allow_insecure) == (3.5, False)
        pool = getattr(sender._transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        assert isinstance(backend, GuardedBackend)
        assert backend.allowed_networks == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("fd00::/8"),
        )
        assert getattr(pool, "_max_connections", None) == 3
        assert backend.refusal("10.9.8.7") is None
        assert backend.refusal("192.168.1.1") == "private address"


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


def test_backend_allows_listed_private_networks_only() -> None:
    inner = FakeInner()
    backend = GuardedBackend(
        allow_private=False,
        allowed_networks=["10.0.0.0/8", "fd00::/8"],
        inner=inner,
        resolve=_resolver(
            "10.1.2.3",  # listed
            "192.168.0.5",  # private, not listed
            "169.254.169.254",  # link-local, not listed
            "127.0.0.1",  # loopback, not listed
            "::ffff:10.1.2.4",  # IPv4-mapped, judged by its IPv4 address: listed
            "fd12::1",  # listed
            "::ffff:192.168.0.6",  # IPv4-mapped, not listed
        ),
    )
    assert backend.refusal("10.1.2.3") is None
    assert backend.refusal("::ffff:10.1.2.4") is None
    assert backend.refusal("169.254.169.254") == "link-local address"
    assert backend.refusal("::ffff:127.0.0.1") == "loopback address"
    assert backend.refusal("93.184.216.34") is None  # public addresses stay allowed
    # Every allowed address is tried in order until one connects; make them all fail.
    inner.failing = {"10.1.2.3", "::ffff:10.1.2.4", "fd12::1"}
    with pytest.raises(httpcore.ConnectError):
        backend.connect_tcp("receiver.internal", 443, timeout=1)
    assert inner.calls == ["10.1.2.3", "::ffff:10.1.2.4", "fd12::1"]


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


# --- the dispatcher's senders, lent by receiver -----------------------------------------------


@pytest.fixture
def other_receiver() -> Iterator[ReceiverServer]:
    with _serving() as server:
        yield server


@pytest.fixture
def loopback(settings: Settings) -> Settings:
    """Settings whose senders may reach the http:// receivers on 127.0.0.1."""
    return settings.model_copy(update={"allow_insecure_urls": True})


def test_pool_reuses_one_connection_per_receiver_across_receivers(
    loopback: Settings, receiver: ReceiverServer, other_receiver: ReceiverServer
) -> None:
    pool = SenderPool(loopback, idle_max=8)
    try:
        for _ in range(4):  # alternating: a single one-connection client would reconnect each time
            assert pool.post(receiver.url("/ok"), b"{}", {}).ok
            assert pool.post(other_receiver.url("/ok"), b"{}", {}).ok
    finally:
        pool.close()
    assert (receiver.connections, other_receiver.connections) == (1, 1)


def test_pool_opens_one_connection_per_concurrent_request_and_keeps_them(
    loopback: Settings, receiver: ReceiverServer
) -> None:
    pool = SenderPool(loopback, idle_max=8)
    try:
        with ThreadPoolExecutor(3) as threads:
            slow = [threads.submit(pool.post, receiver.url("/slow"), b"{}", {}) for _ in range(3)]
            deadline = time.monotonic() + 5
            while len(receiver.requests) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            receiver.release.set()
            assert all(future.result().ok for future in slow)
        assert receiver.connections == 3
        for _ in range(6):
            assert pool.post(receiver.url("/ok"), b"{}", {}).ok
    finally:
        pool.close()
    assert receiver.connections == 3


def test_pool_closes_the_least_recently_used_beyond_its_idle_bound(
    loopback: Settings, receiver: ReceiverServer, other_receiver: ReceiverServer
) -> None:
    pool = SenderPool(loopback, idle_max=1)
    try:
        assert pool.post(receiver.url("/ok"), b"{}", {}).ok
        assert pool.post(other_receiver.url("/ok"), b"{}", {}).ok  # evicts the first receiver's
        assert pool.post(receiver.url("/ok"), b"{}", {}).ok
        assert pool.post(other_receiver.url("/ok"), b"{}", {}).ok
    finally:
        pool.close()
    assert (receiver.connections, other_receiver.connections) == (2, 2)


def test_pool_refuses_what_a_sender_refuses(settings: Settings) -> None:
    strict = settings.model_copy(update={"allow_insecure_urls": False})
    pool = SenderPool(strict, idle_max=1)
    try:
        result = pool.post("http://127.0.0.1:9/hook", b"{}", {})
    finally:
        pool.close()
    assert (result.status, result.error) == (None, "blocked destination: https required")
