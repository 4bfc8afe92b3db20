"""HTTP throughput of ``rotator api`` against a bare FastAPI baseline, in one run.

Usage (from the repository root)::

    .venv/bin/python -m bench.api_bench --duration 10

Targets, all measured with the same load generator, connection count, warm-up and duration:

* ``bare``    GET /bare on ``bench/bare_app.py`` (uvicorn, options as ``rotator api`` uses)
* ``healthz`` GET /healthz on ``rotator api`` (diagnostic: middleware + routing, no database)
* ``get``     GET /v1/webhooks/{id} on ``rotator api`` (auth + one read)
* ``rotate``  POST /v1/webhooks/{id}/rotate-secret on ``rotator api`` (auth + locked write)

Both servers are subprocesses on free 127.0.0.1 ports, started before the first target and
stopped after the last (a server that is not being loaded is idle); ``--rounds N`` measures the
targets N times, interleaved, and reports medians. Only loopback traffic; every phase has a fixed
duration. See bench/README.md for reading the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    ROOT,
    BenchError,
    Proc,
    cpu_s,
    ensure_database,
    find_bin,
    free_port,
    http_call,
    proc_stat,
    rotator_cli,
)

RESULTS_DIR = ROOT / "bench" / "results"
GOAL_GET_RATIO = 0.40
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rotator_bench"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# Requests still in flight this long after a phase's end are abandoned (counted as errors).
GRACE_S = 10.0


# --- targets and results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    server: str  # "bare" or "rotator"
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def request_bytes(self, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {HOST}:{port}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass
class Result:
    target: str
    method: str
    path: str
    generator: str
    connections: int
    duration_s: float
    requests: int  # responses received in the measured window, any status
    errors: int  # non-2xx responses
    socket_errors: int  # connect/read/write failures and timeouts
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    statuses: dict[str, int]
    observed: Observed
    round: int = 1


@dataclass
class Observed:
    """What the machine did during a measured window (None: could not be read)."""

    server_cpu_pct: float | None = None  # of one core; ~100 = the server process is CPU-bound
    client_cpu_pct: float | None = None  # the load generator, of one core
    machine_cpu_pct: float | None = None  # of all cores: server + generator + PostgreSQL + others
    background_cpu_pct: float | None = None  # of all cores, 1 s idle sample before the target
    server_ctx_switches: int | None = None  # all server threads, voluntary + involuntary
    db_transactions: int | None = None  # approximate: PostgreSQL flushes its counters ~1/s
    db_sessions_opened: int | None = None  # new PostgreSQL connections (pool churn), approximate

    def per_request(self, value: int | None, requests: int) -> float | None:
        return None if value is None or requests <= 0 else value / requests

    def server_cpu_ms_per_request(self, duration_s: float, requests: int) -> float | None:
        """Server CPU per request: robust to how much of a core others left the server."""
        if self.server_cpu_pct is None or requests <= 0:
            return None
        return 10.0 * self.server_cpu_pct * duration_s / requests


# --- what the machine does: /proc and PostgreSQL's statistics ----------------------------------


def _process_cpu_s(pid: int | None) -> float | None:
    fields = proc_stat(pid) if pid is not None else None
    return cpu_s(fields) if fields is not None else None  # utime + stime, all threads


def _ctx_switches(pid: int | None) -> int | None:
    if pid is None:
        return None
    total = 0
    try:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            with contextlib.suppress(OSError):
                for line in status.read_text().splitlines():
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
    except OSError:
        return None
    return total


def _machine_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies over all cores."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    values = [float(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _machine_pct(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def background_cpu(seconds: float = 1.0) -> float | None:
    """How busy the machine is while we send nothing (others' builds and tests show here)."""
    before = _machine_cpu()
    time.sleep(seconds)
    return _machine_pct(before, _machine_cpu())


class DbStats:
    """Transactions and sessions of the benchmark database, from pg_stat_database."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._connection = psycopg.connect(url, autocommit=True, connect_timeout=5)

    def read(self) -> tuple[int, int] | None:
        try:
            row = self._connection.execute(
                "SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database"
                " WHERE datname = current_database()"
            ).fetchone()
        except Exception:
            return None
        return (int(row[0]), int(row[1])) if row else None

    def close(self) -> None:
        self._connection.close()


class Probe:
    """Reads the counters at the start and the end of a measured window."""

    def __init__(self, pid: int | None, client: str, db: DbStats | None) -> None:
        self.pid = pid
        self.client = client  # "self": this process is the generator; "children": wrk
        self.db = db
        self._start: dict[str, Any] = {}

    def _client_cpu(self) -> float:
        who = resource.RUSAGE_SELF if self.client == "self" else resource.RUSAGE_CHILDREN
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    def _read(self) -> dict[str, Any]:
        return {
            "wall": time.perf_counter(),
            "server": _process_cpu_s(self.pid),
            "client": self._client_cpu(),
            "machine": _machine_cpu(),
            "ctx": _ctx_switches(self.pid),
            "db": self.db.read() if self.db else None,
        }

    def start(self) -> None:
        self._start = self._read()

    def stop(self, observed: Observed) -> Observed:
        end, start = self._read(), self._start
        wall = end["wall"] - start["wall"]
        if start["server"] is not None and end["server"] is not None and wall > 0:
            observed.server_cpu_pct = 100.0 * (end["server"] - start["server"]) / wall
        if wall > 0:
            observed.client_cpu_pct = 100.0 * (end["client"] - start["client"]) / wall
        observed.machine_cpu_pct = _machine_pct(start["machine"], end["machine"])
        if start["ctx"] is not None and end["ctx"] is not None:
            observed.server_ctx_switches = end["ctx"] - start["ctx"]
        if start["db"] is not None and end["db"] is not None:
            observed.db_transactions = end["db"][0] - start["db"][0]
            observed.db_sessions_opened = end["db"][1] - start["db"][1]
        return observed


# --- the built-in load generator -----------------------------------------------------------------


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    socket_errors: int = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return (status, connection stays open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep_alive = b"\r\nconnection: close" not in lower
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        length = int(lower[at + 17 : end])
        if length:
            await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif status >= 200 and status not in (204, 304):
        await reader.read()  # body delimited by the connection's close
        keep_alive = False
    return status, keep_alive


async def _client(
    port: int, request: bytes, measure_from: float, measure_to: float, tally: _Tally
) -> None:
    clock = time.perf_counter
    while clock() < measure_to:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            tally.socket_errors += 1
            await asyncio.sleep(0.01)
            continue
        try:
            while True:
                sent = clock()
                if sent >= measure_to:
                    return
                writer.write(request)
                status, keep_alive = await _read_response(reader)
                done = clock()
                if sent >= measure_from and done <= measure_to:
                    tally.latencies.append(done - sent)
                    tally.statuses[status] += 1
                if not keep_alive:
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if clock() < measure_to:
                tally.socket_errors += 1
            await asyncio.sleep(0.01)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _python_load(
    target: Target, port: int, connections: int, warmup: float, duration: float, probe: Probe
) -> tuple[_Tally, Observed]:
    tally = _Tally()
    measure_from = time.perf_counter() + warmup
    measure_to = measure_from + duration
    request = target.request_bytes(port)
    observed = Observed()

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        await asyncio.to_thread(probe.start)
        await asyncio.sleep(max(0.0, measure_to - time.perf_counter()))
        await asyncio.to_thread(probe.stop, observed)

    sampling = asyncio.create_task(sampler())
    tasks = [
        asyncio.create_task(_client(port, request, measure_from, measure_to, tally))
        for _ in range(connections)
    ]
    _, pending = await asyncio.wait(tasks, timeout=warmup + duration + GRACE_S)
    for task in pending:  # stuck past the grace period: abandon, count as errors
        task.cancel()
        tally.socket_errors += 1
    if pending:
        await asyncio.wait(pending)
    await sampling
    return tally, observed


def _percentile(ordered: Sequence[float], pct: float) -> float:
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(pct / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def run_python(
    target: Target,
    port: int,
    connections: int,
    warmup: float,
    duration: float,
    pid: int | None,
    db: DbStats | None,
) -> Result:
    probe = Probe(pid, "self", db)
    tally, observed = asyncio.run(_python_load(target, port, connections, warmup, duration, probe))
    window = duration
    ordered = sorted(tally.latencies)
    count = len(ordered)
    ms = 1000.0
    return Result(
        target=target.name,
        method=target.method,
        path=target.path,
        generator="python",
        connections=connections,
        duration_s=window,
        requests=count,
        errors=sum(n for status, n in tally.statuses.items() if not 200 <= status < 300),
        socket_errors=tally.socket_errors,
        rps=count / window if window else 0.0,
        p50_ms=_percentile(ordered, 50) * ms,
        p90_ms=_percentile(ordered, 90) * ms,
        p99_ms=_percentile(ordered, 99) * ms,
        max_ms=(ordered[-1] if ordered else 0.0) * ms,
        mean_ms=(sum(ordered) / count if count else 0.0) * ms,
        statuses={str(status): n for status, n in sorted(tally.statuses.items())},
        observed=observed,
    )


# --- wrk ----------------------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = {method}
wrk.body = {body}
{headers}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}} end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local merged = {{}}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {{}}
  for status, n in pairs(merged) do
    table.insert(parts, string.format('"%d":%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH_JSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%f,' ..
    '"statuses":{{%s}}}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, table.concat(parts, ",")))
end
"""


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string of ASCII text is a valid Lua string literal


def _wrk_script(target: Target) -> str:
    headers = "\n".join(
        f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}"
        for name, value in target.headers.items()
    )
    body = _lua_string(target.body.decode()) if target.method != "GET" else "nil"
    return _WRK_SCRIPT.format(method=_lua_string(target.method), body=body, headers=headers)


