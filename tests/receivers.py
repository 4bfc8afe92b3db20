"""A scriptable webhook receiver on loopback: real HTTP, programmable answers, full record."""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from receiver import DemoReceiver, serve


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class ScriptedReceiver:
    """Answers each request with the next scripted status (then ``default_status``)."""

    port: int = 0
    default_status: int = 200
    script: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def answer(self, *statuses: int, headers: dict[str, str] | None = None) -> None:
        for status in statuses:
            self.script.append((status, headers or {}))

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"{len(self.received)} of {count} deliveries arrived")
            return list(self.received)


@contextmanager
def scripted_receiver(default_status: int = 200) -> Iterator[ScriptedReceiver]:
    state = ScriptedReceiver(default_status=default_status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's dispatch name
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            status, extra = state.script.popleft() if state.script else (state.default_status, {})
            reply = b'{"ok": true}' if status < 300 else b'{"ok": false}'
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            with state.arrived:
                state.received.append(Received(self.path, dict(self.headers.items()), body))
                state.arrived.notify_all()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    with serving(Handler) as port:
        state.port = port
        yield state


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """Serve ``handler`` on a free loopback port in a thread; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def loopback_demo_receiver(**options: Any) -> Iterator[DemoReceiver]:
    """The demo receiver on a free loopback port (``.url``), knowing only a placeholder secret
    until a test installs real ones; ``options`` go to ``DemoReceiver``."""
    receiver = DemoReceiver(["A" * 43 + "="], **options)
    server = serve(receiver, "127.0.0.1", 0)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"  # type: ignore[attr-defined]
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class DrippingReceiver:
    """Reads each request, then answers one header byte every ``interval_s`` and never
    finishes, until ``release``: then it closes every connection (the sender sees an error)."""

    interval_s: float
    port: int = 0
    received: int = 0  # requests read so far
    released: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/drip"

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with self.arrived:
            if not self.arrived.wait_for(lambda: self.received >= count, timeout):
                raise TimeoutError(f"{self.received} of {count} requests arrived")

    def release(self) -> None:
        self.released.set()


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


@contextmanager
def dripping_receiver(interval_s: float) -> Iterator[DrippingReceiver]:
    """A raw-socket receiver on a free loopback port that drips its answer (see above)."""
    state = DrippingReceiver(interval_s=interval_s)
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    listener.settimeout(0.1)
    state.port = listener.getsockname()[1]
    threads: list[threading.Thread] = []

    def drip(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                _read_request(conn)
                with state.arrived:
                    state.received += 1
                    state.arrived.notify_all()
                head = b"HTTP/1.1 200 OK\r\nX-Drip: " + b"." * 10_000
                for byte in head:
                    if state.released.wait(state.interval_s):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the sender gave up

    def accept() -> None:
        while not state.released.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=drip, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield state
    finally:
        state.release()
        acceptor.join(timeout=5)
        listener.close()
        for thread in threads:
            thread.join(timeout=5)
