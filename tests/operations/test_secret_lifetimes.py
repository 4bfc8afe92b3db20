"""How long an operation keeps its copy of the new secret (docs/api.md, Secrets' lifetimes).

An operation keeps the new secret encrypted for its workers (they create the new endpoint with
it) and, for scheduled runs nobody's response showed it to, for reveal-secret. The copy goes
once it is revealed (or the operation ends, if the reveal came first), once the operation
ends without success, and once what it rotated is deleted or rotated again. Each test reads
the raw row: a wiped copy is NULL in the database, not merely hidden.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from models import clock
from models import migration as migrations
from models import operation as operations
from models.endpoint import WebhookEndpoint, create_endpoint, signing_key
from models.operation import Operation, OperationKind, OperationState, Trigger
from models.org import ALL_SCOPES
from models.policy import create_policy
from models.policy_runs import run_due
from tests.api.helpers import assert_error
from tests.factories import Tenant, make_tenant
from tests.receivers import ScriptedReceiver, scripted_receiver
from tests.support import overridden
from workers.operations import advance


@pytest.fixture
def tenant(database) -> Tenant:
    return make_tenant(database)


@pytest.fixture
def receiver(settings) -> Iterator[ScriptedReceiver]:
    """A loopback receiver that accepts every test delivery."""
    with (
        overridden(settings, allow_insecure_urls=True, delivery_timeout_seconds=3.0),
        scripted_receiver(200) as accepting,
    ):
        yield accepting


def add_endpoint(database, tenant: Tenant, url: str) -> uuid.UUID:
    with database.session() as session:
        return create_endpoint(session, tenant.org_id, url=url, events=["brand.vetted"]).endpoint.id


def scheduled_migrate(database, tenant: Tenant, source_id: uuid.UUID, **kwargs) -> uuid.UUID:
    """A migration as a policy's run starts it: nobody has seen its secret."""
    with database.session() as session:
        return migrations.start_migration(
            session,
            tenant.org_id,
            source_id,
            kind=OperationKind.SCHEDULED_ROTATION,
            trigger=Trigger.SCHEDULE,
            reveal=False,
            **kwargs,
        ).operation.id


def scheduled_rotation(database, tenant: Tenant, endpoint_id: uuid.UUID | None) -> uuid.UUID:
    """A scheduled immediate rotation (``None``: of the organization's secret), run once."""
    with database.session() as session:
        operation_id = migrations.start_rotation(
            session, tenant.org_id, endpoint_id, policy_id=None, scheduled_for=None
        ).id
    advance(database, operation_id)
    assert load(database, operation_id).state == OperationState.SUCCEEDED
    return operation_id


def load(database, operation_id: uuid.UUID) -> Operation:
    with database.session() as session:
        operation = session.get(Operation, operation_id)
        assert operation is not None
        return operation


def kept(database, operation_id: uuid.UUID) -> bool:
    """Whether the operation's row still holds a ciphertext of a new secret."""
    with database.engine.connect() as connection:
        blob = connection.execute(
            select(Operation.new_secret_ciphertext).where(Operation.id == operation_id)
        ).scalar_one()
    return blob is not None


def run_to_the_end(database, operation_id: uuid.UUID) -> Operation:
    for _ in range(4):
        advance(database, operation_id)
        operation = load(database, operation_id)
        if operation.finished:
            return operation
    raise AssertionError(f"operation {operation_id} did not finish")


def reveal(client, tenant: Tenant, operation_id: uuid.UUID):
    return client.post(f"/v1/operations/{operation_id}/reveal-secret", headers=tenant.headers)


def live_key(database, endpoint_id: uuid.UUID | None) -> bytes:
    assert endpoint_id is not None
    with database.session() as session:
        row = session.get(WebhookEndpoint, endpoint_id)
        assert row is not None
        return signing_key(session, row)


# --- migrations ------------------------------------------------------------------------------


def test_a_migration_started_through_the_api_drops_its_copy_when_it_ends(
    database, tenant, receiver
):
    """Its secret was in the 202: once the workers have made the new endpoint, nothing else
    needs the copy."""
    source_id = add_endpoint(database, tenant, receiver.url)
    with database.session() as session:
        operation_id = migrations.start_migration(session, tenant.org_id, source_id).operation.id
    advance(database, operation_id)  # create_endpoint
    assert kept(database, operation_id)  # still running: the workers may need it
    assert run_to_the_end(database, operation_id).state == OperationState.SUCCEEDED
    assert not kept(database, operation_id)


@pytest.mark.parametrize("way_out", ["cancel", "deadline"])
def test_a_migration_that_does_not_succeed_drops_its_copy(database, tenant, receiver, way_out):
    """Its new endpoint is deleted: the secret would sign nothing, so even unrevealed it goes."""
    source_id = add_endpoint(database, tenant, receiver.url)
    operation_id = scheduled_migrate(database, tenant, source_id, deadline_seconds=60)
    advance(database, operation_id)  # create_endpoint
    if way_out == "cancel":
        with database.session() as session:
            operations.request_cancel(session, tenant.org_id, operation_id, scopes=ALL_SCOPES)
    else:
        clock.travel(timedelta(seconds=61))
    advance(database, operation_id)
    operation = load(database, operation_id)
    assert operation.finished
    assert operation.state != OperationState.SUCCEEDED
    assert not kept(database, operation_id)


def test_an_unrevealed_scheduled_migration_keeps_its_copy_until_the_one_reveal(
    client, database, tenant, receiver
):
    source_id = add_endpoint(database, tenant, receiver.url)
    operation_id = scheduled_migrate(database, tenant, source_id)
    operation = run_to_the_end(database, operation_id)
    assert operation.state == OperationState.SUCCEEDED
    assert kept(database, operation_id)  # reveal-secret is its only way out

    revealed = reveal(client, tenant, operation_id)
    assert revealed.status_code == 200, revealed.text
    assert base64.b64decode(revealed.json()["secret"]) == live_key(
        database, operation.new_endpoint_id
    )
    assert not kept(database, operation_id)
    error = assert_error(reveal(client, tenant, operation_id), 409, "CONFLICT")
    assert "already revealed" in error["message"]


