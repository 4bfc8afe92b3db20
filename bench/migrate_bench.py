"""Safe-migrate throughput: N migrations started at once, next to a floor of no-op task chains.

Usage (from the repository root; PostgreSQL and Redis running; see bench/README.md)::

    .venv/bin/python -m bench.migrate_bench                  # 500 migrations, about 1 minute
    .venv/bin/python -m bench.migrate_bench --rounds 3       # floor, rotator, floor, ... x3
    .venv/bin/python -m bench.migrate_bench --sequential     # API phase, then worker phase
    .venv/bin/python -m bench.migrate_bench --py-spy         # + py-spy of the worker and API
    .venv/bin/python -m bench.migrate_bench --probe          # + SQL/commit/publish per task

One run:

1. Setup: the database of ``--database-url`` (default ``rotator_bench_migrate``) is dropped and
   created again, the broker's Redis database (default 13) is flushed; ``rotator secrets
   genkey``, ``rotator db upgrade``, ``rotator orgs create`` (a measured org and a warm-up org);
   the endpoints (``--migrations`` of them, on the receiver) are created in this process with
   ``models.endpoint.create_endpoint`` in one transaction.
2. Processes: the receiver (``bench/receiver_server.py``: answers 200 to every POST, verifies
   nothing, so it accepts every secret), ``rotator api --workers 1``, and ONE Celery worker
   ``rotator worker --pool prefork --concurrency 2 -I bench.floor_app`` (one parent, two forked
   child processes) that runs both Rotator's tasks and the floor's. No beat: nothing is lost in
   a run (every operation is checked to have succeeded), so the reconciler has nothing to do.
3. Warm-up: a few floor chains and a few migrations of the warm-up org (forks, imports,
   database and HTTP connections, the API's first requests), not measured.
4. ``floor-0``: ``--chains`` chains of four no-op tasks (``bench/floor_app.py``), their first
   tasks published at once from this process on one producer; the clock runs from the first
   publish to the last ``task4``. Per chain: its publish to its ``task4``.
5. ``rotator-k``: the database is ``VACUUM (ANALYZE)``d first (not timed; as autovacuum would
   in a running deployment, and this machine's PostgreSQL runs without it), then
   ``--migrations`` ``POST /v1/webhooks/{id}/migrate`` on ``--api-clients``
   keep-alive connections at once; the workers run meanwhile (with ``--sequential`` they stop
   consuming, by Celery's remote control, until the last 202). The clock runs from the first
   POST until every operation row has ``finished_at`` (the database is polled every 50 ms; the
   figure used is the largest ``finished_at``). Per migration: ``finished_at - created_at``.
   The API phase (first POST to last 202) is reported apart, and so is the drain after it.
6. ``floor-k``, as in 4; then 5 and 6 again for ``--rounds`` rounds (round k migrates the
   endpoints round k-1 created).

Each round's ratio is its Rotator total over the mean of the floors just before and after it;
the run's ratio is the median of the rounds'. Goal: <= 3.

Only 127.0.0.1 is contacted; every phase has a timeout; every process started here is stopped
at the end (SIGTERM, then SIGKILL to its process group). Results: a table on stdout and JSON in
``bench/results/migrate-<UTC timestamp>.json`` (git-ignored; with ``--py-spy``, the raw
profiles and the processes' logs in ``bench/results/migrate-<UTC timestamp>/``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import common
from bench.common import (
    HOST,
    RESERVED_DATABASES,
    ROOT,
    BenchError,
    cpu_snapshot,
    db_name,
    find_bin,
    flush_broker,
    free_port,
    group_pids,
    http_call,
    rotator_cli,
    vacuum_analyze,
)

RESULTS_DIR = ROOT / "bench" / "results"
GOAL_RATIO = 3.0
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rotator_bench_migrate"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/13"
EVENT_TYPES = ["campaign.approved"]
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.05


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Proc(common.Proc):
    """``common.Proc`` with a longer stop (the worker's warm shutdown) and a pid that is there."""

    ready_timeout_s: float = READY_TIMEOUT_S
    stop_timeout_s: float = STOP_TIMEOUT_S

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError(f"{self.name} is not running")
        return self.process.pid


# --- CPU accounting -----------------------------------------------------------------------------


def cpu_report(
    before: dict[str, float], after: dict[str, float], wall: float, items: int
) -> dict[str, Any]:
    """Per process group: % of one core over ``wall`` and CPU ms per item; the machine's busy %
    (all cores) and ``other`` (% of one core spent by processes not tracked here)."""
    names = [n for n in before if not n.startswith("machine")]
    pct = {n: round(100.0 * (after[n] - before[n]) / wall, 1) for n in names}
    per_item = {n: round(1000.0 * (after[n] - before[n]) / items, 3) for n in names}
    total = after["machine_total"] - before["machine_total"]
    busy = after["machine_busy"] - before["machine_busy"]
    tracked = sum(after[n] - before[n] for n in names)
    pct["other"] = round(100.0 * max(0.0, busy - tracked) / wall, 1)
    return {
        "pct_of_one_core": pct,
        "cpu_ms_per_item": per_item,
        "machine_busy_pct_all_cores": round(100.0 * busy / total, 1) if total > 0 else 0.0,
    }


def idle_sample(seconds: float = 1.0) -> float:
    """The machine's busy % (all cores) while this benchmark does nothing."""
    first = cpu_snapshot({}, "-")
    time.sleep(seconds)
    second = cpu_snapshot({}, "-")
    total = second["machine_total"] - first["machine_total"]
    busy = second["machine_busy"] - first["machine_busy"]
    return round(100.0 * busy / total, 1) if total > 0 else 0.0


# --- setup --------------------------------------------------------------------------------------


def recreate_database(url: str) -> None:
    """Drop and create the benchmark database (refuses anything not named like a bench one)."""
    import psycopg
    from psycopg import sql

    name = db_name(url)
    if not name or name in RESERVED_DATABASES or "bench" not in name:
        raise BenchError(f"refusing to drop database {name!r}: use a *bench* database of your own")
    maintenance = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(maintenance, autocommit=True, connect_timeout=5) as connection:
        ident = sql.Identifier(name)
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(ident))


