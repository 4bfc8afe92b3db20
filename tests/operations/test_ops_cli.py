"""``rotator ops list`` and ``rotator ops watch``, against the test database."""

import io
import os
import pty
import re
import threading
import uuid

from models import bulk, remote
from models import provider as providers
from models.endpoint import create_endpoint
from models.migration import begin_advance, start_migration
from models.operation import request_cancel
from models.org import ALL_SCOPES
from receiver import DemoReceiver, serve
from rotator.cli import main
from rotator.opsview import watch
from tests.factories import make_tenant
from tests.support import overridden
from workers.operations import advance


def _migration(database, url="https://hooks.example/h"):
    tenant = make_tenant(database)
    with database.session() as session:
        old = create_endpoint(session, tenant.org_id, url=url, events=["brand.vetted"])
        started = start_migration(session, tenant.org_id, old.endpoint.id)
    return tenant, old, started


def test_list_shows_operations_newest_first_and_filters(database, capsys):
    _, _, first = _migration(database)
    _, _, second = _migration(database)
    assert main(["ops", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["ID", "KIND", "STATE"]
    assert [line.split()[0] for line in out[1:]] == [
        str(second.operation.id),
        str(first.operation.id),
    ]
    assert main(["ops", "list", "--org", str(first.operation.org_id)]) == 0
    assert str(second.operation.id) not in capsys.readouterr().out
    assert main(["ops", "list", "--state", "succeeded"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_watch_exits_non_zero_for_an_operation_that_did_not_succeed(database, capsys):
    tenant, _, started = _migration(database)
    with database.session() as session:
        request_cancel(session, tenant.org_id, started.operation.id, scopes=ALL_SCOPES)
    with database.session() as session:
        begin_advance(session, started.operation.id)
    assert main(["ops", "watch", str(started.operation.id)]) == 1
    screen = capsys.readouterr().out
    assert "canceled" in screen
    assert "create_endpoint" in screen


def test_watch_of_an_unknown_operation(capsys):
    assert main(["ops", "watch", str(uuid.uuid4())]) == 2


def test_watch_follows_a_live_migration_until_it_succeeds(database):
    receiver = DemoReceiver(["A" * 43 + "="])
    server = serve(receiver, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    try:
        with overridden(database.settings, allow_insecure_urls=True):
            _, _, started = _migration(database, url=url)
            receiver.add_secret(started.secret)
            out = io.StringIO()
            result: list[int] = []
            watcher = threading.Thread(
                target=lambda: result.append(
                    watch(database, started.operation.id, out, interval=0.05)
                )
            )
            watcher.start()
            for _ in range(4):
                advance(database, started.operation.id)
            watcher.join(timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert result == [0]
    # Not a terminal: one line per change, each a timestamp, the operation and what changed.
    lines = out.getvalue().splitlines()
    prefix = re.compile(rf"^\S+Z operation {started.operation.id} ")
    assert all(prefix.match(line) for line in lines), lines
    changes = [prefix.sub("", line) for line in lines]
    assert changes[0] == "safe_migrate trigger=api"
    assert len(changes) == len(set(changes)), "a line repeats what did not change"
    assert changes[-1] == "state succeeded"
    assert "step delete_old_endpoint succeeded tries=1" in changes
    assert "\x1b" not in out.getvalue()


def test_watch_on_a_terminal_redraws_the_whole_view(database):
    tenant, _, started = _migration(database)
    with database.session() as session:
        request_cancel(session, tenant.org_id, started.operation.id, scopes=ALL_SCOPES)
    with database.session() as session:
        begin_advance(session, started.operation.id)
    controller, device = pty.openpty()
    try:
        with open(device, "w") as terminal:
            assert watch(database, started.operation.id, terminal) == 1
        screen = os.read(controller, 65536).decode()
    finally:
        os.close(controller)
    assert screen.startswith("\x1b[H\x1b[2J")
    assert "STEP" in screen
    assert "canceled" in screen


def _bulk(database, count=3, cap=1):
    tenant = make_tenant(database)
    with database.session() as session:
        for _ in range(count):
            create_endpoint(
                session, tenant.org_id, url="https://hooks.example/h", events=["brand.vetted"]
            )
        started = bulk.start(session, tenant.org_id, max_concurrency=cap)
    return tenant, started


def test_list_folds_a_bulk_migrates_children_under_it(database, capsys):
    _, started = _bulk(database)
    assert main(["ops", "list", "--org", str(started.operation.org_id)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].split()[:3] == [str(started.operation.id), "bulk_migrate", "running"]
    assert [line.split()[0] for line in lines[1:]] == ["└"] * 3
    assert {line.split()[2] for line in lines[1:]} == {"safe_migrate"}


def test_watch_of_a_bulk_migrate_reports_its_children(database):
    tenant, started = _bulk(database)
    with database.session() as session:
        bulk.cancel(session, tenant.org_id, started.operation.id, scopes=ALL_SCOPES)
    (running,) = started.started
    with database.session() as session:
        begin_advance(session, running)
        bulk.child_ended(session, started.operation.id)
    out = io.StringIO()
    assert watch(database, started.operation.id, out) == 1
    text = out.getvalue()
    assert "children total=3 canceled=3" in text
    assert "state canceled" in text


def test_watch_names_a_remote_migrates_provider_and_remote_ids(database, capsys):
    tenant = make_tenant(database)
    with database.session() as session:
        provider = providers.create(
            session,
            tenant.org_id,
            name="AgentMessage EU",
            base_url="https://provider.example.com",
            api_key="am_live_" + "p" * 34,
        )
        operation = remote.start(session, tenant.org_id, provider.id, "we_remote_1")
    with database.session() as session:
        request_cancel(session, tenant.org_id, operation.id, scopes=ALL_SCOPES)
    advance(database, operation.id)  # canceled before anything was created: nothing to undo
    assert main(["ops", "watch", str(operation.id)]) == 1
    screen = capsys.readouterr().out
    assert "remote_migrate" in screen
    assert f"we_remote_1 -> - at provider 'AgentMessage EU' ({provider.id})" in screen
    assert "canceled" in screen
