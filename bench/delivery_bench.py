"""Delivery throughput: Rotator (publish -> worker -> receiver 2xx) next to a plain httpx loop.

Usage (from the repository root; PostgreSQL and Redis running)::

    .venv/bin/python -m bench.delivery_bench --workers prefork:2,prefork:4,threads:4

For each worker setting, in one run:

1. ``rotator`` side: a ``rotator worker`` with that pool and concurrency is started; a warm-up
   round is delivered (forks done, connections and pools open); then ``--events`` events are
   published (through ``rotator api`` with one keep-alive client, or with ``--publish domain``
   through ``models.delivery.publish`` + ``workers.deliveries.enqueue`` in this process, one
   transaction per event as the API does), each fanning out to ``--endpoints`` endpoints on the
   receiver (one ``delivery.send`` message per event carries its delivery ids). The
   clock runs from the first publish until the receiver has counted every delivery.
2. ``plain`` side: the worker is stopped; the same number of bodies of the same size, with the
   same header set (signed the same way), are POSTed to the same receiver by a thread pool of
   ``httpx.Client``s with the same concurrency. The clock runs from the first submit until the
   receiver has counted all of them.

The receiver (``bench/receiver_server.py``) runs in its own process and records an arrival
time per request. Latency is publish -> arrival (Rotator: the event's POST /v1/events started;
plain: every request is submitted at the start, as a burst of publishes would be). A separate
"idle" probe sends single events one at a time for the unloaded publish -> arrival latency.

Only 127.0.0.1 traffic; every phase has a timeout; every process started here is stopped at the
end. Redis: the broker URL's database is flushed at start (use a database of your own: default
``redis://127.0.0.1:6379/7``). Results: a table on stdout, JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    ROOT,
    BenchError,
    Proc,
    cpu_snapshot,
    db_name,
    ensure_database,
    find_bin,
    flush_broker,
    free_port,
    http_call,
    rotator_cli,
    vacuum_analyze,
)

RESULTS_DIR = ROOT / "bench" / "results"
GOAL_RATIO = 0.50
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rotator_bench_deliveries"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/7"
EVENT_TYPE = "campaign.approved"
IDLE_EVENT_TYPE = "brand.vetted"  # only the one idle-probe endpoint subscribes to it
API_VERSION = "2026-04-01"
READY_TIMEOUT_S = 60.0
# Worker options used unless --worker-args says otherwise: no broker chatter between workers
# (heartbeat/gossip/mingle are for multi-node clusters and remote control) and fair scheduling.
RECOMMENDED_WORKER_ARGS = "--without-heartbeat --without-gossip --without-mingle -O fair"


# --- CPU accounting from /proc ------------------------------------------------------------------


def cpu_ms_per_item(
    before: dict[str, float], after: dict[str, float], items: int
) -> dict[str, float]:
    """CPU milliseconds per delivery, per tracked process group, and their ``total``."""
    names = [name for name in before if not name.startswith("machine")]
    out = {name: round(1000.0 * (after[name] - before[name]) / items, 3) for name in names}
    out["total"] = round(sum(out.values()), 3)
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Percent of one core per process group; ``other`` likewise; machine percent of all cores."""
    out = {
        name: round(100.0 * (after[name] - before[name]) / wall, 1)
        for name in before
        if not name.startswith("machine")
    }
    total = after["machine_total"] - before["machine_total"]
    busy = after["machine_busy"] - before["machine_busy"]
    tracked = sum(after[n] - before[n] for n in before if not n.startswith("machine"))
    out["other"] = round(100.0 * max(0.0, busy - tracked) / wall, 1)
    out["machine_all_cores"] = round(100.0 * busy / total, 1) if total > 0 else 0.0
    return out


# --- receiver -----------------------------------------------------------------------------------


