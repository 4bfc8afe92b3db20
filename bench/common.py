"""What the benchmark scripts share: subprocesses, loopback HTTP, /proc CPU accounting, setup.

``bench/api_bench.py``, ``bench/delivery_bench.py`` and ``bench/migrate_bench.py`` (and the
helpers built on them) start servers and workers as subprocesses, wait for them, stop them and
read their CPU time from /proc; this module holds the one version of that code.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RESERVED_DATABASES = frozenset({"test", "postgres", "template0", "template1"})


class BenchError(RuntimeError):
    """The benchmark cannot go on (setup failed, a process did not start, a phase timed out)."""


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def http_call(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Proc:
    """A subprocess in its own process group (so its children are found and stopped with it).

    Its own session also keeps our Ctrl-C from reaching it: we stop it ourselves.
    """

    name: str
    command: list[str]
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 15.0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self._spawn(self.command)

    def _spawn(self, command: list[str]) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited:\n{self.log_tail()}")

    def wait_http(self, port: int, path: str) -> None:
        """Until GET ``path`` answers 200 (BenchError if the process exits or it takes too long)."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited early:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_call(port, "GET", path, timeout=2.0)[0] == 200:
                    return
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready in {self.ready_timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the process (Celery: warm shutdown, running tasks finish), then SIGKILL
        to its whole group if it or any child is still there after ``stop_timeout_s``.

        Only the main process gets SIGTERM: a prefork child that receives it directly dies
        mid-task and leaves a claimed, unrecorded delivery behind.
        """
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=self.stop_timeout_s)
        # Children (prefork pool) may outlive the parent for a moment; they are in our group.
        deadline = time.monotonic() + self.stop_timeout_s
        while group_pids(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_pids(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- CPU accounting from /proc ------------------------------------------------------------------


def proc_stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat as fields: [comm, state, ppid, pgrp, session, ..., utime(12), stime(13)].

    comm is cut out between the first "(" and the last ")": it may hold spaces and parentheses.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return [stat[stat.index("(") + 1 : stat.rindex(")")], *stat[stat.rindex(")") + 2 :].split()]


def _all_stats() -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(entry.name)
            if fields is not None:
                yield int(entry.name), fields


def group_pids(pgid: int) -> list[int]:
    """Processes of a process group (fields[3] is the pgrp)."""
    return [pid for pid, fields in _all_stats() if int(fields[3]) == pgid]


def cpu_s(fields: list[str]) -> float:
    """User + system CPU seconds (all threads) of a process, from its ``proc_stat`` fields."""
    return (int(fields[12]) + int(fields[13])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def cpu_snapshot(groups: dict[str, int], database: str) -> dict[str, float]:
    """CPU seconds so far: each named process group, our PostgreSQL backends, Redis, this process.

    ``machine_busy``/``machine_total`` cover all cores; what the machine spent beyond the tracked
    processes (other PostgreSQL databases, other users of the machine) is their difference.
    This process is counted as ``bench`` only, never also in a group.
    """
    out: dict[str, float] = dict.fromkeys([*groups, "postgres", "redis", "bench"], 0.0)
    by_pgid = {pgid: name for name, pgid in groups.items()}
    me = os.getpid()
    for pid, fields in _all_stats():
        name = by_pgid.get(int(fields[3]))
        if pid == me:
            out["bench"] += cpu_s(fields)
        elif name is not None:
            out[name] += cpu_s(fields)
        elif fields[0] == "postgres" and f" {database} " in _cmdline(pid):
            out["postgres"] += cpu_s(fields)
        elif fields[0].startswith("redis-server"):
            out["redis"] += cpu_s(fields)
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    values = [float(v) for v in first[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    out["machine_busy"] = (sum(values[:8]) - values[3] - values[4]) / ticks  # minus idle, iowait
    out["machine_total"] = sum(values[:8]) / ticks  # guest time is already in user/nice
    return out


# --- setup --------------------------------------------------------------------------------------


def find_bin(name: str) -> str:
    """An executable next to this Python (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def rotator_cli(rotator: str, env: dict[str, str], *args: str) -> str:
    """Run ``rotator *args``; its stdout, stripped (BenchError with its stderr if it fails)."""
    completed = subprocess.run(
        [rotator, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if completed.returncode != 0:
        raise BenchError(f"rotator {' '.join(args)} failed:\n{completed.stderr}")
    return completed.stdout.strip()


def db_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def ensure_database(url: str, hint: str = "") -> None:
    """Create the benchmark database if it is missing (never touches any other database).

    ``hint`` is appended to the refusal for a reserved name (e.g. ": use e.g. rotator_bench").
    """
    import psycopg
    from psycopg import sql

    name = db_name(url)
    if not name or name in RESERVED_DATABASES:
        raise BenchError(f"refusing to benchmark on database {name!r}{hint}")
    maintenance = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(maintenance, autocommit=True, connect_timeout=5) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def flush_broker(url: str) -> None:
    """Empty the broker's Redis database (left-overs of an aborted run would skew the counts)."""
    import redis

    if urlsplit(url).path.strip("/") in ("", "0"):
        raise BenchError("refusing to flush Redis database 0: pass a --broker-url of your own")
    redis.Redis.from_url(url).flushdb()


def vacuum_analyze(database_url: str) -> None:
    """``VACUUM (ANALYZE)`` the benchmark database before measuring, as autovacuum would.

    A benchmark writes its set-up rows just before it measures, faster than autovacuum
    analyzes them (and a server may run with autovacuum off). With stale statistics PostgreSQL
    plans from the wrong side: the delivery claim's ``UPDATE`` from the endpoints and the
    record's through the ``state`` index, walking every pending delivery (30 ms instead of 1 ms
    per claim of 20 after some 100k deliveries); an endpoint read by id through the
    organization's index, reading all its endpoints (500 rows per read in the migrate
    benchmark, 4 000 tuples fetched per migration); the operations, their steps, events and
    deliveries by whole scans once the rounds before had filled them (statistics taken while
    they were empty).
    """
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as connection:
        connection.execute("VACUUM (ANALYZE)")