def _run_wrk(
    wrk: str, script: Path, url: str, connections: int, threads: int, seconds: float
) -> dict[str, Any]:
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + GRACE_S + 20, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            parsed: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return parsed
    raise BenchError(f"wrk gave no result:\n{completed.stdout}\n{completed.stderr}")


def run_wrk(
    wrk: str,
    target: Target,
    port: int,
    connections: int,
    threads: int,
    warmup: float,
    duration: float,
    pid: int | None,
    db: DbStats | None,
) -> Result:
    probe = Probe(pid, "children", db)
    with tempfile.TemporaryDirectory(prefix="rotator-bench-") as tmp:
        script = Path(tmp) / f"{target.name}.lua"
        script.write_text(_wrk_script(target))
        url = f"http://{HOST}:{port}{target.path}"
        if warmup > 0:
            _run_wrk(wrk, script, url, connections, threads, warmup)
        probe.start()
        raw = _run_wrk(wrk, script, url, connections, threads, duration)
        observed = probe.stop(Observed())
    window = raw["duration_us"] / 1e6
    statuses = {str(k): int(v) for k, v in sorted(raw["statuses"].items(), key=lambda kv: kv[0])}
    us = 1000.0
    return Result(
        target=target.name,
        method=target.method,
        path=target.path,
        generator="wrk",
        connections=connections,
        duration_s=window,
        requests=int(raw["requests"]),
        errors=sum(n for status, n in statuses.items() if not 200 <= int(status) < 300),
        socket_errors=sum(int(raw[k]) for k in ("connect", "read", "write", "timeout")),
        rps=raw["requests"] / window if window else 0.0,
        p50_ms=raw["p50_us"] / us,
        p90_ms=raw["p90_us"] / us,
        p99_ms=raw["p99_us"] / us,
        max_ms=raw["max_us"] / us,
        mean_ms=raw["mean_us"] / us,
        statuses=statuses,
        observed=observed,
    )