@dataclass(frozen=True)
class Org:
    org_id: str
    api_key: str
    endpoint_ids: list[str]


def prepare(
    rotator: str, env: dict[str, str], database_url: str, broker_url: str, log_level: str
) -> None:
    """A fresh database and broker, and ``env`` (and this process's environment, which
    publishes and creates endpoints) set for them: the set-up every migration benchmark shares."""
    recreate_database(database_url)
    flush_broker(broker_url)
    env.update(
        # Not "production": it refuses ROTATOR_ALLOW_INSECURE_URLS, which the loopback
        # http:// receiver needs; nothing else differs once a key is given.
        ROTATOR_ENV="test",
        ROTATOR_DATABASE_URL=database_url,
        ROTATOR_BROKER_URL=broker_url,
        ROTATOR_ALLOW_INSECURE_URLS="true",
        ROTATOR_ENDPOINT_LIMIT="1000",
        ROTATOR_LOG_LEVEL=log_level,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env["ROTATOR_ENCRYPTION_KEYS"] = rotator_cli(rotator, env, "secrets", "genkey")
    rotator_cli(rotator, env, "db", "upgrade")
    os.environ.update({k: v for k, v in env.items() if k.startswith("ROTATOR_")})


def start_receiver(env: dict[str, str], log_dir: Path, procs: list[Proc]) -> tuple[Proc, int]:
    """The accepting receiver every test delivery goes to, started and ready, and its port."""
    port = free_port()
    receiver = Proc(
        "receiver",
        [sys.executable, str(ROOT / "bench" / "receiver_server.py"), "--port", str(port)],
        env,
        log_dir,
    )
    procs.append(receiver)
    receiver.start()
    receiver.wait_http(port, "/healthz")
    return receiver, port


def create_org(rotator: str, env: dict[str, str], name: str) -> tuple[str, str]:
    issued = json.loads(rotator_cli(rotator, env, "orgs", "create", "--name", name))
    return str(issued["org_id"]), str(issued["api_key"])


def create_endpoints(orgs: list[tuple[str, str, int]], receiver_url: str) -> list[Org]:
    """``count`` endpoints per (org id, api key, count), in one transaction, in this process."""
    import uuid

    from models.db import get_database
    from models.endpoint import create_endpoint

    out = []
    with get_database().session() as session:
        for org_id, api_key, count in orgs:
            ids = []
            for index in range(count):
                created = create_endpoint(
                    session,
                    uuid.UUID(org_id),
                    url=f"{receiver_url}/hook/{org_id[-6:]}/{index}",
                    events=EVENT_TYPES,
                    description=f"migrate bench {index}",
                )
                ids.append(str(created.endpoint.id))
            out.append(Org(org_id=org_id, api_key=api_key, endpoint_ids=ids))
    return out


# --- the API client -----------------------------------------------------------------------------


@dataclass
class Post:
    endpoint_id: str
    sent: float = 0.0
    answered: float = 0.0
    status: int = 0
    operation_id: str | None = None
    error: str | None = None


class MigrateClient:
    """Concurrent ``POST /v1/webhooks/{id}/migrate``, one keep-alive connection per thread."""

    def __init__(self, port: int, api_key: str, clients: int) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.clients = clients
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
            self._local.conn = conn
        return conn

    def _post(self, post: Post) -> Post:
        path = f"/v1/webhooks/{post.endpoint_id}/migrate"
        for attempt in range(2):
            conn = self._connection()
            post.sent = time.time()
            try:
                conn.request("POST", path, body=b"{}", headers=self.headers)
                response = conn.getresponse()
                raw = response.read()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                post.error = type(exc).__name__
                if attempt == 0 and isinstance(
                    exc, ConnectionError | http.client.RemoteDisconnected
                ):
                    continue  # the server closed an idle keep-alive connection
                break
            post.answered = time.time()
            post.status = response.status
            post.error = None
            if response.status == 202:
                post.operation_id = str(json.loads(raw)["id"])
            else:
                post.error = raw[:200].decode(errors="replace")
            break
        return post

    def run(self, endpoint_ids: Sequence[str]) -> tuple[ThreadPoolExecutor, list[Any]]:
        """Submit every POST at once; returns the pool (shut it down) and the futures."""
        pool = ThreadPoolExecutor(self.clients, thread_name_prefix="migrate-post")
        futures = [pool.submit(self._post, Post(endpoint_id)) for endpoint_id in endpoint_ids]
        return pool, futures


# --- measurement helpers ------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def dist(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_s": round(pct(values, 50), 4),
        "p90_s": round(pct(values, 90), 4),
        "p99_s": round(pct(values, 99), 4),
        "max_s": round(max(values), 4) if values else float("nan"),
        "mean_s": round(statistics.fmean(values), 4) if values else float("nan"),
    }


