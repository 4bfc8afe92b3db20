"""Safe migrate end to end, every way out: a real worker and beat, a real receiver on loopback.

The deadline cases start with ``deadline_seconds=60`` (the API's minimum, docs/api.md) and then
move the operation's ``deadline_at`` a couple of seconds ahead straight in the database: the
workers read that column on every advance, so this is exactly what a minute passing would do,
without making the suite wait a minute.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from models import clock
from models.delivery import Delivery, DeliveryKind
from models.endpoint import WebhookEndpoint
from models.operation import Operation
from receiver import DemoReceiver
from tests.contract import OPERATION_FIELDS
from tests.factories import Tenant, make_tenant
from workers.enqueue import send
from workers.names import TaskName

pytestmark = pytest.mark.e2e

E2E_OVERRIDES = {"migrate_backoff_initial_seconds": 0.2, "migrate_backoff_max_seconds": 0.5}

TERMINAL = {"succeeded", "rolled_back", "failed", "canceled"}
# The order states may follow; a migration may go back to running after waiting.
STATE_ORDER = {"pending": 0, "running": 1, "awaiting_receiver": 1, **dict.fromkeys(TERMINAL, 2)}


@pytest.fixture(scope="module", autouse=True)
def _no_stale_messages() -> None:
    """Drop messages earlier tests published with no worker running (their rows are gone).

    Autouse, so it runs before ``workers`` starts; the real pass purges there as well, but the
    in-memory broker of the embedded pass would otherwise feed the worker a backlog first.
    """
    from workers.app import app as celery_app

    celery_app.control.purge()


@pytest.fixture
def tenant(database) -> Tenant:
    return make_tenant(database)


@pytest.fixture
def old(client, tenant, demo_receiver) -> dict[str, Any]:
    """The endpoint to migrate; the receiver knows only its secret."""
    created = client.post(
        "/v1/webhooks",
        json={"url": demo_receiver.url, "events": ["brand.vetted"]},
        headers=tenant.headers,
    )
    assert created.status_code == 201, created.text
    demo_receiver.set_secrets([created.json()["secret"]])
    body: dict[str, Any] = created.json()
    return body


# --- helpers ------------------------------------------------------------------------------------


def migrate(client, tenant: Tenant, endpoint_id: str) -> dict[str, Any]:
    response = client.post(
        f"/v1/webhooks/{endpoint_id}/migrate",
        json={"deadline_seconds": 60},
        headers=tenant.headers,
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def get_operation(client, tenant: Tenant, operation_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/operations/{operation_id}", headers=tenant.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for(
    client,
    tenant: Tenant,
    operation_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 20.0,
    on_change: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll the operation until ``done(operation)``; ``on_change`` sees every observed change."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        body = get_operation(client, tenant, operation_id)
        if body != last and on_change is not None:
            on_change(body)
        last = body
        if done(body):
            return body
        time.sleep(0.05)
    raise TimeoutError(f"operation never got there: {last}")


def in_state(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda body: body["state"] in states


def finished(body: dict[str, Any]) -> bool:
    return body["finished_at"] is not None


def move_deadline(database, operation_id: str, seconds: float) -> None:
    """Bring the deadline to ``seconds`` from now (the API's minimum is 60 s; see the top)."""
    with database.session() as session:
        session.execute(
            update(Operation)
            .where(Operation.id == uuid.UUID(operation_id))
            .values(deadline_at=clock.now() + timedelta(seconds=seconds))
        )


def status_of(client, tenant: Tenant, endpoint_id: str | None) -> int:
    assert endpoint_id is not None
    return int(client.get(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers).status_code)


def endpoint_rows(database, org_id: uuid.UUID) -> list[WebhookEndpoint]:
    with database.session() as session:
        return list(
            session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.org_id == org_id))
        )


def probe_count(database, org_id: uuid.UUID) -> int:
    with database.session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.org_id == org_id, Delivery.kind == DeliveryKind.PROBE)
            )
            or 0
        )


def accepted_events(receiver: DemoReceiver, event_type: str) -> list[dict[str, Any]]:
    return [e for e in receiver.events() if e["status"] == 200 and e["type"] == event_type]