# --- servers ------------------------------------------------------------------------------------


@dataclass
class Server(Proc):
    """A server on a free port, given to it as ``--port``; ready when GET ``ready_path`` is 200."""

    ready_path: str = "/"
    port: int = 0
    ready_timeout_s: float = READY_TIMEOUT_S
    stop_timeout_s: float = STOP_TIMEOUT_S

    def start(self) -> None:
        self.port = free_port()
        self._spawn([*self.command, "--port", str(self.port)])
        self.wait_http(self.port, self.ready_path)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- rotator setup ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotatorSetup:
    env: dict[str, str]
    api_key: str


def rotator_env(rotator: str, database_url: str, broker_url: str) -> dict[str, str]:
    """The environment `rotator` runs with: production, a fresh at-rest key."""
    env = dict(os.environ)
    env.pop("ROTATOR_DATA_DIR", None)
    key = rotator_cli(rotator, env, "secrets", "genkey")
    env.update(
        ROTATOR_DATABASE_URL=database_url,
        ROTATOR_BROKER_URL=broker_url,
        ROTATOR_ENCRYPTION_KEYS=key,
        ROTATOR_ENV="production",
    )
    return env


def prepare_rotator(rotator: str, database_url: str, broker_url: str) -> RotatorSetup:
    """Database at the newest migration, and a fresh organization with an all-scopes key."""
    ensure_database(database_url, hint=": use e.g. rotator_bench")
    env = rotator_env(rotator, database_url, broker_url)
    rotator_cli(rotator, env, "db", "upgrade")
    issued = json.loads(rotator_cli(rotator, env, "orgs", "create", "--name", "bench"))
    return RotatorSetup(env=env, api_key=str(issued["api_key"]))