def pg_counters(conn: Any, database: str) -> dict[str, int]:
    row = conn.execute(
        "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_fetched"
        " FROM pg_stat_database WHERE datname = %s",
        (database,),
    ).fetchone()
    names = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_fetched")
    return dict(zip(names, (int(v) for v in row), strict=True))


def redis_commands(client: Any) -> dict[str, int]:
    """Redis commands by name so far (the whole server: other users of Redis count too)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }


# --- probe (bench/migrate_probe.py) ---------------------------------------------------------

PROBE_PREFIX = "bench:probe:"  # as in bench/migrate_probe.py (not imported: it patches on import)


def clear_probe(client: Any) -> None:
    for key in client.scan_iter(PROBE_PREFIX + "*"):
        client.delete(key)


def read_probe(client: Any) -> dict[str, dict[str, float]]:
    """Per label: every counter averaged per task, plus ``tasks``."""
    out = {}
    for key in sorted(client.scan_iter(PROBE_PREFIX + "*")):
        raw = {k.decode(): float(v) for k, v in client.hgetall(key).items()}
        tasks = raw.get("tasks", 0.0) or 1.0
        label = key.decode().removeprefix(PROBE_PREFIX)
        out[label] = {k: (v if k == "tasks" else round(v / tasks, 5)) for k, v in raw.items()}
    return out


PROBE_COLUMNS = [
    ("tasks", "tasks", 1.0, "{:.0f}"),
    ("wall ms", "wall_s", 1000.0, "{:.1f}"),
    ("cpu ms", "cpu_s", 1000.0, "{:.1f}"),
    ("sql", "sql", 1.0, "{:.1f}"),
    ("sql ms", "sql_s", 1000.0, "{:.1f}"),
    ("commit", "commit", 1.0, "{:.1f}"),
    ("rollbk", "rollback", 1.0, "{:.1f}"),
    ("chkout", "checkout", 1.0, "{:.1f}"),
    ("msgs", "messages", 1.0, "{:.1f}"),
    ("pub ms", "publish_s", 1000.0, "{:.2f}"),
    ("http", "http", 1.0, "{:.1f}"),
    ("http ms", "http_s", 1000.0, "{:.1f}"),
]


def print_probe(probe: dict[str, dict[str, float]], migrations: int) -> None:
    print("\nper task, averages (bench/migrate_probe.py; the probe itself adds a little):")
    print(f"{'task:step':<44}" + "".join(f"{title:>9}" for title, *_ in PROBE_COLUMNS))
    for label, values in probe.items():
        cells = [fmt.format(values.get(key, 0.0) * scale) for _, key, scale, fmt in PROBE_COLUMNS]
        print(f"{label[:43]:<44}" + "".join(f"{cell:>9}" for cell in cells))
    for label, values in probe.items():
        kinds = {k: v for k, v in values.items() if k.startswith("sql_") and k != "sql_s"}
        print(f"  {label}: {json.dumps(kinds)}")
    per_migration: dict[str, float] = {}
    for label, values in probe.items():
        if label.startswith("operation.advance"):
            for key, value in values.items():
                if key != "tasks":
                    per_migration[key] = per_migration.get(key, 0.0) + value * values["tasks"]
    if per_migration:
        summary = {k: round(v / migrations, 3) for k, v in sorted(per_migration.items())}
        print(f"  all advances, per migration: {json.dumps(summary)}")


# --- py-spy -------------------------------------------------------------------------------------


@dataclass
class Spy:
    pid: int
    role: str
    path: Path
    process: subprocess.Popen[bytes]


def start_py_spy(worker_pgid: int, api_pid: int, out_dir: Path, rate: int, idle: bool) -> list[Spy]:
    """``py-spy record`` on every process of the worker's group (the parent and its children)
    and on the API server, raw (collapsed) output; stopped with SIGINT (py-spy then writes)."""
    py_spy = find_bin("py-spy")
    spies = []
    for pid in [*group_pids(worker_pgid), api_pid]:
        role = "api" if pid == api_pid else "parent" if pid == worker_pgid else "child"
        path = out_dir / f"py-spy-{role}-{pid}.txt"
        command = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        command += ["--nonblocking", "-o", str(path)]
        if idle and role != "api":  # the API's idle worker threads would drown the rest
            command.append("--idle")
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        spies.append(Spy(pid, role, path, process))
    time.sleep(0.5)  # let py-spy attach before the phase starts
    return spies


def stop_py_spy(spies: list[Spy]) -> None:
    for spy in spies:
        if spy.process.poll() is None:
            spy.process.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.process.kill()
            spy.process.wait(timeout=10)


# What the worker's time is spent on, matched on the frames of each sample (a sample counts in a
# category when any of its frames matches; the categories overlap, e.g. commit ⊂ advance).
PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("advance (workers/operations.py)", ("advance (workers/operations.py",)),
    ("  begin_advance", ("begin_advance (models/migration.py",)),
    ("    attempts.claim (the probe)", ("claim (models/attempts.py",)),
    ("  HTTP post (Sender)", ("post (workers/http.py",)),
    ("  finish_probe", ("finish_probe (models/migration.py",)),
    ("    attempts.record (the probe)", ("record (models/attempts.py",)),
    ("  attempt (the in-band handoff)", ("attempt (workers/deliveries.py",)),
    ("  lock + load (operation, steps)", ("lock_for_advance (models/migration.py",)),
    ("  session.commit", ("commit (sqlalchemy/orm/session.py",)),
    ("  pool ping (idle connections)", ("_do_ping_w_event", "do_ping (sqlalchemy")),
    ("  publish after commit (kombu)", ("publish (workers/enqueue.py",)),
    ("  logging", ("handle (logging/__init__.py",)),
    ("  log lines, metrics", ("_report (workers/", "report_attempt (workers/")),
    ("  metrics", ("observe_step (rotator/metrics.py", "observe_delivery (rotator/metrics.py")),
    ("psycopg (all: network waits when --idle)", ("(psycopg/",)),
    ("kombu publish (all)", ("publish (kombu/messaging.py",)),
    ("celery task events", ("send (celery/events/dispatcher.py", "send_event (celery/")),
    ("floor tasks", ("(bench/floor_app.py",)),
]


API_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("migrate_endpoint (route)", ("migrate_endpoint (api/routes/operations.py",)),
    ("  authenticate (own session)", ("_authenticate (api/deps.py",)),
    ("  _migrate (unit of work)", ("_migrate (api/routes/operations.py",)),
    ("    start_migration", ("start_migration (models/migration.py",)),
    ("    get_endpoint FOR UPDATE", ("get_endpoint (models/endpoint.py",)),
    ("    encrypt new secret", ("encrypt (models/crypto.py",)),
    ("  session.commit", ("commit (sqlalchemy/orm/session.py",)),
    ("  pre-ping", ("_do_ping_w_event", "do_ping (sqlalchemy")),
    ("  publish after commit (kombu)", ("publish (workers/enqueue.py",)),
    ("  operation_json", ("operation_json (api/schemas.py",)),
    ("psycopg (all)", ("(psycopg/",)),
    ("sqlalchemy (all)", ("(sqlalchemy/",)),
    ("anyio worker threads", ("(anyio/",)),
    ("uvicorn/h11 protocol", ("(uvicorn/", "(h11/")),
    ("middleware (api/)", ("dispatch (api/", "__call__ (api/")),
    ("logging", ("handle (logging/__init__.py",)),
]


def summarize_py_spy(
    paths: list[Path], categories: list[tuple[str, tuple[str, ...]]] | None = None
) -> dict[str, Any]:
    """Inclusive % of samples per category, and the top leaf frames (self time)."""
    total = 0
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            for name, needles in categories or PROFILE_CATEGORIES:
                if any(needle in stack for needle in needles):
                    inclusive[name] += count
            leaf = stack.rsplit(";", 1)[-1]
            leaves[leaf] += count
            packages[_package_of(leaf)] += count
    return {
        "samples": total,
        "inclusive_pct": {
            name: round(100.0 * inclusive[name] / total, 1) if total else 0.0
            for name, _ in categories or PROFILE_CATEGORIES
        },
        "self_by_package_pct": {
            name: round(100.0 * count / total, 1) for name, count in packages.most_common(15)
        },
        "top_self_frames_pct": {
            name: round(100.0 * count / total, 1) for name, count in leaves.most_common(25)
        },
    }


def _package_of(frame: str) -> str:
    """``func (path/to/file.py:12)`` → the package (site-packages' top directory or ours)."""
    if "(" not in frame:
        return frame
    where = frame[frame.rindex("(") + 1 :].rstrip(")")
    where = where.split("site-packages/")[-1]
    parts = where.split("/")
    return parts[0] if len(parts) > 1 else where.split(":")[0]


# --- phases -------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    items: int
    total_s: float
    figures: dict[str, Any] = field(default_factory=dict)
    next_sources: list[str] = field(default_factory=list)  # the new endpoints (not saved)


def run_floor(
    name: str, chains: int, redis_client: Any, groups: dict[str, int], database: str, timeout: float
) -> Phase:
    from bench.floor_app import DONE_KEY, start_chain
    from workers.app import app

    redis_client.delete(DONE_KEY)
    idle = idle_sample()
    cpu_before = cpu_snapshot(groups, database)
    t0 = time.time()
    with app.producer_or_acquire() as producer:
        for index in range(chains):
            start_chain(f"{name}-{index}", producer=producer)
    published = time.time()
    deadline = time.monotonic() + timeout
    while redis_client.llen(DONE_KEY) < chains:
        if time.monotonic() > deadline:
            done = redis_client.llen(DONE_KEY)
            raise BenchError(f"{name}: {done} of {chains} chains done in {timeout}s")
        time.sleep(0.01)
    seen = time.time()
    cpu_after = cpu_snapshot(groups, database)
    rows = [json.loads(item) for item in redis_client.lrange(DONE_KEY, 0, -1)]
    finished = max(row[2] for row in rows)
    total = finished - t0
    per_chain = [row[2] - row[1] for row in rows]
    return Phase(
        name=name,
        items=chains,
        total_s=round(total, 3),
        figures={
            "tasks": 4 * chains,
            "tasks_per_s": round(4 * chains / total, 1),
            "chains_per_s": round(chains / total, 1),
            "publish_s": round(published - t0, 3),
            "per_chain": dist(per_chain),
            "observed_done_s": round(seen - t0, 3),
            "idle_before_pct": idle,
            "cpu": cpu_report(cpu_before, cpu_after, seen - t0, 4 * chains),
        },
    )


def wait_operations(
    pg: Any, org_id: str, since: datetime, expected: int, timeout: float, checks: Sequence[Proc]
) -> tuple[int, float]:
    """Poll until ``expected`` operations of the org are finished; returns (polls, seen at)."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        row = pg.execute(
            "SELECT count(*) FROM operations"
            " WHERE org_id = %s AND created_at >= %s AND finished_at IS NOT NULL",
            (org_id, since),
        ).fetchone()
        if int(row[0]) >= expected:
            return polls, time.time()
        if time.monotonic() > deadline:
            raise BenchError(f"{row[0]} of {expected} operations finished in {timeout}s")
        for proc in checks:
            proc.check()
        time.sleep(POLL_S)


def run_migrations(
    name: str,
    org: Org,
    api_port: int,
    clients: int,
    pg: Any,
    redis_client: Any,
    groups: dict[str, int],
    database: str,
    timeout: float,
    checks: Sequence[Proc],
    spy_dir: Path | None = None,
    spy_rate: int = 100,
    spy_idle: bool = True,
    sequential: bool = False,
) -> Phase:
    client = MigrateClient(api_port, org.api_key, clients)
    spies = (
        start_py_spy(groups["worker"], groups["api"], spy_dir, spy_rate, spy_idle)
        if spy_dir
        else []
    )
    idle = idle_sample()
    if sequential:
        set_consuming(False)
    pg_before = pg_counters(pg, database)
    redis_before = redis_commands(redis_client)
    cpu_before = cpu_snapshot(groups, database)
    cpu_mid: dict[str, float] | None = None
    t0 = time.time()
    resumed = t0
    since = datetime.fromtimestamp(t0 - 0.001, UTC)
    pool, futures = client.run(org.endpoint_ids)
    try:
        if sequential:
            posts: list[Post] = [future.result(timeout=timeout) for future in futures]
            cpu_mid = cpu_snapshot(groups, database)
            resumed = time.time()
            set_consuming(True)
        polls, seen = wait_operations(pg, org.org_id, since, len(org.endpoint_ids), timeout, checks)
        posts = [future.result(timeout=timeout) for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_py_spy(spies)
        if sequential:
            set_consuming(True)
    cpu_after = cpu_snapshot(groups, database)
    redis_after = redis_commands(redis_client)
    time.sleep(1.2)  # PostgreSQL publishes a backend's counters about once a second
    pg_after = pg_counters(pg, database)
    failed = [p for p in posts if p.status != 202]
    if failed:
        raise BenchError(f"{len(failed)} POSTs failed, e.g. {failed[0]}")
    rows = pg.execute(
        "SELECT id, state, created_at, finished_at, new_endpoint_id FROM operations"
        " WHERE org_id = %s AND created_at >= %s",
        (org.org_id, since),
    ).fetchall()
    states = Counter(str(row[1]) for row in rows)
    if states.get("succeeded", 0) != len(org.endpoint_ids):
        raise BenchError(f"operations did not all succeed: {dict(states)}")
    created = [row[2].timestamp() for row in rows]
    finished = [row[3].timestamp() for row in rows]
    per_migration = [f - c for c, f in zip(created, finished, strict=True)]
    # Sequential: from the moment the workers were let loose (else the same as per_migration).
    per_migration_worker = [f - max(c, resumed) for c, f in zip(created, finished, strict=True)]
    last_finished = max(finished)
    first_sent = min(p.sent for p in posts)
    last_answer = max(p.answered for p in posts)
    total = last_finished - t0
    api_s = last_answer - t0
    step_rows = pg.execute(
        "SELECT s.name, avg(extract(epoch FROM s.finished_at - s.started_at)),"
        " percentile_cont(0.5) WITHIN GROUP"
        " (ORDER BY extract(epoch FROM s.finished_at - s.started_at))"
        " FROM operation_steps s JOIN operations o ON o.id = s.operation_id"
        " WHERE o.org_id = %s AND o.created_at >= %s GROUP BY s.name",
        (org.org_id, since),
    ).fetchall()
    # Time from one step's end to the next one's start: the queue wait between two advances.
    gap_rows = pg.execute(
        "SELECT s.position, percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM"
        " s.started_at - p.finished_at)) FROM operation_steps s"
        " JOIN operation_steps p ON p.operation_id = s.operation_id AND p.position = s.position - 1"
        " JOIN operations o ON o.id = s.operation_id WHERE o.org_id = %s AND o.created_at >= %s"
        " GROUP BY s.position",
        (org.org_id, since),
    ).fetchall()
    first_wait = [
        float(row[0])
        for row in pg.execute(
            "SELECT extract(epoch FROM s.started_at - o.created_at) FROM operation_steps s"
            " JOIN operations o ON o.id = s.operation_id"
            " WHERE o.org_id = %s AND o.created_at >= %s AND s.position = 0",
            (org.org_id, since),
        ).fetchall()
    ]
    pg_delta = counter_delta(pg_before, pg_after)
    pg_delta["xact_commit"] = pg_delta.get("xact_commit", 0) - polls - 3  # our own SELECTs
    n = len(org.endpoint_ids)
    api_latency = [p.answered - p.sent for p in posts]
    return Phase(
        name=name,
        items=n,
        total_s=round(total, 3),
        next_sources=[str(row[4]) for row in rows],
        figures={
            "migrations_per_s": round(n / total, 1),
            "per_migration": dist(per_migration),
            "api_phase_s": round(api_s, 3),
            "api_req_per_s": round(n / api_s, 1),
            "api_latency": dist(api_latency),
            "first_post_to_first_created_s": round(min(created) - first_sent, 3),
            "sequential": sequential,
            "worker_span_s": round(last_finished - max(min(created), resumed), 3),
            "per_migration_worker_phase": dist(per_migration_worker),
            "cpu_api_phase": None
            if cpu_mid is None
            else cpu_report(cpu_before, cpu_mid, resumed - t0, n),
            "cpu_worker_phase": None
            if cpu_mid is None
            else cpu_report(cpu_mid, cpu_after, seen - resumed, n),
            "drain_after_api_s": round(last_finished - last_answer, 3),
            "observed_done_s": round(seen - t0, 3),
            "queue_wait_to_first_step": dist(first_wait),
            "step_seconds": {
                str(r[0]): {"mean_s": round(float(r[1]), 4), "p50_s": round(float(r[2]), 4)}
                for r in step_rows
            },
            "gap_before_step_p50_s": {int(r[0]): round(float(r[1]), 4) for r in gap_rows},
            "idle_before_pct": idle,
            "cpu": cpu_report(cpu_before, cpu_after, seen - t0, n),
            "db_per_migration": {k: round(v / n, 2) for k, v in pg_delta.items()},
            "redis_commands_per_migration": {
                k: round(v / n, 2)
                for k, v in sorted(counter_delta(redis_before, redis_after).items())
                if v >= n // 10
            },
            "spy_files": [str(s.path) for s in spies],
        },
    )


def set_consuming(on: bool) -> None:
    """Sequential mode: stop (or restart) the worker consuming Rotator's queue, by Celery's
    remote control, so that the API phase and the worker phase do not overlap."""
    from workers.app import app

    queue = str(app.conf.task_default_queue)
    control = app.control.add_consumer if on else app.control.cancel_consumer
    replies = control(queue, reply=True, timeout=5.0)
    if not replies:
        raise BenchError(f"the worker did not answer {'add' if on else 'cancel'}_consumer")


def warm_up(
    org: Org, api_port: int, pg: Any, redis_client: Any, checks: Sequence[Proc], chains: int
) -> None:
    from bench.floor_app import DONE_KEY, start_chain
    from workers.app import app

    redis_client.delete(DONE_KEY)
    with app.producer_or_acquire() as producer:
        for index in range(chains):
            start_chain(f"warm-{index}", producer=producer)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while redis_client.llen(DONE_KEY) < chains:
        if time.monotonic() > deadline:
            raise BenchError("the worker did not run the warm-up chains in time")
        for proc in checks:
            proc.check()
        time.sleep(0.05)
    client = MigrateClient(api_port, org.api_key, 4)
    t0 = time.time() - 1.0
    pool, futures = client.run(org.endpoint_ids)
    try:
        since = datetime.fromtimestamp(t0, UTC)
        wait_operations(pg, org.org_id, since, len(org.endpoint_ids), READY_TIMEOUT_S, checks)
        bad = [f.result() for f in futures if f.result().status != 202]
        if bad:
            raise BenchError(f"warm-up POST failed: {bad[0]}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --- output -------------------------------------------------------------------------------------


def cpu_cost_ratio(floors: list[Phase], rotator: Phase) -> float:
    """CPU of every tracked process per migration over CPU per floor chain (4 tasks): steadier
    than the wall-clock ratio when other work on the machine takes a share of the cores."""
    per_chain = statistics.fmean(
        4 * sum(f.figures["cpu"]["cpu_ms_per_item"].values()) for f in floors
    )
    per_migration = sum(rotator.figures["cpu"]["cpu_ms_per_item"].values())
    return per_migration / per_chain if per_chain > 0 else float("nan")


@dataclass
class Round:
    """One Rotator phase and the floor phases just before and after it."""

    rotator: Phase
    floors: list[Phase]

    @property
    def floor_s(self) -> float:
        return statistics.fmean(f.total_s for f in self.floors)

    @property
    def ratio(self) -> float:
        return self.rotator.total_s / self.floor_s

    @property
    def span_ratio(self) -> float:
        return float(self.rotator.figures["worker_span_s"]) / self.floor_s

    @property
    def cpu_ratio(self) -> float:
        return cpu_cost_ratio(self.floors, self.rotator)

    def summary(self) -> dict[str, Any]:
        return {
            "rotator": self.rotator.name,
            "floors": [f.name for f in self.floors],
            "rotator_s": self.rotator.total_s,
            "floor_mean_s": round(self.floor_s, 3),
            "ratio": round(self.ratio, 3),
            "ratio_worker_span": round(self.span_ratio, 3),
            "ratio_cpu_cost": round(self.cpu_ratio, 3),
        }


def print_table(phases: list[Phase], rounds: list[Round]) -> None:
    print()
    print(
        f"{'phase':<12}{'items':>6}{'total s':>9}{'items/s':>9}{'tasks/s':>9}"
        f"{'p50 s':>8}{'p99 s':>8}{'API s':>8}{'POST/s':>8}{'drain s':>9}{'busy-before%':>13}"
    )
    for phase in phases:
        f = phase.figures
        if phase.name.startswith("floor"):
            print(
                f"{phase.name:<12}{phase.items:>6}{phase.total_s:>9.2f}{f['chains_per_s']:>9.1f}"
                f"{f['tasks_per_s']:>9.1f}{f['per_chain']['p50_s']:>8.2f}"
                f"{f['per_chain']['p99_s']:>8.2f}{'':>8}{'':>8}{'':>9}{f['idle_before_pct']:>13.1f}"
            )
        else:
            print(
                f"{phase.name:<12}{phase.items:>6}{phase.total_s:>9.2f}"
                f"{f['migrations_per_s']:>9.1f}{'':>9}{f['per_migration']['p50_s']:>8.2f}"
                f"{f['per_migration']['p99_s']:>8.2f}{f['api_phase_s']:>8.2f}"
                f"{f['api_req_per_s']:>8.0f}{f['drain_after_api_s']:>9.2f}"
                f"{f['idle_before_pct']:>13.1f}"
            )
    for item in rounds:
        r = item.rotator.figures
        print(f"\n{item.rotator.name}:")
        print(
            f"  API phase {r['api_phase_s']:.2f} s ({r['api_req_per_s']:.0f} POST/s, latency p50 "
            f"{r['api_latency']['p50_s'] * 1000:.0f} ms, p99 {r['api_latency']['p99_s'] * 1000:.0f}"
            f" ms); worker span (first created_at -> last finished_at) {r['worker_span_s']:.2f} s;"
            f" drain after the last 202 {r['drain_after_api_s']:.2f} s"
        )
        if r["sequential"]:
            w = r["per_migration_worker_phase"]
            print(
                f"  sequential: worker phase alone {r['worker_span_s']:.2f} s"
                f" ({item.rotator.items / r['worker_span_s']:.1f} migrations/s), per migration"
                f" from the workers' start p50 {w['p50_s']:.2f} s, p99 {w['p99_s']:.2f} s"
            )
            for label in ("cpu_api_phase", "cpu_worker_phase"):
                cpu = r[label]["cpu_ms_per_item"]
                print(f"  {label} ms/migration: {json.dumps(cpu)}")
        print(f"  step durations: {json.dumps(r['step_seconds'])}")
        print(f"  queue wait before step N, p50 s: {json.dumps(r['gap_before_step_p50_s'])}")
        print(f"  queue wait before the first step: {json.dumps(r['queue_wait_to_first_step'])}")
        print(f"  per migration, PostgreSQL: {json.dumps(r['db_per_migration'])}")
        print(
            f"  per migration, Redis commands (whole server): {r['redis_commands_per_migration']}"
        )
    names = list(phases[0].figures["cpu"]["pct_of_one_core"])
    print(f"\n{'CPU':<24}" + "".join(f"{name:>10}" for name in names))
    for phase in phases:
        cpu = phase.figures["cpu"]
        print(
            f"{phase.name + ' % of a core':<24}"
            + "".join(f"{v:>10.1f}" for v in cpu["pct_of_one_core"].values())
        )
        unit = "ms/task" if phase.name.startswith("floor") else "ms/migration"
        print(
            f"{phase.name + ' ' + unit:<24}"
            + "".join(f"{v:>10.2f}" for v in cpu["cpu_ms_per_item"].values())
        )
    print()
    for item in rounds:
        print(
            f"{item.rotator.name}: {item.rotator.total_s:.2f} s / floor {item.floor_s:.2f} s"
            f" (mean of {', '.join(f.name for f in item.floors)}) = {item.ratio:.2f}x;"
            f" worker-span ratio {item.span_ratio:.2f}x; CPU-cost ratio {item.cpu_ratio:.2f}x"
        )
    ratio = statistics.median(item.ratio for item in rounds)
    verdict = "MET" if ratio <= GOAL_RATIO else "NOT MET"
    print(
        f"ratio rotator/floor (median of rounds) {ratio:.2f}x: goal <= {GOAL_RATIO:.0f}x {verdict}"
    )


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=500)
    parser.add_argument(
        "--chains", type=int, default=0, help="floor chains (default: = migrations)"
    )
    parser.add_argument("--api-clients", type=int, default=16, help="concurrent POST connections")
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--worker-args", default="", help="more celery worker options, quoted")
    parser.add_argument(
        "--worker-module",
        default="",
        help="run the worker as `python -m MODULE` (a bench prototype) instead of `rotator worker`",
    )
    parser.add_argument("--log-level", default=os.environ.get("ROTATOR_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Rotator phases, each between two floor phases (round k migrates round k-1's)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="the worker stops consuming during the API phase (remote control), then drains",
    )
    parser.add_argument("--warmup", type=int, default=10, help="warm-up migrations")
    parser.add_argument("--timeout", type=float, default=300.0, help="per phase, seconds")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--py-spy", action="store_true", help="profile the worker (py-spy record)")
    parser.add_argument("--py-spy-rate", type=int, default=100)
    parser.add_argument("--py-spy-cpu", action="store_true", help="CPU samples only (no --idle)")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="count SQL, commits, publishes per task (bench/migrate_probe.py; slows the worker)",
    )
    parser.add_argument("--label", default="")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    args.chains = args.chains or args.migrations
    return args


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    database = db_name(args.database_url)
    rotator = find_bin("rotator")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    procs: list[Proc] = []
    phases: list[Phase] = []
    probe: dict[str, dict[str, float]] | None = None
    received = 0
    keep = RESULTS_DIR / f"migrate-{stamp}" if args.py_spy else None
    with tempfile.TemporaryDirectory(prefix="rotator-migrate-bench-") as tmp:
        log_dir = Path(tmp)
        try:
            prepare(rotator, env, args.database_url, args.broker_url, args.log_level)
            import redis

            redis_client = redis.Redis.from_url(args.broker_url)

            receiver, receiver_port = start_receiver(env, log_dir, procs)
            api_port = free_port()

            main_org = create_org(rotator, env, "migrate-bench")
            warm_org = create_org(rotator, env, "migrate-bench-warmup")
            orgs = create_endpoints(
                [(*main_org, args.migrations), (*warm_org, args.warmup)],
                f"http://{HOST}:{receiver_port}",
            )
            measured, warm = orgs
            vacuum_analyze(args.database_url)

            api = Proc(
                "api",
                [rotator, "api", "--host", HOST, "--port", str(api_port), "--workers", "1"],
                env,
                log_dir,
            )
            procs.append(api)
            api.start()
            api.wait_http(api_port, "/readyz")

            worker_options = ["--pool", args.pool, "--concurrency", str(args.concurrency)]
            includes = "bench.floor_app,bench.migrate_probe" if args.probe else "bench.floor_app"
            worker_options += ["-I", includes, *args.worker_args.split()]
            if args.worker_module:
                command = [sys.executable, "-m", args.worker_module, *worker_options]
            else:
                command = [rotator, "worker", *worker_options]
            worker = Proc("worker", command, env, log_dir)
            procs.append(worker)
            worker.start()
            checks = [worker, api, receiver]

            import psycopg

            with psycopg.connect(args.database_url, autocommit=True) as pg:
                warm_up(warm, api_port, pg, redis_client, checks, chains=20)
                groups = {"worker": worker.pid, "api": api.pid, "receiver": receiver.pid}
                print(
                    f"{args.migrations} migrations, {args.chains} floor chains of 4 tasks; worker: "
                    f"{' '.join(command[1:] if not args.worker_module else command[1:])}; "
                    f"{len(group_pids(worker.pid)) - 1} child processes; cpus={os.cpu_count()}",
                    flush=True,
                )
                phases.append(
                    run_floor("floor-0", args.chains, redis_client, groups, database, args.timeout)
                )
                print(f"floor-0: {phases[-1].total_s:.2f} s", flush=True)
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                clear_probe(redis_client)
                sources = measured
                for index in range(1, args.rounds + 1):
                    # Statistics as autovacuum would keep them: each round adds 500 operations
                    # and their rows, which stale statistics would have read by whole scans.
                    vacuum_analyze(args.database_url)
                    phase = run_migrations(
                        f"rotator-{index}",
                        sources,
                        api_port,
                        args.api_clients,
                        pg,
                        redis_client,
                        groups,
                        database,
                        args.timeout,
                        checks,
                        spy_dir=keep if index == 1 else None,
                        spy_rate=args.py_spy_rate,
                        spy_idle=not args.py_spy_cpu,
                        sequential=args.sequential,
                    )
                    phases.append(phase)
                    print(f"{phase.name}: {phase.total_s:.2f} s", flush=True)
                    # The next round migrates the endpoints this one created.
                    sources = Org(measured.org_id, measured.api_key, phase.next_sources)
                    if index == args.rounds and args.probe:
                        probe = read_probe(redis_client)
                    floor = run_floor(
                        f"floor-{index}", args.chains, redis_client, groups, database, args.timeout
                    )
                    phases.append(floor)
                    print(f"{floor.name}: {floor.total_s:.2f} s", flush=True)
                stats = http_call(receiver_port, "GET", "/stats", timeout=5.0)[1]
                received = json.loads(stats)["count"]
        except KeyboardInterrupt:
            print("interrupted; stopping processes", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"migrate_bench: {exc}", file=sys.stderr)
            for proc in procs:
                print(f"--- {proc.name} log tail ---\n{proc.log_tail(15)}", file=sys.stderr)
            return 1
        finally:
            for proc in reversed(procs):
                proc.stop()
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for proc in procs:
                    with contextlib.suppress(OSError):
                        shutil.copy(proc.log_path, keep / proc.log_path.name)

    rounds = [
        Round(rotator=phases[i], floors=[phases[i - 1], phases[i + 1]])
        for i in range(1, len(phases) - 1, 2)
    ]
    ratio = statistics.median(item.ratio for item in rounds)
    profile = None
    if args.py_spy:
        spy_files = [Path(p) for p in rounds[0].rotator.figures["spy_files"]]
        profile = {
            "children": summarize_py_spy([p for p in spy_files if "-child-" in p.name]),
            "parent": summarize_py_spy([p for p in spy_files if "-parent-" in p.name]),
            "api": summarize_py_spy(
                [p for p in spy_files if "-api-" in p.name], categories=API_CATEGORIES
            ),
        }
    print_table(phases, rounds)
    if probe:
        print_probe(probe, args.migrations * args.rounds)
    if profile is not None:
        print_profile(profile)
    result = {
        "benchmark": "migrate",
        "label": args.label,
        "timestamp": stamp,
        "settings": {k: v for k, v in vars(args).items() if k not in ("no_save",)},
        "worker_command": command[1:] if not args.worker_module else command,
        "beat": "not running (no reconciler; every operation is checked to have succeeded)",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "phases": [
            {"name": p.name, "items": p.items, "total_s": p.total_s, **p.figures} for p in phases
        ],
        "rounds": [item.summary() for item in rounds],
        "ratio_median": round(ratio, 3),
        "ratio_cpu_cost_median": round(statistics.median(item.cpu_ratio for item in rounds), 3),
        "goal": {"max_ratio": GOAL_RATIO, "met": ratio <= GOAL_RATIO},
        "receiver_posts": received,
        "profile": profile,
        "probe_per_task": probe,
    }
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"migrate-{stamp}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nsaved {path.relative_to(ROOT)}")
    return 0


def print_profile(profile: dict[str, Any]) -> None:
    for role in ("children", "parent", "api"):
        summary = profile[role]
        print(
            f"\npy-spy, {role if role == 'api' else 'worker ' + role}: {summary['samples']} samples"
        )
        print("  inclusive % of samples:")
        for name, value in summary["inclusive_pct"].items():
            print(f"    {value:6.1f}  {name}")
        print("  self time by package %: " + json.dumps(summary["self_by_package_pct"]))
        print("  top self frames %:")
        for name, value in list(summary["top_self_frames_pct"].items())[:12]:
            print(f"    {value:6.1f}  {name}")


if __name__ == "__main__":
    raise SystemExit(main())
