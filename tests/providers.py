"""A remote provider for the tests: a Rotator API (it serves the AgentMessage API) behind a
loopback proxy that forwards every request and can, on cue, answer in its place (429, 503) or
lose the answer to a request the remote did carry out."""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


@dataclass
class Fault:
    method: str
    path_suffix: str
    status: int | None  # None: forward the request, then drop the connection unanswered
    headers: dict[str, str] = field(default_factory=dict)
    then: Callable[[], None] | None = None  # run after forwarding, before dropping


@dataclass
class ProviderProxy:
    """Forwards to ``target``; each request matching a queued ``Fault`` meets it instead."""

    target: str
    port: int = 0
    faults: deque[Fault] = field(default_factory=deque)
    seen: list[tuple[str, str, int | None]] = field(default_factory=list)  # method, path, status
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(
        self,
        method: str,
        path_suffix: str,
        status: int,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        for _ in range(times):
            self.faults.append(Fault(method, path_suffix, status, headers or {}))

    def lose_answer(
        self, method: str, path_suffix: str, then: Callable[[], None] | None = None
    ) -> None:
        """The next such request reaches the remote; its answer never comes back."""
        self.faults.append(Fault(method, path_suffix, None, then=then))

    def calls(self, method: str, path_suffix: str = "") -> list[tuple[str, str, int | None]]:
        with self.lock:
            return [
                seen
                for seen in self.seen
                if seen[0] == method and seen[1].split("?")[0].endswith(path_suffix)
            ]

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and path.split("?")[0].endswith(fault.path_suffix):
                    self.faults.remove(fault)
                    return fault
        return None


@contextmanager
def provider_proxy(target: str) -> Iterator[ProviderProxy]:
    state = ProviderProxy(target=target)
    upstream = httpx.Client(base_url=target, timeout=30)

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(length) if length else b""
            fault = state._fault_for(self.command, self.path)
            if fault is not None and fault.status is not None:
                with state.lock:
                    state.seen.append((self.command, self.path, fault.status))
                reply = b'{"success": false, "error": {"code": "X", "message": "injected"}}'
                self.send_response(fault.status)
                for name, value in fault.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                return
            headers = {
                name: value
                for name, value in self.headers.items()
                if name.lower() in ("authorization", "content-type", "idempotency-key")
            }
            response = upstream.request(self.command, self.path, content=body, headers=headers)
            with state.lock:
                state.seen.append((self.command, self.path, response.status_code))
            if fault is not None:  # the remote did it; its answer is lost
                if fault.then is not None:
                    fault.then()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(response.status_code)
            for name, value in response.headers.items():
                if name.lower() in ("content-type", "retry-after"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_GET = do_POST = do_PATCH = do_DELETE = _handle  # noqa: N815 - http.server's names

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="provider-proxy", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        upstream.close()