def test_a_reveal_before_the_migration_ran_keeps_the_copy_for_the_workers_until_it_ends(
    client, database, tenant, receiver
):
    source_id = add_endpoint(database, tenant, receiver.url)
    operation_id = scheduled_migrate(database, tenant, source_id)
    revealed = reveal(client, tenant, operation_id)
    assert revealed.status_code == 200, revealed.text
    assert kept(database, operation_id)  # create_endpoint has yet to use it

    operation = run_to_the_end(database, operation_id)

    assert operation.state == OperationState.SUCCEEDED
    assert base64.b64decode(revealed.json()["secret"]) == live_key(
        database, operation.new_endpoint_id
    )
    assert not kept(database, operation_id)


@pytest.mark.parametrize("change", ["delete", "rotate-secret", "migrate"])
def test_an_unrevealed_copy_goes_once_its_endpoint_is_deleted_or_rotated_again(
    client, database, tenant, receiver, change
):
    source_id = add_endpoint(database, tenant, receiver.url)
    operation_id = scheduled_migrate(database, tenant, source_id)
    new_id = run_to_the_end(database, operation_id).new_endpoint_id
    assert new_id is not None
    assert kept(database, operation_id)

    if change == "delete":
        response = client.delete(f"/v1/webhooks/{new_id}", headers=tenant.headers)
        assert response.status_code == 204, response.text
    elif change == "rotate-secret":
        response = client.post(f"/v1/webhooks/{new_id}/rotate-secret", headers=tenant.headers)
        assert response.status_code == 200, response.text
    else:  # a safe migrate of the new endpoint deletes it once it succeeds
        response = client.post(f"/v1/webhooks/{new_id}/migrate", headers=tenant.headers)
        assert response.status_code == 202, response.text
        again = uuid.UUID(response.json()["id"])
        assert run_to_the_end(database, again).state == OperationState.SUCCEEDED
        assert not kept(database, again)

    assert not kept(database, operation_id)
    error = assert_error(reveal(client, tenant, operation_id), 409, "CONFLICT")
    assert "no longer holds a secret" in error["message"]


def test_another_endpoints_change_leaves_the_copy_alone(client, database, tenant, receiver):
    """Only the endpoint whose secret the copy is counts: not the migrated-away source, not
    another endpoint of the organization."""
    source_id = add_endpoint(database, tenant, receiver.url)
    bystander = add_endpoint(database, tenant, receiver.url)
    operation_id = scheduled_migrate(database, tenant, source_id)
    run_to_the_end(database, operation_id)  # its source is deleted on the way: still kept
    assert kept(database, operation_id)
    rotated = client.post(f"/v1/webhooks/{bystander}/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    assert client.delete(f"/v1/webhooks/{bystander}", headers=tenant.headers).status_code == 204
    assert kept(database, operation_id)
    assert reveal(client, tenant, operation_id).status_code == 200


# --- scheduled immediate rotations -----------------------------------------------------------


def test_a_scheduled_rotate_keeps_its_copy_until_revealed_or_rotated_again(
    client, database, tenant
):
    endpoint_id = add_endpoint(database, tenant, "https://hooks.example.com/r")
    first = scheduled_rotation(database, tenant, endpoint_id)
    assert kept(database, first)  # it finished at once: reveal is its only way out

    second = scheduled_rotation(database, tenant, endpoint_id)  # the next run rotates again
    assert not kept(database, first)
    assert kept(database, second)
    assert_error(reveal(client, tenant, first), 409, "CONFLICT")

    rotated = client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    assert not kept(database, second)

    third = scheduled_rotation(database, tenant, endpoint_id)
    revealed = reveal(client, tenant, third)
    assert revealed.status_code == 200, revealed.text
    assert base64.b64decode(revealed.json()["secret"]) == live_key(database, endpoint_id)
    assert not kept(database, third)


def test_a_scheduled_rotate_policy_run_drops_the_previous_runs_copy(database, tenant):
    """Through the policy tick, as beat runs it."""
    endpoint_id = add_endpoint(database, tenant, "https://hooks.example.com/r")
    with database.session() as session:
        create_policy(
            session,
            tenant.org_id,
            target="endpoint",
            endpoint_id=endpoint_id,
            strategy="rotate",
            interval_seconds=3600,
            next_run_at=clock.now() - timedelta(seconds=1),
        )
    runs = []
    for _ in range(2):
        with database.session() as session:
            (run,) = run_due(session)
        assert run.operation_id is not None
        advance(database, run.operation_id)
        runs.append(run.operation_id)
        clock.travel(timedelta(hours=1, seconds=1))
    assert [kept(database, run) for run in runs] == [False, True]


def test_an_org_secret_rotation_keeps_its_copy_until_the_org_secret_rotates_again(
    client, database, tenant
):
    admin = tenant  # the tenant's key holds every scope
    first = scheduled_rotation(database, tenant, None)
    assert kept(database, first)
    second = scheduled_rotation(database, tenant, None)
    assert not kept(database, first)
    assert kept(database, second)

    rotated = client.post("/v1/webhook-secret/rotate", headers=admin.headers)
    assert rotated.status_code == 200, rotated.text
    assert not kept(database, second)
    assert_error(reveal(client, admin, second), 409, "CONFLICT")

    third = scheduled_rotation(database, tenant, None)
    assert reveal(client, admin, third).status_code == 200
    assert not kept(database, third)
