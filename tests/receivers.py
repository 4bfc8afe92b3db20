"""A scriptable webhook receiver on loopback: real HTTP, programmable answers, full record."""

from __future__ import annotations

import json
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