class ReceiverClient:
    def __init__(self, port: int) -> None:
        self.port = port

    def reset(self) -> None:
        http_call(self.port, "POST", "/reset", body=b"")

    def stats(self, detail: bool = False) -> dict[str, Any]:
        status, raw = http_call(self.port, "GET", "/stats?detail=1" if detail else "/stats")
        if status != 200:
            raise BenchError(f"receiver /stats answered {status}")
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    def wait_count(self, expected: int, timeout: float, poll: float = 0.02) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["count"] >= expected:
                return stats
            if time.monotonic() > deadline:
                raise BenchError(f"receiver counted {stats['count']} of {expected} in {timeout}s")
            time.sleep(poll)


# --- rotator setup ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    env: dict[str, str]
    api_key: str
    org_id: str


def prepare_rotator(
    rotator: str, database_url: str, broker_url: str, overrides: Sequence[str] = ()
) -> Setup:
    ensure_database(database_url)
    flush_broker(broker_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    key = rotator_cli(rotator, env, "secrets", "genkey")
    env.update(
        ROTATOR_DATABASE_URL=database_url,
        ROTATOR_BROKER_URL=broker_url,
        ROTATOR_ENCRYPTION_KEYS=key,
        # Not "production": it refuses ROTATOR_ALLOW_INSECURE_URLS, which the loopback
        # http:// receiver needs; the environment changes nothing else once a key is given.
        ROTATOR_ENV="test",
        ROTATOR_ALLOW_INSECURE_URLS="true",
        ROTATOR_LOG_LEVEL=os.environ.get("ROTATOR_LOG_LEVEL", "WARNING"),
    )
    for item in overrides:
        name, _, value = item.partition("=")
        env[name] = value
    rotator_cli(rotator, env, "db", "upgrade")
    vacuum_analyze(database_url)
    issued = json.loads(rotator_cli(rotator, env, "orgs", "create", "--name", "delivery-bench"))
    return Setup(env=env, api_key=str(issued["api_key"]), org_id=str(issued["org_id"]))


def event_data(size: int, index: int) -> dict[str, Any]:
    return {"campaign_id": f"cmp_{index:08d}", "note": "x" * max(0, size)}


class Publisher:
    """Publishes events and creates endpoints, through the API or through the domain functions."""

    def __init__(self, mode: str, setup: Setup, api_port: int | None) -> None:
        self.mode = mode
        self.setup = setup
        self.api_port = api_port
        self._conn: http.client.HTTPConnection | None = None
        if mode != "api":
            # The project reads its settings from the environment once, at first use.
            os.environ.update(setup.env)
            from models.db import get_database

            self._db = get_database()

    def _api(self, method: str, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        if self._conn is None:
            assert self.api_port is not None
            self._conn = http.client.HTTPConnection(HOST, self.api_port, timeout=30)
        body = json.dumps(payload).encode()
        headers = {
            "Authorization": f"Bearer {self.setup.api_key}",
            "Content-Type": "application/json",
        }
        try:
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # uvicorn closed the idle keep-alive connection (5 s) before this request arrived.
            self.close()
            self._conn = http.client.HTTPConnection(HOST, self.api_port or 0, timeout=30)
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
        return response.status, json.loads(response.read())

    def create_endpoint(self, url: str, events: list[str]) -> str:
        if self.mode == "api":
            status, body = self._api("POST", "/v1/webhooks", {"url": url, "events": events})
            if status != 201:
                raise BenchError(f"POST /v1/webhooks answered {status}: {body}")
            return str(body["id"])
        import uuid

        from models.endpoint import create_endpoint

        with self._db.session() as session:
            made = create_endpoint(
                session, uuid.UUID(self.setup.org_id), url=url, events=events
            ).endpoint
        return str(made.id)

    def publish(self, event_type: str, data: dict[str, Any]) -> tuple[str, int]:
        """Publish one event; (event id, number of deliveries)."""
        if self.mode == "api":
            status, body = self._api("POST", "/v1/events", {"type": event_type, "data": data})
            if status != 202:
                raise BenchError(f"POST /v1/events answered {status}: {body}")
            return str(body["id"]), len(body["deliveries"])
        import uuid

        from models import delivery as deliveries
        from workers.deliveries import enqueue

        with self._db.session() as session:  # exactly what POST /v1/events does
            event, created = deliveries.publish(
                session, uuid.UUID(self.setup.org_id), event_type, data
            )
            enqueue(session, [item.id for item in created])
            event_id = event.id
        return event_id, len(created)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- results ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100.0 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Phase:
    side: str  # "rotator" or "plain"
    setting: str  # e.g. "prefork:4"
    concurrency: int
    deliveries: int
    received: int
    seconds: float
    per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    body_bytes: float
    cpu_pct: dict[str, float]
    worker_cpu_ms_per_delivery: float | None = None
    cpu_ms_per_delivery: dict[str, float] = field(default_factory=dict)
    publish_seconds: float | None = None
    http_p50_ms: float | None = None  # per request, as the sender saw it
    http_p99_ms: float | None = None
    states: dict[str, int] = field(default_factory=dict)
    idle_p50_ms: float | None = None
    idle_p99_ms: float | None = None


def latency_summary(latencies_s: Sequence[float]) -> tuple[float, float, float]:
    ms = [1000.0 * value for value in latencies_s]
    return percentile(ms, 50), percentile(ms, 99), max(ms) if ms else float("nan")


def db_report(database_url: str, event_ids: Sequence[str]) -> tuple[dict[str, int], list[float]]:
    """Delivery states and the worker-side HTTP times of the attempts of these events.

    The receiver counts a delivery before the worker records it: give the last records a few
    seconds to commit before reading the states.
    """
    import psycopg

    with psycopg.connect(database_url, connect_timeout=5, autocommit=True) as connection:
        deadline = time.monotonic() + 10.0
        while True:
            states: dict[Any, Any] = dict(
                connection.execute(
                    "SELECT state, count(*) FROM deliveries WHERE event_id = ANY(%s) "
                    "GROUP BY state",
                    (list(event_ids),),
                ).fetchall()
            )
            if "pending" not in states or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        times = [
            float(row[0])
            for row in connection.execute(
                "SELECT response_time_ms FROM delivery_attempts WHERE event_id = ANY(%s)",
                (list(event_ids),),
            ).fetchall()
        ]
    return {str(k): int(v) for k, v in states.items()}, times


# --- the two sides ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSetting:
    pool: str
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.pool}:{self.concurrency}"

    @classmethod
    def parse(cls, text: str) -> WorkerSetting:
        pool, _, number = text.partition(":")
        if pool not in ("prefork", "threads", "solo") or not number.isdigit():
            raise ValueError(f"worker setting {text!r}: use prefork:N, threads:N or solo:1")
        return cls(pool, int(number))


def worker_command(args: argparse.Namespace, setting: WorkerSetting) -> list[str]:
    return [
        find_bin("rotator"),
        "worker",
        "--pool",
        setting.pool,
        "--concurrency",
        str(setting.concurrency),
        "--loglevel",
        "WARNING",
        *args.worker_args.split(),
    ]


def run_rotator(
    args: argparse.Namespace,
    setting: WorkerSetting,
    setup: Setup,
    publisher: Publisher,
    receiver: ReceiverClient,
    groups: dict[str, int],
    log_dir: Path,
) -> Phase:
    worker = Proc(f"worker-{setting.pool}-{setting.concurrency}", [], setup.env, log_dir)
    worker.command = worker_command(args, setting)
    try:
        worker.start()
        assert worker.pid is not None
        groups = {**groups, "worker": worker.pid}

        # Warm-up: every pool process/thread gets work, opens its DB and HTTP connections.
        publisher.close()  # a fresh API connection: the last one may have idled out
        receiver.reset()
        warm_events = max(2, (setting.concurrency * 2 + args.endpoints - 1) // args.endpoints)
        expected = 0
        for index in range(warm_events):
            expected += publisher.publish(EVENT_TYPE, event_data(args.data_bytes, index))[1]
        receiver.wait_count(expected, READY_TIMEOUT_S)
        if not worker.alive():
            raise BenchError(f"worker exited:\n{worker.log_tail()}")

        # Idle latency: one delivery at a time (the probe endpoint alone takes this type).
        idle: list[float] = []
        for index in range(args.idle_probes):
            receiver.reset()
            started = time.time()
            publisher.publish(IDLE_EVENT_TYPE, event_data(args.data_bytes, index))
            stats = receiver.wait_count(1, args.timeout, poll=0.002)
            idle.append(float(stats["first"]) - started)

        receiver.reset()
        time.sleep(0.2)
        profiler = start_profiler(args, worker.pid, setting, log_dir)
        before = cpu_snapshot(groups, db_name(args.database_url))
        started_wall = time.perf_counter()
        t0 = time.time()
        published_at: dict[str, float] = {}
        total = 0
        for index in range(args.events):
            at = time.time()
            event_id, count = publisher.publish(EVENT_TYPE, event_data(args.data_bytes, index))
            published_at[event_id] = at
            total += count
        publish_seconds = time.time() - t0
        receiver.wait_count(total, args.timeout)
        wall = time.perf_counter() - started_wall
        after = cpu_snapshot(groups, db_name(args.database_url))
        stop_profiler(profiler)
        stats = receiver.stats(detail=True)
        # Before stopping the worker: the last records commit just after the last arrivals.
        states, http_ms = db_report(args.database_url, list(published_at))
    finally:
        worker.stop()

    arrivals = [row for row in stats["arrivals"] if row[2] in published_at]
    last = max(row[0] for row in arrivals)
    seconds = last - t0
    p50, p99, worst = latency_summary([row[0] - published_at[row[2]] for row in arrivals])
    cpu = cpu_delta(before, after, wall)
    worker_cpu_s = (after["worker"] - before["worker"]) if "worker" in after else 0.0
    idle_ms = [1000.0 * value for value in idle]
    return Phase(
        side="rotator",
        setting=setting.label,
        concurrency=setting.concurrency,
        deliveries=total,
        received=len(arrivals),
        seconds=round(seconds, 3),
        per_s=round(total / seconds, 1),
        p50_ms=round(p50, 1),
        p99_ms=round(p99, 1),
        max_ms=round(worst, 1),
        body_bytes=round(stats["bytes"] / max(1, stats["count"]), 1),
        cpu_pct=cpu,
        worker_cpu_ms_per_delivery=round(1000.0 * worker_cpu_s / total, 2),
        cpu_ms_per_delivery=cpu_ms_per_item(before, after, total),
        publish_seconds=round(publish_seconds, 3),
        http_p50_ms=percentile(http_ms, 50),
        http_p99_ms=percentile(http_ms, 99),
        states=states,
        idle_p50_ms=round(percentile(idle_ms, 50), 1) if idle_ms else None,
        idle_p99_ms=round(percentile(idle_ms, 99), 1) if idle_ms else None,
    )


def baseline_bodies(args: argparse.Namespace, org_id: str, count: int) -> list[tuple[str, bytes]]:
    """Envelopes shaped and sized exactly like Rotator's (same fields, same data)."""
    from models.clock import rfc3339
    from models.ids import new_event_id

    per_event = args.endpoints
    out: list[tuple[str, bytes]] = []
    for index in range((count + per_event - 1) // per_event):
        event_id = new_event_id()
        now = datetime.now(UTC)
        body = json.dumps(
            {
                "id": event_id,
                "type": EVENT_TYPE,
                "api_version": API_VERSION,
                "created_at": rfc3339(now),
                "org_id": org_id,
                "data": event_data(args.data_bytes, index),
            },
            separators=(",", ":"),
        ).encode()
        out.extend((event_id, body) for _ in range(per_event))
    return out[:count]


def run_plain(
    args: argparse.Namespace,
    setting: WorkerSetting,
    org_id: str,
    receiver: ReceiverClient,
    groups: dict[str, int],
) -> Phase:
    """The same bodies, same headers, same receiver, same concurrency: a plain httpx loop."""
    import httpx

    from receiver.signing import signature_headers

    count = args.events * args.endpoints
    bodies = baseline_bodies(args, org_id, count)
    keys = [secrets.token_bytes(32) for _ in range(args.endpoints)]
    urls = [f"http://{HOST}:{receiver.port}/hook/{index}" for index in range(args.endpoints)]
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        found: httpx.Client | None = getattr(local, "client", None)
        if found is None:
            found = httpx.Client(timeout=10.0, trust_env=False)
            local.client = found
            with lock:
                clients.append(found)
        return found

    def post(index: int) -> float:
        event_id, body = bodies[index]
        endpoint = index % args.endpoints
        headers = {
            "Content-Type": "application/json",
            **signature_headers(
                endpoint_key=keys[endpoint], msg_id=event_id, timestamp=int(time.time()), body=body
            ),
        }
        start = time.perf_counter()
        response = client().post(urls[endpoint], content=body, headers=headers)
        response.read()
        if not 200 <= response.status_code < 300:
            raise BenchError(f"receiver answered {response.status_code}")
        return time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=setting.concurrency) as pool:
        # Warm-up: one request per thread opens its connection (not measured).
        list(pool.map(lambda _: client().get(f"http://{HOST}:{receiver.port}/healthz"), range(64)))
        receiver.reset()
        time.sleep(0.2)
        before = cpu_snapshot(groups, db_name(args.database_url))
        started_wall = time.perf_counter()
        t0 = time.time()
        rtts = list(pool.map(post, range(count)))
        receiver.wait_count(count, args.timeout)
        wall = time.perf_counter() - started_wall
        after = cpu_snapshot(groups, db_name(args.database_url))
    for item in clients:
        item.close()
    stats = receiver.stats(detail=True)
    arrivals = stats["arrivals"]
    seconds = max(row[0] for row in arrivals) - t0
    p50, p99, worst = latency_summary([row[0] - t0 for row in arrivals])
    rtt_ms = [1000.0 * value for value in rtts]
    return Phase(
        side="plain",
        setting=f"httpx x{setting.concurrency}",
        concurrency=setting.concurrency,
        deliveries=count,
        received=len(arrivals),
        seconds=round(seconds, 3),
        per_s=round(count / seconds, 1),
        p50_ms=round(p50, 1),
        p99_ms=round(p99, 1),
        max_ms=round(worst, 1),
        body_bytes=round(stats["bytes"] / max(1, stats["count"]), 1),
        cpu_pct=cpu_delta(before, after, wall),
        cpu_ms_per_delivery=cpu_ms_per_item(before, after, count),
        http_p50_ms=round(percentile(rtt_ms, 50), 2),
        http_p99_ms=round(percentile(rtt_ms, 99), 2),
    )


# --- optional profiling ---------------------------------------------------------------------


def start_profiler(
    args: argparse.Namespace, worker_pid: int, setting: WorkerSetting, log_dir: Path
) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` (on-CPU samples) of the whole worker, parent and pool children."""
    if not args.profile:
        return None
    py_spy = find_bin("py-spy")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"profile-{setting.pool}-{setting.concurrency}-{stamp}.txt"
    command = [py_spy, "record", "--pid", str(worker_pid), "--subprocesses"]
    command += ["--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"]
    print(f"    profiling the worker into {out.relative_to(ROOT)}", flush=True)
    with (log_dir / "py-spy.log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # py-spy attaches before the load starts
    return process


def stop_profiler(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


# --- reporting ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(phases: Sequence[Phase]) -> None:
    """One row per phase. ``send CPU``: the worker's (rotator) or this loop's (plain) CPU, % of a
    core; ``send ms``/``all ms``: CPU ms per delivery of that process / of every process we
    track (worker, API, receiver, our PostgreSQL backends, Redis, this process); ``other``: %
    of a core the machine spent elsewhere (other users); ``all CPU``: machine busy, % of all cores.
    """
    columns: list[tuple[str, int]] = [
        ("side", -8),
        ("setting", -14),
        ("deliv", 6),
        ("pub s", 6),
        ("sec", 7),
        ("deliv/s", 8),
        ("p50 ms", 8),
        ("p99 ms", 8),
        ("idle p50", 8),
        ("http p50", 8),
        ("send CPU", 8),
        ("send ms", 7),
        ("all ms", 6),
        ("pg CPU", 6),
        ("other", 6),
        ("all CPU", 7),
    ]

    def line(values: Sequence[str]) -> str:
        return " ".join(
            f"{value:<{-width}}" if width < 0 else f"{value:>{width}}"
            for value, (_, width) in zip(values, columns, strict=True)
        )

    header = line([name for name, _ in columns])
    print(header)
    print("-" * len(header))
    for p in phases:
        sender = "worker" if p.side == "rotator" else "bench"
        print(
            line(
                [
                    p.side,
                    p.setting,
                    str(p.deliveries),
                    _fmt(p.publish_seconds, 2),
                    f"{p.seconds:.2f}",
                    f"{p.per_s:.1f}",
                    f"{p.p50_ms:.1f}",
                    f"{p.p99_ms:.1f}",
                    _fmt(p.idle_p50_ms),
                    _fmt(p.http_p50_ms),
                    _fmt(p.cpu_pct.get(sender)),
                    _fmt(p.cpu_ms_per_delivery.get(sender), 2),
                    _fmt(p.cpu_ms_per_delivery.get("total"), 2),
                    _fmt(p.cpu_pct.get("postgres")),
                    _fmt(p.cpu_pct.get("other")),
                    _fmt(p.cpu_pct.get("machine_all_cores")),
                ]
            )
        )


def ratios(phases: Sequence[Phase]) -> list[dict[str, Any]]:
    out = []
    for rotator, plain in zip(phases[0::2], phases[1::2], strict=False):
        out.append(
            {
                "setting": rotator.setting,
                "rotator_per_s": rotator.per_s,
                "plain_per_s": plain.per_s,
                "ratio": round(rotator.per_s / plain.per_s, 3) if plain.per_s else None,
                # CPU ms per delivery, every tracked process: plain's / Rotator's. Steadier
                # than the throughput ratio when other users take a varying share of the cores.
                "cpu_cost_ratio": round(
                    plain.cpu_ms_per_delivery["total"] / rotator.cpu_ms_per_delivery["total"], 3
                )
                if rotator.cpu_ms_per_delivery.get("total")
                else None,
            }
        )
    return out


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    packages: dict[str, str | None] = {}
    for name in ("celery", "kombu", "redis", "httpx", "httpcore", "sqlalchemy", "psycopg"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "packages": packages}


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--workers",
        default="prefork:2",
        help="comma separated worker settings, each prefork:N, threads:N or solo:1",
    )
    parser.add_argument("--endpoints", type=int, default=20, help="endpoints per event (<= 49)")
    parser.add_argument("--events", type=int, default=100, help="events published per phase")
    parser.add_argument("--data-bytes", type=int, default=400, help="size of the event's note")
    parser.add_argument(
        "--publish",
        choices=("api", "domain"),
        default="api",
        help="domain: the route's domain calls in this process instead of POST /v1/events",
    )
    parser.add_argument("--idle-probes", type=int, default=10, help="single deliveries, one by one")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per phase at most")
    parser.add_argument("--worker-args", default=RECOMMENDED_WORKER_ARGS)
    parser.add_argument("--label", default="", help="free text stored with the JSON result")
    parser.add_argument("--profile", action="store_true", help="py-spy record the worker")
    parser.add_argument("--skip-plain", action="store_true", help="Rotator side only")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--keep-logs", action="store_true", help="copy logs to bench/results/")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ROTATOR_NAME=VALUE",
        help="a setting for Rotator's processes (repeatable), e.g. ROTATOR_DELIVERY_CONCURRENCY=16",
    )
    args = parser.parse_args(argv)
    if any(not item.startswith("ROTATOR_") or "=" not in item for item in args.set):
        parser.error("--set takes ROTATOR_NAME=VALUE")
    try:
        args.settings = [WorkerSetting.parse(item.strip()) for item in args.workers.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if not 1 <= args.endpoints <= 49 or args.events < 1:
        parser.error("--endpoints must be 1..49 (50 per organization, one is the idle probe)")
    return args


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    print(
        f"deliveries per phase={args.events * args.endpoints} ({args.events} events x "
        f"{args.endpoints} endpoints), publish={args.publish}, cpus={os.cpu_count()}, "
        f"worker args: {args.worker_args or '(none)'}",
        flush=True,
    )
    phases: list[Phase] = []
    procs: list[Proc] = []
    publisher: Publisher | None = None
    with tempfile.TemporaryDirectory(prefix="rotator-delivery-bench-") as tmp:
        log_dir = Path(tmp)
        try:
            rotator = find_bin("rotator")
            setup = prepare_rotator(rotator, args.database_url, args.broker_url, args.set)
            receiver_port = free_port()
            receiver_proc = Proc(
                "receiver",
                [sys.executable, str(ROOT / "bench" / "receiver_server.py"), "--port"]
                + [str(receiver_port)],
                dict(os.environ),
                log_dir,
            )
            procs.append(receiver_proc)
            receiver_proc.start()
            receiver_proc.wait_http(receiver_port, "/healthz")
            receiver = ReceiverClient(receiver_port)
            assert receiver_proc.pid is not None
            groups = {"receiver": receiver_proc.pid}

            api_port: int | None = None
            if args.publish == "api":
                api_port = free_port()
                api = Proc(
                    "api",
                    [rotator, "api", "--host", HOST, "--port", str(api_port)],
                    setup.env,
                    log_dir,
                )
                procs.append(api)
                api.start()
                api.wait_http(api_port, "/readyz")
                assert api.pid is not None
                groups["api"] = api.pid
            publisher = Publisher(args.publish, setup, api_port)
            base = f"http://{HOST}:{receiver_port}"
            for index in range(args.endpoints):
                publisher.create_endpoint(f"{base}/hook/{index}", [EVENT_TYPE])
            publisher.create_endpoint(f"{base}/idle", [IDLE_EVENT_TYPE])

            for setting in args.settings:
                print(f"  rotator {setting.label} ...", flush=True)
                phases.append(
                    run_rotator(args, setting, setup, publisher, receiver, groups, log_dir)
                )
                if not args.skip_plain:
                    print(f"  plain httpx x{setting.concurrency} ...", flush=True)
                    phases.append(run_plain(args, setting, setup.org_id, receiver, groups))
        except BenchError as exc:
            print(f"delivery_bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("delivery_bench: interrupted", file=sys.stderr)
            return 130
        finally:
            if publisher is not None:
                publisher.close()
            for proc in reversed(procs):
                proc.stop()
            if args.keep_logs:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                for log in log_dir.glob("*.log"):
                    shutil.copy(log, RESULTS_DIR / f"delivery-{stamp}-{log.name}")

    print()
    print_table(phases)
    print()
    summary = ratios(phases) if not args.skip_plain else []
    for item in summary:
        verdict = "meets" if (item["ratio"] or 0) >= GOAL_RATIO else "BELOW"
        print(
            f"{item['setting']:<14} rotator {item['rotator_per_s']:.1f}/s vs plain "
            f"{item['plain_per_s']:.1f}/s: ratio {item['ratio']:.2f} "
            f"({verdict} the {GOAL_RATIO:.0%} goal); "
            f"CPU-cost ratio {_fmt(item['cpu_cost_ratio'], 2)}"
        )
    for p in phases:
        if p.side == "rotator" and (p.received != p.deliveries or set(p.states) != {"succeeded"}):
            print(f"WARNING {p.setting}: received {p.received}/{p.deliveries}, states {p.states}")
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"delivery-{stamp}.json"
        payload = {
            "stamp": stamp,
            "label": args.label,
            "args": {k: v for k, v in vars(args).items() if k != "settings"},
            "environment": environment(),
            "phases": [asdict(p) for p in phases],
            "ratios": summary,
            "median_ratio": statistics.median([r["ratio"] for r in summary if r["ratio"]])
            if summary
            else None,
        }
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