def assert_old_endpoint_kept(client, tenant: Tenant, receiver: DemoReceiver, operation) -> None:
    """Invariant 4 after a roll back: the old endpoint live and still delivered to, the new gone."""
    old_id, new_id = operation["source_endpoint_id"], operation["new_endpoint_id"]
    assert status_of(client, tenant, old_id) == 200
    assert status_of(client, tenant, new_id) == 404
    published = client.post(
        "/v1/events", json={"type": "brand.vetted", "data": {"n": 1}}, headers=tenant.headers
    )
    assert published.status_code == 202, published.text
    assert [d["endpoint_id"] for d in published.json()["deliveries"]] == [old_id]
    deadline = time.monotonic() + 15
    while not accepted_events(receiver, "brand.vetted"):
        assert time.monotonic() < deadline, receiver.events()
        time.sleep(0.05)
    (got,) = accepted_events(receiver, "brand.vetted")
    assert got["id"] == published.json()["id"]
    assert got["secret_index"] == 0  # signed with the old secret, the only one it knows


def step_states(operation: dict[str, Any]) -> list[str]:
    return [step["state"] for step in operation["steps"]]


# --- the ways out -------------------------------------------------------------------------------


def test_receiver_never_accepting_rolls_back_at_the_deadline(
    client, database, workers, tenant, old, demo_receiver
):
    operation = migrate(client, tenant, old["id"])
    retrying = wait_for(
        client,
        tenant,
        operation["id"],
        lambda body: body["state"] == "awaiting_receiver" and body["steps"][2]["attempts"] >= 1,
    )
    assert retrying["finished_at"] is None  # refused twice, still trying within the deadline
    move_deadline(database, operation["id"], 2)

    done = wait_for(client, tenant, operation["id"], finished)
    assert done["state"] == "rolled_back", done
    assert done["error"]["code"] == "DEADLINE_EXCEEDED"
    assert done["error"]["message"]
    assert step_states(done) == ["succeeded", "succeeded", "failed", "skipped"]
    assert done["steps"][2]["last_error"]
    refused = [e for e in demo_receiver.events() if e["status"] == 401]
    assert len(refused) == 1 + done["steps"][2]["attempts"]  # every test delivery was refused
    assert_old_endpoint_kept(client, tenant, demo_receiver, done)
    assert len(endpoint_rows(database, tenant.org_id)) == 2


def test_cancel_while_waiting_rolls_back(client, database, workers, tenant, old, demo_receiver):
    operation = migrate(client, tenant, old["id"])
    wait_for(client, tenant, operation["id"], in_state("awaiting_receiver"))
    path = f"/v1/operations/{operation['id']}/cancel"
    canceled = client.post(path, headers=tenant.headers)
    assert canceled.status_code == 202, canceled.text
    assert canceled.json()["id"] == operation["id"]

    done = wait_for(client, tenant, operation["id"], finished)
    assert done["state"] == "canceled", done
    assert done["error"] is None
    assert step_states(done) == ["succeeded", "succeeded", "failed", "skipped"]
    assert_old_endpoint_kept(client, tenant, demo_receiver, done)
    again = client.post(path, headers=tenant.headers)
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "CONFLICT"


def test_cancel_after_the_old_endpoint_is_deleted_is_409(
    client, database, workers, tenant, old, demo_receiver
):
    operation = migrate(client, tenant, old["id"])
    wait_for(client, tenant, operation["id"], in_state("awaiting_receiver"))
    demo_receiver.add_secret(operation["secret"])
    done = wait_for(client, tenant, operation["id"], finished)
    assert done["state"] == "succeeded", done

    refused = client.post(f"/v1/operations/{operation['id']}/cancel", headers=tenant.headers)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "CONFLICT"
    time.sleep(0.3)  # a wrongly accepted cancel would have been acted on by now
    assert get_operation(client, tenant, operation["id"]) == done
    assert status_of(client, tenant, old["id"]) == 404
    assert status_of(client, tenant, done["new_endpoint_id"]) == 200


def test_a_busy_endpoint_cannot_be_migrated_again_or_deleted(
    client, database, workers, tenant, old, demo_receiver
):
    operation = migrate(client, tenant, old["id"])
    waiting = wait_for(client, tenant, operation["id"], in_state("awaiting_receiver"))
    new_id = waiting["new_endpoint_id"]
    for endpoint_id in (old["id"], new_id):
        again = client.post(f"/v1/webhooks/{endpoint_id}/migrate", headers=tenant.headers)
        assert again.status_code == 409, again.text
        assert again.json()["error"]["code"] == "CONFLICT"
        deleted = client.delete(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers)
        assert deleted.status_code == 409, deleted.text
        assert deleted.json()["error"]["code"] == "CONFLICT"
        assert status_of(client, tenant, endpoint_id) == 200
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Operation)) == 1

    # Once the operation ends, the old endpoint is an ordinary one again.
    client.post(f"/v1/operations/{operation['id']}/cancel", headers=tenant.headers)
    assert wait_for(client, tenant, operation["id"], finished)["state"] == "canceled"
    assert client.delete(f"/v1/webhooks/{old['id']}", headers=tenant.headers).status_code == 204