# `rotator api` with uvicorn.run replaced by a function that prints its options: whatever the
# command passes (workers, log level, access log, ...) the baseline server gets too.
_CAPTURE_OPTIONS = """
import json
import uvicorn

def run(app, **options):
    scalars = {
        k: v for k, v in options.items() if v is None or isinstance(v, (str, int, float, bool))
    }
    scalars["log_config"] = options.get("log_config") is not None
    print("UVICORN_OPTIONS " + json.dumps(scalars), flush=True)

uvicorn.run = run
from rotator.cli import main
raise SystemExit(main(["api", "--host", "127.0.0.1", "--port", "1"]))
"""

# uvicorn.run keyword -> uvicorn command-line option (value options and on/off switches).
_VALUE_FLAGS = {
    "workers": "--workers",
    "log_level": "--log-level",
    "loop": "--loop",
    "http": "--http",
    "ws": "--ws",
    "lifespan": "--lifespan",
    "backlog": "--backlog",
    "limit_concurrency": "--limit-concurrency",
    "limit_max_requests": "--limit-max-requests",
    "timeout_keep_alive": "--timeout-keep-alive",
    "h11_max_incomplete_event_size": "--h11-max-incomplete-event-size",
}
_SWITCHES = {
    "access_log": ("--access-log", "--no-access-log"),
    "proxy_headers": ("--proxy-headers", "--no-proxy-headers"),
    "server_header": ("--server-header", "--no-server-header"),
    "date_header": ("--date-header", "--no-date-header"),
}
# Options that name the app or where it listens, or only shape startup/log formatting.
_NOT_MIRRORED = {"factory", "host", "port", "log_config"}


