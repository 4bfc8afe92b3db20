"""Isolation: another organization's delivery latency and safe-migrate time, idle and behind a
backlog, in one run.

Usage (from the repository root; PostgreSQL and Redis running)::

    .venv/bin/python -m bench.isolation_bench

It starts the production topology as separate processes (``rotator api``, ``rotator worker -Q
control``, ``rotator worker -Q deliveries``, ``rotator beat``) on a database and a Redis
database of its own, and three loopback receivers in this process: a fast one, a slow one that
answers after ``--slow-seconds`` and one that drips a byte of its status line every second
and never finishes.

1. Idle: the quiet organization publishes ``--samples`` events one after another (the latency
   is POST /v1/events started -> the fast receiver has the request) and runs ``--migrations``
   safe migrates (POST .../migrate -> the operation reads ``succeeded``).
2. Backlog: the busy organization publishes ``--backlog-events`` events to ``--backlog-endpoints``
   endpoints on the slow receiver and one on the dripping receiver; while that drains, the
   quiet organization measures the same again.

Goal: behind the backlog, p99 delivery latency ≤ max(3 × idle p99, 2 s). Only 127.0.0.1
traffic; every phase has a timeout; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    HOST,
    BenchError,
    Proc,
    ensure_database,
    find_bin,
    flush_broker,
    free_port,
    rotator_cli,
)

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/rotator_bench_isolation"
DEFAULT_BROKER = "redis://127.0.0.1:6379/9"


# --- receivers ----------------------------------------------------------------------------------


class Arrivals:
    """When each event id first reached the fast receiver (monotonic seconds)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.changed = threading.Condition()

    def note(self, body: bytes) -> None:
        try:
            event_id = str(json.loads(body)["id"])
        except (ValueError, KeyError, TypeError):
            return
        with self.changed:
            self.at.setdefault(event_id, time.monotonic())
            self.changed.notify_all()

    def wait(self, event_id: str, timeout: float) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: event_id in self.at, timeout):
                raise BenchError(f"event {event_id} did not arrive within {timeout}s")
            return self.at[event_id]


