"""A fast loopback webhook receiver for ``bench/delivery_bench.py``: counts and timestamps.

Usage::

    .venv/bin/python bench/receiver_server.py --port 9100

A minimal HTTP/1.1 server on an asyncio ``Protocol`` (keep-alive, Content-Length bodies, no
chunked uploads), in its own process, standard library only. It does no verification: it
answers every POST with ``200 ok`` at once, so whatever sends to it is the bottleneck.

For each POST it records (arrival time as unix seconds, path, ``webhook-id`` header, body
bytes). The benchmark reads them back:

* ``GET /stats``          ``{"count", "bytes", "first", "last", "paths"}``
* ``GET /stats?detail=1`` the same plus ``"arrivals": [[t, path, webhook_id, bytes], ...]``
* ``POST /reset``         forget everything recorded so far (not itself recorded)
* ``GET /healthz``        200 (readiness)

Only ``127.0.0.1`` is bound by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Record:
    arrivals: list[tuple[float, str, str, int]] = field(default_factory=list)
    total_bytes: int = 0

    def add(self, path: str, webhook_id: str, size: int) -> None:
        self.arrivals.append((time.time(), path, webhook_id, size))
        self.total_bytes += size

    def stats(self, detail: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": len(self.arrivals),
            "bytes": self.total_bytes,
            "first": self.arrivals[0][0] if self.arrivals else None,
            "last": self.arrivals[-1][0] if self.arrivals else None,
            "paths": dict(Counter(path for _, path, _, _ in self.arrivals)),
        }
        if detail:
            out["arrivals"] = [list(item) for item in self.arrivals]
        return out


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 404: "Not Found", 400: "Bad Request"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Receiver(asyncio.Protocol):
    def __init__(self, record: Record) -> None:
        self.record = record
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._fail()
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            try:
                method, target, _version = lines[0].decode("latin-1").split(" ", 2)
            except ValueError:
                self._fail()
                return
            length = 0
            webhook_id = ""
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                key = name.strip().lower()
                if key == b"content-length":
                    length = int(value.strip() or b"0")
                elif key == b"webhook-id":
                    webhook_id = value.strip().decode("latin-1")
                elif key == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif key == b"transfer-encoding":
                    self._fail()  # not needed by any client of this benchmark
                    return
            if length < 0 or length > MAX_BODY:
                self._fail()
                return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            self.transport.write(self._answer(method, target, webhook_id, length))
            if close:
                self.transport.close()
                self.transport = None

    def _answer(self, method: str, target: str, webhook_id: str, length: int) -> bytes:
        path, _, query = target.partition("?")
        if method == "POST" and path == "/reset":
            self.record.arrivals.clear()
            self.record.total_bytes = 0
            return _response(200, b"{}")
        if method == "POST":
            self.record.add(path, webhook_id, length)
            return OK
        if method == "GET" and path == "/stats":
            detail = "detail=1" in query
            return _response(200, json.dumps(self.record.stats(detail)).encode())
        if method == "GET" and path == "/healthz":
            return _response(200, b"ok", "text/plain")
        return _response(404, b"{}")

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.write(_response(400, b"{}"))
            self.transport.close()
            self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    record = Record()
    server = await loop.create_server(lambda: Receiver(record), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"receiver listening on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark webhook receiver (counts, times)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