# --- invariant 4 under duplicated messages ------------------------------------------------------


@pytest.mark.parametrize("outcome", ["succeeded", "rolled_back"])
def test_every_advance_delivered_twice_ends_the_same(
    client, database, workers, tenant, old, demo_receiver, outcome
):
    """A duplicate ``operation.advance`` at each observed change: the same end, one new endpoint."""
    operation = migrate(client, tenant, old["id"])
    op_id = operation["id"]
    duplicates = 0
    acted = False

    def duplicate(body: dict[str, Any]) -> None:
        nonlocal duplicates, acted
        send(TaskName.OPERATION_ADVANCE, op_id)
        duplicates += 1
        if not acted and body["state"] == "awaiting_receiver" and body["steps"][2]["attempts"]:
            acted = True  # the receiver has refused at least twice: now let it end
            if outcome == "succeeded":
                demo_receiver.add_secret(operation["secret"])
            else:
                move_deadline(database, op_id, 1.5)

    duplicate(operation)
    done = wait_for(client, tenant, op_id, finished, on_change=duplicate)
    for _ in range(3):  # and a few more once it has ended
        send(TaskName.OPERATION_ADVANCE, op_id)
    time.sleep(0.5)

    assert duplicates >= 3, duplicates
    assert done["state"] == outcome, done
    assert get_operation(client, tenant, op_id) == done  # the late duplicates changed nothing
    rows = endpoint_rows(database, tenant.org_id)
    assert len(rows) == 2  # the old one and exactly one new one
    live = [str(row.id) for row in rows if row.deleted_at is None]
    expected = done["new_endpoint_id"] if outcome == "succeeded" else old["id"]
    assert live == [expected]
    assert {str(row.id) for row in rows} == {old["id"], done["new_endpoint_id"]}
    assert probe_count(database, tenant.org_id) == 1
    if outcome == "succeeded":
        assert step_states(done) == ["succeeded"] * 4
    else:
        assert done["error"]["code"] == "DEADLINE_EXCEEDED"
        assert step_states(done) == ["succeeded", "succeeded", "failed", "skipped"]


# --- watching ------------------------------------------------------------------------------------


def test_events_stream_follows_the_operation_until_it_ends(
    app, client, database, workers, tenant, old, demo_receiver
):
    operation = migrate(client, tenant, old["id"])
    path = f"/v1/operations/{operation['id']}/events"
    chunks: list[str] = []
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            with (
                TestClient(app, raise_server_exceptions=False) as own,
                own.stream("GET", path, headers=tenant.headers) as stream,
            ):
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                chunks.extend(stream.iter_text())
        except BaseException as exc:
            failure.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for(client, tenant, operation["id"], in_state("awaiting_receiver"))
    time.sleep(0.6)  # at least one poll of the stream while waiting
    demo_receiver.add_secret(operation["secret"])
    watcher.join(timeout=20)
    assert not watcher.is_alive(), "the stream did not end with the operation"
    assert failure == []

    text = "".join(chunks)
    frames = [block for block in text.split("\n\n") if block.strip()]
    events: list[dict[str, Any]] = []
    for block in frames:
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if not lines:
            continue  # a keep-alive comment
        fields = dict(line.split(": ", 1) for line in lines)
        assert fields["event"] == "operation"
        assert fields["id"] == str(len(events) + 1)
        events.append(json.loads(fields["data"]))
    assert len(events) >= 3
    assert all(set(event) == OPERATION_FIELDS for event in events)
    assert all(event["id"] == operation["id"] for event in events)
    assert operation["secret"] not in text
    states = [event["state"] for event in events]
    assert "awaiting_receiver" in states
    assert states[-1] == "succeeded"
    assert [STATE_ORDER[s] for s in states] == sorted(STATE_ORDER[s] for s in states)
    assert all(earlier != later for earlier, later in zip(events, events[1:], strict=False))
    assert [e["updated_at"] for e in events] == sorted(e["updated_at"] for e in events)
    assert events[-1] == get_operation(client, tenant, operation["id"])
    assert all(event["finished_at"] is None for event in events[:-1])