@contextmanager
def http_receiver(delay_s: float, arrivals: Arrivals | None) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's dispatch name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if arrivals is not None:
                arrivals.note(body)
            if delay_s:
                time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer((HOST, 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}/hooks"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def dripping_receiver(every_s: float = 1.0) -> Iterator[str]:
    listener = socket.create_server((HOST, 0), backlog=256)
    listener.settimeout(0.2)
    stopping = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Drip: " + b"x" * 100_000:
                    if stopping.wait(every_s):
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
        yield f"http://{HOST}:{listener.getsockname()[1]}/hooks"
    finally:
        stopping.set()
        thread.join(timeout=5)
        listener.close()


# --- the API as a client sees it ----------------------------------------------------------------


class Org:
    def __init__(self, client: httpx.Client, api_key: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def endpoint(self, url: str) -> str:
        response = self.client.post(
            "/v1/webhooks", json={"url": url, "events": ["brand.vetted"]}, headers=self.headers
        )
        if response.status_code != 201:
            raise BenchError(f"create endpoint: {response.status_code} {response.text}")
        return str(response.json()["id"])

    def publish(self) -> str:
        response = self.client.post(
            "/v1/events", json={"type": "brand.vetted", "data": {"n": 1}}, headers=self.headers
        )
        if response.status_code != 202:
            raise BenchError(f"publish: {response.status_code} {response.text}")
        return str(response.json()["id"])

    def migrate(self, endpoint_id: str, url: str, timeout: float) -> float:
        """Seconds from the POST until the operation reads succeeded."""
        started = time.monotonic()
        response = self.client.post(
            f"/v1/webhooks/{endpoint_id}/migrate", json={"url": url}, headers=self.headers
        )
        if response.status_code != 202:
            raise BenchError(f"migrate: {response.status_code} {response.text}")
        operation_id = response.json()["id"]
        while time.monotonic() - started < timeout:
            state = self.client.get(f"/v1/operations/{operation_id}", headers=self.headers).json()[
                "state"
            ]
            if state == "succeeded":
                return time.monotonic() - started
            if state in ("rolled_back", "failed", "canceled"):
                raise BenchError(f"migration ended {state}")
            time.sleep(0.02)
        raise BenchError(f"migration not done within {timeout}s")


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure(
    org: Org, arrivals: Arrivals, fast_url: str, samples: int, migrations: int, timeout: float
) -> dict[str, Any]:
    latencies = []
    for _ in range(samples):
        started = time.monotonic()
        event_id = org.publish()
        latencies.append(arrivals.wait(event_id, timeout) - started)
        time.sleep(0.1)
    migrate_s = []
    for index in range(migrations):
        source = org.endpoint(fast_url)
        migrate_s.append(org.migrate(source, f"{fast_url}/m{index}", timeout))
    return {
        "delivery_p50_s": round(percentile(latencies, 50), 3),
        "delivery_p99_s": round(percentile(latencies, 99), 3),
        "delivery_max_s": round(max(latencies), 3),
        "migrate_median_s": round(statistics.median(migrate_s), 3),
        "migrate_max_s": round(max(migrate_s), 3),
    }


def pending_backlog(client: httpx.Client, org: Org) -> int:
    """Deliveries of the busy organization not yet succeeded, from the delivery log."""
    ok = 0
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 200, "outcome": "success"}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/webhooks/deliveries", params=params, headers=org.headers).json()
        ok += len(page["data"])
        cursor = page["meta"]["next_cursor"]
        if not cursor:
            return ok


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_database(args.database_url, ": use e.g. rotator_bench_isolation")
    flush_broker(args.broker_url)
    rotator = find_bin("rotator")
    log_dir = Path(tempfile.mkdtemp(prefix="rotator-isolation-"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("ROTATOR_")}
    env.update(
        {
            "ROTATOR_ENV": "development",
            "ROTATOR_DATA_DIR": str(log_dir),
            "ROTATOR_DATABASE_URL": args.database_url,
            "ROTATOR_BROKER_URL": args.broker_url,
            "ROTATOR_ALLOW_INSECURE_URLS": "true",
            "ROTATOR_LOG_LEVEL": "WARNING",
            "ROTATOR_DELIVERY_TIMEOUT_SECONDS": str(args.timeout),
            "ROTATOR_ENDPOINT_LIMIT": "500",
        }
    )
    rotator_cli(rotator, env, "db", "upgrade")
    api_port = free_port()
    procs = [
        Proc("api", [rotator, "api", "--host", HOST, "--port", str(api_port)], env, log_dir),
        Proc(
            "worker-control",
            [rotator, "worker", "-Q", "control", "--concurrency=2", "--loglevel=WARNING"],
            env,
            log_dir,
        ),
        Proc(
            "worker-deliveries",
            [rotator, "worker", "-Q", "deliveries", "--concurrency=2", "--loglevel=WARNING"],
            env,
            log_dir,
        ),
        Proc(
            "beat",
            [rotator, "beat", "--loglevel=WARNING", f"--schedule={log_dir / 'beat-schedule'}"],
            env,
            log_dir,
        ),
    ]
    quiet_key = json.loads(rotator_cli(rotator, env, "orgs", "create", "--name", "Quiet"))
    busy_key = json.loads(rotator_cli(rotator, env, "orgs", "create", "--name", "Busy"))
    arrivals = Arrivals()
    try:
        for proc in procs:
            proc.start()
        procs[0].wait_http(api_port, "/healthz")
        time.sleep(3)  # the workers' consumers
        with (
            httpx.Client(base_url=f"http://{HOST}:{api_port}", timeout=30) as client,
            http_receiver(0.0, arrivals) as fast_url,
            http_receiver(args.slow_seconds, None) as slow_url,
            dripping_receiver() as drip_url,
        ):
            quiet, busy = Org(client, quiet_key["api_key"]), Org(client, busy_key["api_key"])
            quiet.endpoint(fast_url)
            measure(quiet, arrivals, fast_url, 3, 1, args.phase_timeout)  # warm-up
            print("idle ...", flush=True)
            idle = measure(
                quiet, arrivals, fast_url, args.samples, args.migrations, args.phase_timeout
            )
            for index in range(args.backlog_endpoints):
                busy.endpoint(f"{slow_url}/{index}")
            busy.endpoint(drip_url)
            print(f"publishing the backlog ({args.backlog_events} events) ...", flush=True)
            for _ in range(args.backlog_events):
                busy.publish()
            total = args.backlog_events * (args.backlog_endpoints + 1)
            print("behind the backlog ...", flush=True)
            loaded = measure(
                quiet, arrivals, fast_url, args.samples, args.migrations, args.phase_timeout
            )
            done = pending_backlog(client, busy)
            for proc in procs:
                proc.check()
    finally:
        for proc in reversed(procs):
            proc.stop()
    goal = max(3 * idle["delivery_p99_s"], 2.0)
    return {
        "idle": idle,
        "backlog": loaded,
        "backlog_deliveries": total,
        "backlog_delivered_when_measured": done,
        "goal_p99_s": round(goal, 3),
        "goal_met": loaded["delivery_p99_s"] <= goal,
        "p99_ratio": round(loaded["delivery_p99_s"] / max(idle["delivery_p99_s"], 1e-9), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=DEFAULT_DATABASE)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--migrations", type=int, default=5)
    parser.add_argument("--backlog-endpoints", type=int, default=20)
    parser.add_argument("--backlog-events", type=int, default=100)
    parser.add_argument("--slow-seconds", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="delivery timeout, s")
    parser.add_argument("--phase-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except BenchError as exc:
        print(f"isolation bench failed: {exc}", file=sys.stderr)
        return 1
    idle, loaded = result["idle"], result["backlog"]
    print()
    print(f"{'':28}{'idle':>10}{'backlog':>10}")
    for key in ("delivery_p50_s", "delivery_p99_s", "delivery_max_s"):
        print(f"{key:28}{idle[key]:>10.3f}{loaded[key]:>10.3f}")
    for key in ("migrate_median_s", "migrate_max_s"):
        print(f"{key:28}{idle[key]:>10.3f}{loaded[key]:>10.3f}")
    print(
        f"\nbacklog: {result['backlog_deliveries']} deliveries, "
        f"{result['backlog_delivered_when_measured']} delivered when the measurement ended"
    )
    print(
        f"p99 behind the backlog / idle: {result['p99_ratio']}x; goal p99 <= "
        f"{result['goal_p99_s']} s: {'met' if result['goal_met'] else 'NOT met'}"
    )
    print(json.dumps(result))
    return 0 if result["goal_met"] else 2


if __name__ == "__main__":
    sys.exit(main())
