"""Bulk migrate (``POST /v1/webhooks/migrate``): one operation, a safe-migrate child per endpoint,
at most ``max_concurrency`` children active at once (docs/architecture.md, "Bulk migrate").

The children are driven with ``workers.operations.advance`` one call at a time, as in
test_advance.py: no Celery worker runs, so each test decides when each child moves, including
stray, duplicated and replayed calls, and checks the cap after every one of them.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from models import bulk, clock
from models.endpoint import WebhookEndpoint, create_endpoint, update_endpoint
from models.operation import Operation, OperationState
from tests.factories import Tenant, make_tenant
from tests.receivers import scripted_receiver
from tests.support import overridden
from workers.operations import advance


def add_endpoints(database, tenant: Tenant, url: str, count: int, events=("brand.vetted",)):
    with database.session() as session:
        return [
            create_endpoint(session, tenant.org_id, url=url, events=list(events)).endpoint.id
            for _ in range(count)
        ]


def bulk_migrate(client, tenant: Tenant, body: dict[str, Any] | None = None, **headers: str):
    return client.post(
        "/v1/webhooks/migrate", json=body or {}, headers={**tenant.headers, **headers}
    )


def children(database, parent_id: uuid.UUID) -> list[Operation]:
    with database.session() as session:
        return list(
            session.scalars(
                select(Operation)
                .where(Operation.parent_id == parent_id)
                .order_by(Operation.created_at, Operation.id)
            )
        )


def active(database, parent_id: uuid.UUID) -> int:
    return sum(
        1
        for child in children(database, parent_id)
        if child.started_at is not None and child.finished_at is None
    )


def parent_of(database, parent_id: uuid.UUID) -> Operation:
    with database.session() as session:
        row = session.get(Operation, parent_id)
        assert row is not None
        return row


def drive(database, parent_id: uuid.UUID, cap: int, *, rounds: int = 40) -> int:
    """Advance every child (started or not: a stray call must not start a waiting one) until
    the parent ends, checking the cap after each call; the most children seen active."""
    seen = 0
    for _ in range(rounds):
        if parent_of(database, parent_id).finished:
            return seen
        for child in children(database, parent_id):
            advance(database, child.id)
            now_active = active(database, parent_id)
            assert now_active <= cap
            seen = max(seen, now_active)
        clock.travel(timedelta(seconds=5))  # past any backoff
    raise AssertionError("the bulk migrate did not end")


def live(database, endpoint_id: uuid.UUID | None) -> bool:
    with database.session() as session:
        row = session.get(WebhookEndpoint, endpoint_id)
        return row is not None and row.deleted_at is None


def operation_count(database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(Operation)) or 0)


# --- the happy path -----------------------------------------------------------------------------


def test_every_active_endpoint_is_migrated_a_few_at_a_time(client, database, tenant, accepting):
    sources = add_endpoints(database, tenant, accepting.url, 5)
    (paused,) = add_endpoints(database, tenant, accepting.url, 1)
    with database.session() as session:
        update_endpoint(session, tenant.org_id, paused, {"active": False})

    response = bulk_migrate(client, tenant, {"max_concurrency": 2})

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["kind"] == "bulk_migrate"
    assert body["state"] == "running"
    assert body["steps"] == []
    assert body["deadline_at"] is None
    assert body["parent_id"] is None
    assert body["source_endpoint_id"] is None
    assert body["new_endpoint_id"] is None
    assert body["children"]["total"] == 5
    assert body["children"]["pending"] == 5
    shown = {item["source_endpoint_id"]: item["secret"] for item in body["secrets"]}
    assert set(shown) == {str(source) for source in sources}  # the paused one is not selected
    assert len(set(shown.values())) == 5
    parent_id = uuid.UUID(body["id"])
    assert active(database, parent_id) == 2
    waiting = [child for child in children(database, parent_id) if child.started_at is None]
    assert len(waiting) == 3
    assert all(child.deadline_at is None for child in waiting)

    assert drive(database, parent_id, cap=2) == 2

    done = client.get(f"/v1/operations/{parent_id}", headers=tenant.headers).json()
    assert done["state"] == "succeeded"
    assert done["error"] is None
    assert done["children"] == {**dict.fromkeys(done["children"], 0), "total": 5, "succeeded": 5}
    for child in children(database, parent_id):
        assert child.state == OperationState.SUCCEEDED
        assert not live(database, child.source_endpoint_id)
        assert live(database, child.new_endpoint_id)
    assert live(database, paused)


def test_lists_show_the_parent_and_find_its_children(client, database, tenant, accepting):
    sources = add_endpoints(database, tenant, accepting.url, 3)
    parent = bulk_migrate(client, tenant, {"max_concurrency": 1}).json()

    top = client.get("/v1/operations", headers=tenant.headers).json()["data"]
    assert [item["id"] for item in top] == [parent["id"]]
    assert top[0]["children"]["total"] == 3
    kids = client.get(
        "/v1/operations", params={"parent_id": parent["id"]}, headers=tenant.headers
    ).json()["data"]
    assert len(kids) == 3
    assert {item["parent_id"] for item in kids} == {parent["id"]}
    assert {item["kind"] for item in kids} == {"safe_migrate"}
    found = client.get(
        "/v1/operations", params={"endpoint_id": str(sources[0])}, headers=tenant.headers
    ).json()["data"]
    assert [item["parent_id"] for item in found] == [parent["id"]]


# --- selection ----------------------------------------------------------------------------------


def test_dry_run_shows_the_selection_and_starts_nothing(client, database, tenant, accepting):
    vetted = add_endpoints(database, tenant, accepting.url, 2)
    other = add_endpoints(database, tenant, accepting.url, 1, events=("campaign.approved",))
    before = operation_count(database)

    everything = bulk_migrate(client, tenant, {"dry_run": True})
    filtered = bulk_migrate(client, tenant, {"dry_run": True, "events": ["campaign.approved"]})
    named = bulk_migrate(
        client,
        tenant,
        {
            "dry_run": True,
            "endpoint_ids": [str(vetted[1]), str(other[0])],
            "events": ["brand.vetted"],
        },
    )

    assert everything.status_code == 200, everything.text
    assert set(everything.json()["endpoint_ids"]) == {str(item) for item in vetted + other}
    assert filtered.json()["endpoint_ids"] == [str(other[0])]
    assert named.json()["endpoint_ids"] == [str(vetted[1])]  # both filters apply
    assert operation_count(database) == before


def test_a_selection_that_cannot_be_taken_is_refused_and_changes_nothing(
    client, database, tenant, accepting
):
    (free, busy) = add_endpoints(database, tenant, accepting.url, 2)
    stranger = uuid.uuid4()
    single = client.post(f"/v1/webhooks/{busy}/migrate", headers=tenant.headers)
    assert single.status_code == 202
    before = operation_count(database)

    unknown = bulk_migrate(client, tenant, {"endpoint_ids": [str(free), str(stranger)]})
    empty = bulk_migrate(client, tenant, {"events": ["campaign.approved"]})
    conflict = bulk_migrate(client, tenant)
    too_many = bulk_migrate(client, tenant, {"max_concurrency": 51})

    assert unknown.status_code == 422
    assert str(stranger) in unknown.json()["error"]["details"]["endpoint_ids"]
    assert empty.status_code == 422
    assert "endpoint_ids" in empty.json()["error"]["details"]
    assert conflict.status_code == 409
    assert str(busy) in conflict.json()["error"]["details"]["endpoint_id"]
    assert too_many.status_code == 422
    assert operation_count(database) == before


def test_an_endpoint_a_waiting_child_holds_cannot_be_migrated_again(
    client, database, tenant, accepting
):
    sources = add_endpoints(database, tenant, accepting.url, 3)
    assert bulk_migrate(client, tenant, {"max_concurrency": 1}).status_code == 202
    waiting = sources[-1]  # its child has not started

    again = client.post(f"/v1/webhooks/{waiting}/migrate", headers=tenant.headers)
    second = bulk_migrate(client, tenant, {"endpoint_ids": [str(waiting)]})

    assert again.status_code == 409
    assert second.status_code == 409


def test_idempotency_key_returns_the_first_response(client, database, tenant, accepting):
    add_endpoints(database, tenant, accepting.url, 2)
    first = bulk_migrate(client, tenant, {"max_concurrency": 1}, **{"Idempotency-Key": "k-1"})
    again = bulk_migrate(client, tenant, {"max_concurrency": 1}, **{"Idempotency-Key": "k-1"})
    other = bulk_migrate(client, tenant, {"max_concurrency": 2}, **{"Idempotency-Key": "k-1"})

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert other.status_code == 422


def test_in_band_handoff_shows_no_secret_and_each_child_reveals_once(
    client, database, tenant, accepting
):
    add_endpoints(database, tenant, accepting.url, 2)
    body = bulk_migrate(client, tenant, {"handoff": "in_band"}).json()
    assert body["secrets"] == []
    child = children(database, uuid.UUID(body["id"]))[0]
    path = f"/v1/operations/{child.id}/reveal-secret"
    assert client.post(path, headers=tenant.headers).status_code == 200
    assert client.post(path, headers=tenant.headers).status_code == 409


def test_an_organization_at_its_cap_can_migrate_every_endpoint(
    client, database, tenant, accepting, settings
):
    with overridden(settings, endpoint_limit=3):
        add_endpoints(database, tenant, accepting.url, 3)
        parent = bulk_migrate(client, tenant, {"max_concurrency": 3}).json()
        drive(database, uuid.UUID(parent["id"]), cap=3)
        assert parent_of(database, uuid.UUID(parent["id"])).state == OperationState.SUCCEEDED


# --- ending otherwise ---------------------------------------------------------------------------


def test_children_that_roll_back_fail_the_parent_and_keep_their_old_endpoints(
    client, database, tenant, refusing
):
    sources = add_endpoints(database, tenant, refusing.url, 3)
    parent_id = uuid.UUID(
        bulk_migrate(client, tenant, {"max_concurrency": 2, "deadline_seconds": 60}).json()["id"]
    )

    for _ in range(3):  # each pair of children reaches its deadline in turn
        drive_until = clock.now() + timedelta(seconds=70)
        while clock.now() < drive_until and not parent_of(database, parent_id).finished:
            for child in children(database, parent_id):
                advance(database, child.id)
                assert active(database, parent_id) <= 2
            clock.travel(timedelta(seconds=5))

    parent = parent_of(database, parent_id)
    assert parent.state == OperationState.FAILED
    assert parent.error_code == "CHILDREN_FAILED"
    assert {child.state for child in children(database, parent_id)} == {"rolled_back"}
    assert all(live(database, source) for source in sources)


def test_cancel_ends_waiting_children_now_and_started_ones_at_their_next_step(
    client, database, tenant, refusing
):
    sources = add_endpoints(database, tenant, refusing.url, 4)
    parent_id = uuid.UUID(bulk_migrate(client, tenant, {"max_concurrency": 1}).json()["id"])
    (started,) = [child for child in children(database, parent_id) if child.started_at]
    advance(database, started.id)
    advance(database, started.id)  # awaiting its receiver

    canceled = client.post(f"/v1/operations/{parent_id}/cancel", headers=tenant.headers)

    assert canceled.status_code == 202, canceled.text
    assert canceled.json()["state"] == "running"
    assert canceled.json()["children"]["canceled"] == 3
    advance(database, started.id)
    parent = parent_of(database, parent_id)
    assert parent.state == OperationState.CANCELED
    assert {child.state for child in children(database, parent_id)} == {"canceled"}
    assert all(live(database, source) for source in sources)
    assert active(database, parent_id) == 0
    again = client.post(f"/v1/operations/{parent_id}/cancel", headers=tenant.headers)
    assert again.status_code == 409


# --- any interleaving ---------------------------------------------------------------------------

MOVES = st.lists(
    st.tuples(
        st.sampled_from(["advance", "advance", "advance", "replay", "cancel_child", "later"]),
        st.integers(min_value=0, max_value=5),
    ),
    min_size=5,
    max_size=40,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(moves=MOVES, cap=st.integers(min_value=1, max_value=3))
def test_any_interleaving_keeps_the_cap_and_migrates_each_endpoint_once(
    client, database, loopback, moves, cap
):
    """Children advanced in any order, replayed "a child ended" messages, children canceled
    one by one, time moving: never more than ``cap`` active, no endpoint migrated twice, and the
    parent ends in the state its children's outcomes call for."""
    tenant = make_tenant(database)
    with scripted_receiver(200) as receiver:
        sources = add_endpoints(database, tenant, receiver.url, 6)
        parent_id = uuid.UUID(bulk_migrate(client, tenant, {"max_concurrency": cap}).json()["id"])
        for move, index in moves:
            kids = children(database, parent_id)
            child = kids[index % len(kids)]
            if move == "advance":
                advance(database, child.id)
            elif move == "replay":
                with database.session() as session:
                    bulk.child_ended(session, parent_id)
            elif move == "cancel_child" and not child.finished:
                client.post(f"/v1/operations/{child.id}/cancel", headers=tenant.headers)
            else:
                clock.travel(timedelta(seconds=5))
            assert active(database, parent_id) <= cap
        drive(database, parent_id, cap=cap, rounds=60)

    kids = children(database, parent_id)
    assert sorted(str(child.source_endpoint_id) for child in kids) == sorted(map(str, sources))
    with database.session() as session:
        new_endpoints = session.scalars(
            select(WebhookEndpoint.id).where(
                WebhookEndpoint.org_id == tenant.org_id, WebhookEndpoint.deleted_at.is_(None)
            )
        ).all()
    assert len(new_endpoints) == 6  # one live endpoint per source, old or new
    states = {child.state for child in kids}
    parent = parent_of(database, parent_id)
    if states == {"succeeded"}:
        assert parent.state == OperationState.SUCCEEDED
    else:
        assert parent.state == OperationState.FAILED
        assert parent.error_code == "CHILDREN_FAILED"


def _metric(client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_metrics_count_bulk_migrates_started_and_ended(client, database, tenant, refusing):
    add_endpoints(database, tenant, refusing.url, 2)
    started = _metric(client, "rotator_operations_started_total", kind="bulk_migrate")
    canceled = _metric(
        client, "rotator_operations_ended_total", kind="bulk_migrate", state="canceled"
    )

    parent = bulk_migrate(client, tenant, {"max_concurrency": 1}).json()
    client.post(f"/v1/operations/{parent['id']}/cancel", headers=tenant.headers)
    (child,) = [c for c in children(database, uuid.UUID(parent["id"])) if c.started_at]
    advance(database, child.id)

    assert _metric(client, "rotator_operations_started_total", kind="bulk_migrate") == started + 1
    ended = _metric(client, "rotator_operations_ended_total", kind="bulk_migrate", state="canceled")
    assert ended == canceled + 1
