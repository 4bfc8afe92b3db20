"""Isolation with real processes: one organization's backlog to slow and dripping receivers
must not hold up another organization's delivery or safe migrate.

Real pass only: a control-plane worker (``-Q control``) and a data-plane worker
(``-Q deliveries``) as their own processes on Redis, as compose runs them, and beat. The
backlog drains for many seconds; the quiet organization's work must finish within a few.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from models.delivery import Delivery, DeliveryState
from models.operation import Operation, OperationState
from tests.factories import make_tenant
from tests.processes import BIN, rotator_env, start, start_beat, stop
from tests.receivers import scripted_receiver, serving
from tests.support import BACKEND, E2E_SETTINGS, overridden, settings_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(BACKEND != "real", reason="needs the two planes as their own processes"),
]

SLOW_ANSWER_S = 1.0
DRIP_EVERY_S = 0.5
# Small numbers that still make a backlog of many seconds: 16 slots, an organization may hold
# 12 of them, an endpoint 2.
PLANE_SETTINGS: dict[str, Any] = {
    **E2E_SETTINGS,
    "delivery_timeout_seconds": 3.0,
    "delivery_retry_schedule": [30.0],
    "delivery_concurrency": 16,
    "endpoint_max_in_flight": 2,
    "org_max_in_flight": 12,
    "migrate_backoff_initial_seconds": 0.5,
    "migrate_backoff_max_seconds": 1.0,
}
# Bounded waits for liveness (not speed measurements: bench/isolation_bench.py measures).
QUIET_BOUND_S = 8.0


class _Slow(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's dispatch name
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        time.sleep(SLOW_ANSWER_S)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return


@pytest.fixture
def drip_url() -> Iterator[str]:
    """A receiver that reads the request, then sends one byte of its status line every
    ``DRIP_EVERY_S`` seconds and never finishes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Drip: " + b"x" * 10_000:
                    if stopping.wait(DRIP_EVERY_S):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hooks"
    finally:
        stopping.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def planes(database, tmp_path: Path) -> Iterator[None]:
    """``rotator worker -Q control``, ``rotator worker -Q deliveries`` and ``rotator beat``."""
    from workers.app import app as celery_app

    with overridden(database.settings, **PLANE_SETTINGS) as settings:
        celery_app.control.purge()
        env = {**rotator_env(), **settings_env(settings)}
        procs = []
        for queue in ("control", "deliveries"):
            log = tmp_path / f"worker-{queue}.log"
            command = [str(BIN / "rotator"), "worker", "--loglevel=INFO", "--concurrency=1"]
            command += ["--without-mingle", "--without-gossip", "-Q", queue]
            command += [f"--hostname={queue}-{os.getpid()}@%h"]
            procs.append((start(command, env, log, cwd=tmp_path), log))
        beat = start_beat(env, tmp_path / "beat.log")
        try:
            for proc, log in procs:
                deadline = time.monotonic() + 30
                while "ready." not in log.read_text(errors="replace"):
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
            yield
        finally:
            stop(beat)
            for proc, _ in procs:
                stop(proc)


def _endpoint(client, tenant, url: str) -> dict[str, Any]:
    created = client.post(
        "/v1/webhooks", json={"url": url, "events": ["brand.vetted"]}, headers=tenant.headers
    )
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def _publish(client, tenant) -> dict[str, Any]:
    published = client.post(
        "/v1/events", json={"type": "brand.vetted", "data": {"n": 1}}, headers=tenant.headers
    )
    assert published.status_code == 202, published.text
    body: dict[str, Any] = published.json()
    return body


def _pending(database, org_id: uuid.UUID) -> int:
    with database.session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.org_id == org_id, Delivery.state == DeliveryState.PENDING)
            )
            or 0
        )


def _wait(predicate, timeout: float, what: str) -> float:
    """Seconds until ``predicate`` held (fails after ``timeout``)."""
    start_at = time.monotonic()
    while time.monotonic() - start_at < timeout:
        if predicate():
            return time.monotonic() - start_at
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def test_a_backlog_to_slow_and_dripping_receivers_stalls_no_other_organization(
    client, database, planes, drip_url
):
    busy, quiet = make_tenant(database, name="Busy"), make_tenant(database, name="Quiet")
    with serving(_Slow) as slow_port, scripted_receiver() as fast:
        for index in range(8):
            _endpoint(client, busy, f"http://127.0.0.1:{slow_port}/{index}")
        _endpoint(client, busy, drip_url)
        for _ in range(25):
            _publish(client, busy)  # 225 deliveries: at 12 in flight, ~20 s of backlog
        _wait(lambda: _pending(database, busy.org_id) < 225, 10, "the backlog started")

        # Another organization's delivery goes out at once, whatever the backlog.
        _endpoint(client, quiet, fast.url)
        (item,) = _publish(client, quiet)["deliveries"]

        def delivered() -> bool:
            with database.session() as session:
                row = session.get(Delivery, uuid.UUID(item["id"]))
                return row is not None and row.state == DeliveryState.SUCCEEDED

        _wait(delivered, QUIET_BOUND_S, "the quiet organization's delivery")

        # And its safe migrate runs to the end.
        source = _endpoint(client, quiet, fast.url)
        started = client.post(
            f"/v1/webhooks/{source['id']}/migrate",
            json={"url": fast.url + "/new"},
            headers=quiet.headers,
        )
        assert started.status_code == 202, started.text

        def migrated() -> bool:
            with database.session() as session:
                operation = session.get(Operation, uuid.UUID(started.json()["id"]))
                assert operation is not None
                assert operation.state not in (OperationState.ROLLED_BACK, OperationState.FAILED)
                return operation.state == OperationState.SUCCEEDED

        _wait(migrated, QUIET_BOUND_S, "the quiet organization's safe migrate")
        # All that happened while the busy organization's backlog was still draining.
        assert _pending(database, busy.org_id) > 50