def rotator_api_options(rotator_environment: dict[str, str]) -> dict[str, Any]:
    """The keyword arguments `rotator api` passes to uvicorn.run (scalars only)."""
    completed = subprocess.run(
        [sys.executable, "-c", _CAPTURE_OPTIONS],
        cwd=ROOT,
        env=rotator_environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("UVICORN_OPTIONS "):
            options: dict[str, Any] = json.loads(line.removeprefix("UVICORN_OPTIONS "))
            return options
    raise BenchError(f"could not read `rotator api`'s uvicorn options:\n{completed.stderr}")


def baseline_flags(options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """uvicorn command-line flags equivalent to `options`, and the options not mirrored."""
    flags: list[str] = []
    skipped: list[str] = []
    for name, value in sorted(options.items()):
        if name in _VALUE_FLAGS and value is not None:
            flags += [_VALUE_FLAGS[name], str(value)]
        elif name in _SWITCHES and isinstance(value, bool):
            flags.append(_SWITCHES[name][0 if value else 1])
        elif name not in _NOT_MIRRORED and value is not None:
            skipped.append(name)
    return flags, skipped


def create_endpoint(port: int, api_key: str) -> str:
    body = json.dumps(
        {
            "url": "https://bench.invalid/hook",  # .invalid never resolves; no worker runs anyway
            "events": ["campaign.approved"],
            "description": "api_bench",
        }
    ).encode()
    status, raw = http_call(
        port,
        "POST",
        "/v1/webhooks",
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        body=body,
    )
    if status != 201:
        raise BenchError(f"POST /v1/webhooks answered {status}: {raw[:500]!r}")
    endpoint_id: str = json.loads(raw)["id"]
    return endpoint_id


def check_target(port: int, target: Target) -> None:
    """One request before loading: a target that does not answer 2xx is a setup error."""
    status, raw = http_call(
        port, target.method, target.path, headers=target.headers, body=target.body or None
    )
    if not 200 <= status < 300:
        raise BenchError(f"{target.method} {target.path} answered {status}: {raw[:300]!r}")


# --- reporting ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _short(request: str, width: int) -> str:
    if len(request) <= width:
        return request
    keep = width - 3
    return request[: keep // 2] + "..." + request[-(keep - keep // 2) :]


def print_table(results: Sequence[Result]) -> None:
    header = (
        f"{'target':<8} {'request':<40} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'errors':>7} {'sock err':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.target:<8} {_short(f'{r.method} {r.path}', 40):<40} {r.rps:>9.1f} "
            f"{r.p50_ms:>8.2f} {r.p90_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>7d} "
            f"{r.socket_errors:>8d}"
        )
    print()
    header = (
        f"{'target':<8} {'server CPU%':>11} {'srv CPU ms/req':>14} {'client CPU%':>11} "
        f"{'all CPU%':>9} {'idle-before%':>12} {'ctx sw/req':>10} {'db xact/req':>11} "
        f"{'db conns+':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        o = r.observed
        cost = o.server_cpu_ms_per_request(r.duration_s, r.requests)
        print(
            f"{r.target:<8} {_fmt(o.server_cpu_pct):>11} {_fmt(cost, 3):>14} "
            f"{_fmt(o.client_cpu_pct):>11} "
            f"{_fmt(o.machine_cpu_pct):>9} {_fmt(o.background_cpu_pct):>12} "
            f"{_fmt(o.per_request(o.server_ctx_switches, r.requests)):>10} "
            f"{_fmt(o.per_request(o.db_transactions, r.requests), 2):>11} "
            f"{'-' if o.db_sessions_opened is None else o.db_sessions_opened:>9}"
        )
    if any((r.observed.client_cpu_pct or 0) > 90 for r in results):
        print("WARNING: the load generator was near 100% of a core: it may be the bottleneck")
    if any((r.observed.background_cpu_pct or 0) > 20 for r in results):
        print(
            "WARNING: the machine was busy before some targets (idle-before% > 20): other "
            "processes compete for the cores; compare ratios from quiet runs only"
        )


def ratios(results: Sequence[Result]) -> dict[str, float]:
    """Throughput of each target relative to bare, within one round."""
    by_name = {r.target: r for r in results}
    bare = by_name.get("bare")
    if bare is None or bare.rps <= 0:
        return {}
    return {f"{r.target}/bare": r.rps / bare.rps for r in results if r.target != "bare"}


def cost_ratios(results: Sequence[Result]) -> dict[str, float]:
    """Server CPU per request of bare / of each target: the throughput ratio a CPU-bound
    single worker would reach on an otherwise idle machine (less sensitive to others' load)."""
    costs = {
        r.target: r.observed.server_cpu_ms_per_request(r.duration_s, r.requests) for r in results
    }
    bare = costs.get("bare")
    if not bare:
        return {}
    return {f"{name}/bare": bare / cost for name, cost in costs.items() if name != "bare" and cost}


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def summarize(results: Sequence[Result], by: Any = None) -> tuple[list[Result], dict[str, float]]:
    """Per target the round with the median req/s, and the median of each round's ratios."""
    by = by or ratios
    names = list(dict.fromkeys(r.target for r in results))
    median_rows = []
    for name in names:
        rows = sorted((r for r in results if r.target == name), key=lambda r: r.rps)
        median_rows.append(rows[(len(rows) - 1) // 2])
    rounds = sorted({r.round for r in results})
    per_round = [by([r for r in results if r.round == n]) for n in rounds]
    keys = list(dict.fromkeys(k for found in per_round for k in found))
    found = {k: _median([f[k] for f in per_round if k in f]) for k in keys}
    return median_rows, found


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    packages: dict[str, str | None] = {}
    for name in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "sqlalchemy", "psycopg"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "packages": packages,
    }


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds per target")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive conns")
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when on PATH, else the built-in asyncio generator",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every target this many times, interleaved; report the medians",
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument(
        "--targets",
        default="bare,bare-db,healthz,get,rotate",
        help="comma separated subset of bare,bare-db,healthz,get,rotate",
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs in bench/results/"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1 or args.rounds < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --connections and --rounds >= 1")
    return args


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _git_head() -> str | None:
    """The commit measured (read-only: `git rev-parse`), plus "+dirty" for local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


def _settings_overrides() -> dict[str, str]:
    """ROTATOR_* variables passed through from the caller's environment (never the keys)."""
    hidden = {"ROTATOR_ENCRYPTION_KEYS"}
    return {
        k: v for k, v in sorted(os.environ.items()) if k.startswith("ROTATOR_") and k not in hidden
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    wanted = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = set(wanted) - {"bare", "bare-db", "healthz", "get", "rotate"}
    if unknown:
        print(f"unknown target(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    wrk = shutil.which("wrk")
    if args.generator == "wrk" and wrk is None:
        print("--generator wrk: wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    generator = "wrk" if wrk is not None and args.generator != "python" else "python"

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    try:
        rotator = find_bin("rotator")
        # The baseline is served with the uvicorn options `rotator api` itself passes.
        uvicorn_options = rotator_api_options(
            rotator_env(rotator, args.database_url, args.broker_url)
        )
    except BenchError as exc:
        print(f"api_bench: {exc}", file=sys.stderr)
        return 1
    flags, not_mirrored = baseline_flags(uvicorn_options)
    print(
        f"generator={generator} connections={args.connections} warmup={args.warmup}s "
        f"duration={args.duration}s rounds={args.rounds} cpus={os.cpu_count()} "
        f"commit={_git_head()}"
    )
    print(f"rotator api -> uvicorn.run options: {json.dumps(uvicorn_options, sort_keys=True)}")
    print(f"baseline uvicorn flags: {' '.join(flags)}")
    if not_mirrored:
        print(f"WARNING: options of `rotator api` not given to the baseline: {not_mirrored}")

    def load(target: Target, server: Server, db: DbStats | None) -> Result:
        idle = background_cpu()
        print(f"  {target.name}: {target.method} {target.path} ...", flush=True)
        if generator == "wrk" and wrk is not None:
            result = run_wrk(
                wrk,
                target,
                server.port,
                args.connections,
                args.wrk_threads,
                args.warmup,
                args.duration,
                server.pid,
                db,
            )
        else:
            result = run_python(
                target, server.port, args.connections, args.warmup, args.duration, server.pid, db
            )
        result.observed.background_cpu_pct = idle
        return result

    results: list[Result] = []
    endpoint_id = ""
    with tempfile.TemporaryDirectory(prefix="rotator-bench-logs-") as tmp:
        log_dir = Path(tmp)
        servers: list[Server] = []
        db: DbStats | None = None
        try:
            with contextlib.ExitStack() as stack:
                plan: list[tuple[Target, Server, DbStats | None]] = []
                if "bare" in wanted or "bare-db" in wanted:
                    bare = Server(
                        name="bare",
                        command=[
                            sys.executable,
                            "-m",
                            "uvicorn",
                            "bench.bare_app:app",
                            "--host",
                            HOST,
                            *flags,
                        ],
                        env={**os.environ, "BENCH_DATABASE_URL": args.database_url},
                        ready_path="/bare",
                        log_dir=log_dir,
                    )
                    servers.append(bare)
                    stack.enter_context(running(bare))
                    for name in ("bare", "bare-db"):
                        if name in wanted:
                            plan.append((Target(name, "bare", "GET", f"/{name}"), bare, None))

                rotator_targets = [name for name in wanted if not name.startswith("bare")]
                if rotator_targets:
                    setup = prepare_rotator(rotator, args.database_url, args.broker_url)
                    db = DbStats(args.database_url)
                    api = Server(
                        name="rotator",
                        command=[rotator, "api", "--host", HOST, "--workers", "1"],
                        env=setup.env,
                        ready_path="/readyz",
                        log_dir=log_dir,
                    )
                    servers.append(api)
                    stack.enter_context(running(api))
                    endpoint_id = create_endpoint(api.port, setup.api_key)
                    auth = {"Authorization": f"Bearer {setup.api_key}"}
                    path = f"/v1/webhooks/{endpoint_id}"
                    for name in rotator_targets:
                        if name == "healthz":
                            target = Target("healthz", "rotator", "GET", "/healthz")
                        elif name == "get":
                            target = Target("get", "rotator", "GET", path, auth)
                        else:
                            rotate = f"{path}/rotate-secret"
                            target = Target("rotate", "rotator", "POST", rotate, auth)
                        plan.append((target, api, db))

                for target, server, _ in plan:
                    check_target(server.port, target)
                for round_no in range(1, args.rounds + 1):
                    if args.rounds > 1:
                        print(f"round {round_no}/{args.rounds}")
                    for target, server, stats in plan:
                        result = load(target, server, stats)
                        result.round = round_no
                        results.append(result)
        except BenchError as exc:
            print(f"api_bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("api_bench: interrupted; servers stopped", file=sys.stderr)
            return 130
        finally:
            if db is not None:
                db.close()
            if args.keep_logs:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                for server in servers:
                    if server.log_path.exists():
                        kept = RESULTS_DIR / f"api-{stamp}-{server.name}.log"
                        shutil.copyfile(server.log_path, kept)
                        print(f"kept {kept.relative_to(ROOT)}")

    summary, found = summarize(results)
    _, found_cost = summarize(results, cost_ratios)
    print()
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds (per target: the round with the median req/s)")
    print_table(summary)
    if args.rounds > 1:
        print()
        for name in dict.fromkeys(r.target for r in results):
            rates = ", ".join(f"{r.rps:.1f}" for r in results if r.target == name)
            print(f"req/s by round {name:<8} {rates}")
    print()
    for name, value in found.items():
        cost = found_cost.get(name)
        shown = "-" if cost is None else f"{cost:.1%}"
        print(f"ratio {name:<14} {value:6.1%}   (server CPU-cost ratio {shown})")
    get_ratio = found.get("get/bare")
    goal_met = None if get_ratio is None else get_ratio >= GOAL_GET_RATIO
    if get_ratio is not None:
        verdict = "MET" if goal_met else "NOT MET"
        print(f"goal: GET >= {GOAL_GET_RATIO:.0%} of bare -> {verdict} ({get_ratio:.1%})")
    if any(r.errors or r.socket_errors for r in results):
        print("WARNING: some requests failed (see errors / sock err); the figures are suspect")

    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"api-{stamp}.json"
        document = {
            "timestamp": stamp,
            "wall_s": round(time.monotonic() - started, 1),
            "settings": {
                "generator": generator,
                "wrk_threads": args.wrk_threads if generator == "wrk" else None,
                "connections": args.connections,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
                "rotator_api_uvicorn_options": uvicorn_options,
                "baseline_uvicorn_flags": flags,
                "not_mirrored": not_mirrored,
                "commit": _git_head(),
                "database_url": args.database_url,
                "broker_url": args.broker_url,
                "rotator_env_overrides": _settings_overrides(),
                "endpoint_id": endpoint_id,
            },
            "environment": environment(),
            "summary": [asdict(r) for r in summary],
            "ratios": found,
            "cpu_cost_ratios": found_cost,
            "ratios_by_round": [
                ratios([r for r in results if r.round == n]) for n in range(1, args.rounds + 1)
            ],
            "results": [asdict(r) for r in results],
            "goal": {"get_over_bare_min": GOAL_GET_RATIO, "met": goal_met},
        }
        out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
