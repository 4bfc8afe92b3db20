"""The organization secret and its grace window (docs/architecture.md, invariant 5)."""

import base64
import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from models import clock, org_secret
from models.attempts import claim
from models.delivery import publish
from models.endpoint import create_endpoint
from models.org_secret import OrgSecret, SecretState
from models.policy import create_policy
from models.policy_runs import run_due
from receiver import BadSignature, MissingHeaders, verify
from tests.factories import add_key, make_tenant
from tests.support import published_tasks
from workers.operations import advance

ROTATE = "/v1/webhook-secret/rotate"


def _rotate(client, tenant):
    response = client.post(ROTATE, headers=tenant.headers)
    assert response.status_code == 200, response.text
    return response.json()


def _rows(database, org_id):
    with database.session() as session:
        return session.scalars(
            select(OrgSecret).where(OrgSecret.org_id == org_id).order_by(OrgSecret.created_at)
        ).all()


def _signed_delivery(database, tenant):
    """Publish an event to a fresh endpoint and return the headers and body it would send."""
    with database.session() as session:
        create_endpoint(session, tenant.org_id, url="https://r.example/h", events=["brand.vetted"])
        _, deliveries = publish(session, tenant.org_id, "brand.vetted", {"n": 1})
        delivery = deliveries[-1]
    with database.session() as session:
        plan = claim(session, delivery.id)
    assert plan is not None
    return plan.headers, plan.body


def test_rotate_returns_the_secret_once_with_the_window(client, database, settings):
    tenant = make_tenant(database)
    body = _rotate(client, tenant)
    assert set(body) == {"webhook_secret", "rotated_at", "previous_valid_until"}
    assert len(base64.b64decode(body["webhook_secret"], validate=True)) == 32
    assert body["rotated_at"].endswith("Z")
    assert body["previous_valid_until"].endswith("Z")
    rotated = datetime.fromisoformat(body["rotated_at"].replace("Z", "+00:00"))
    until = datetime.fromisoformat(body["previous_valid_until"].replace("Z", "+00:00"))
    assert until - rotated == timedelta(seconds=settings.org_secret_grace_seconds)
    # Stored encrypted: neither the base64 nor the raw bytes are in the row.
    with database.engine.connect() as connection:
        (blob,) = connection.execute(text("SELECT secret_ciphertext FROM org_secrets")).one()
    assert base64.b64decode(body["webhook_secret"]) not in bytes(blob)
    assert body["webhook_secret"].encode() not in bytes(blob)


def test_scopes_and_auth(client, database):
    tenant = make_tenant(database)
    reader = add_key(database, tenant, ["webhooks:read", "webhooks:write", "events:write"])
    forbidden = client.post(ROTATE, headers=reader.headers)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "FORBIDDEN"
    assert client.post(ROTATE).status_code == 401
    assert _rows(database, tenant.org_id) == []


def test_no_org_secret_means_no_org_signature_header(database):
    tenant = make_tenant(database)
    headers, _ = _signed_delivery(database, tenant)
    assert "X-AmCore-Org-Signature" not in headers


def test_during_the_window_both_secrets_sign_and_after_it_only_the_new(client, database):
    tenant = make_tenant(database)
    old = _rotate(client, tenant)["webhook_secret"]
    new = _rotate(client, tenant)["webhook_secret"]

    headers, body = _signed_delivery(database, tenant)
    assert verify(headers, body, [old], scheme="org").secret_index == 0
    assert verify(headers, body, [new], scheme="org").secret_index == 0
    assert headers["X-AmCore-Org-Signature"].count("v1=") == 2

    # Nobody expired the row (no worker, no beat): the window still closes on time.
    clock.travel(timedelta(seconds=301))
    headers, body = _signed_delivery(database, tenant)
    verify(headers, body, [new], scheme="org", now=clock.now().timestamp())
    with pytest.raises(BadSignature):
        verify(headers, body, [old], scheme="org", now=clock.now().timestamp())
    assert headers["X-AmCore-Org-Signature"].count("v1=") == 1
    states = [row.state for row in _rows(database, tenant.org_id)]
    assert states == [SecretState.PREVIOUS, SecretState.CURRENT]  # untidy, yet never signing


def test_rotating_inside_the_window_expires_the_older_previous_at_once(client, database):
    tenant = make_tenant(database)
    first = _rotate(client, tenant)["webhook_secret"]
    second = _rotate(client, tenant)["webhook_secret"]
    third = _rotate(client, tenant)["webhook_secret"]
    rows = _rows(database, tenant.org_id)
    assert [row.state for row in rows] == ["expired", "previous", "current"]
    assert rows[0].expired_by == "rotation"
    headers, body = _signed_delivery(database, tenant)
    verify(headers, body, [second], scheme="org")
    verify(headers, body, [third], scheme="org")
    with pytest.raises(BadSignature):
        verify(headers, body, [first], scheme="org")


def test_expiry_task_and_sweeper_are_idempotent_and_never_early(client, database):
    tenant = make_tenant(database)
    _rotate(client, tenant)
    _rotate(client, tenant)
    previous = _rows(database, tenant.org_id)[0]
    with database.session() as session:
        assert org_secret.expire_one(session, previous.id) is False  # still inside the window
        assert org_secret.sweep(session) == []
    assert _rows(database, tenant.org_id)[0].state == SecretState.PREVIOUS

    clock.travel(timedelta(seconds=310))
    with database.session() as session:
        lags = org_secret.sweep(session)
    assert len(lags) == 1
    assert 9 <= lags[0] <= 12
    expired = _rows(database, tenant.org_id)[0]
    assert (expired.state, expired.expired_by) == ("expired", "sweeper")
    assert expired.expiry_lag_seconds == pytest.approx(lags[0])
    # The ETA task arriving after the sweeper, twice, and the sweeper again: nothing changes.
    with database.session() as session:
        assert org_secret.expire_one(session, previous.id) is False
        assert org_secret.expire_one(session, previous.id) is False
        assert org_secret.sweep(session) == []
    again = _rows(database, tenant.org_id)[0]
    assert (again.state, again.expired_at) == (expired.state, expired.expired_at)


def test_expiry_task_first_then_duplicate(client, database):
    tenant = make_tenant(database)
    _rotate(client, tenant)
    _rotate(client, tenant)
    previous = _rows(database, tenant.org_id)[0]
    clock.travel(timedelta(seconds=302))
    with database.session() as session:
        assert org_secret.expire_one(session, previous.id) is True
    with database.session() as session:
        assert org_secret.expire_one(session, previous.id) is False
        assert org_secret.sweep(session) == []
    assert _rows(database, tenant.org_id)[0].expired_by == "task"


def test_the_database_refuses_a_second_current_or_previous(client, database):
    tenant = make_tenant(database)
    _rotate(client, tenant)
    _rotate(client, tenant)
    for state in ("current", "previous"):
        with database.session() as session:
            row = session.scalars(select(OrgSecret).where(OrgSecret.state == state)).one()
            session.add(
                OrgSecret(
                    org_id=tenant.org_id,
                    state=state,
                    secret_ciphertext=row.secret_ciphertext,
                    created_at=clock.now(),
                )
            )
            with pytest.raises(IntegrityError):
                session.flush()
            session.rollback()


def test_concurrent_rotations_never_leave_two_current_or_two_previous(database):
    tenant = make_tenant(database)
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def rotate_once() -> None:
        barrier.wait()
        try:
            with database.session() as session:
                org_secret.rotate(session, tenant.org_id)
            outcomes.append("ok")
        except IntegrityError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=rotate_once) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 6
    assert "ok" in outcomes
    states = [row.state for row in _rows(database, tenant.org_id)]
    assert states.count("current") == 1
    assert states.count("previous") == 1
    assert len(states) == outcomes.count("ok")


def test_a_missing_org_signature_is_a_verification_error_for_org_receivers(database):
    tenant = make_tenant(database)
    headers, body = _signed_delivery(database, tenant)
    with pytest.raises(MissingHeaders):
        verify(headers, body, [base64.b64encode(bytes(32)).decode()], scheme="org")


def _ciphertexts(database, org_id):
    """Each org secret row's state and whether it still holds a ciphertext, oldest first."""
    with database.engine.connect() as connection:
        rows = connection.execute(
            select(OrgSecret.state, OrgSecret.secret_ciphertext)
            .where(OrgSecret.org_id == org_id)
            .order_by(OrgSecret.created_at)
        ).all()
    return [(state, blob is not None) for state, blob in rows]


@pytest.mark.parametrize("expired_by", ["task", "sweeper"])
def test_an_org_secret_loses_its_ciphertext_when_it_expires_after_its_grace(
    client, database, expired_by
):
    tenant = make_tenant(database)
    _rotate(client, tenant)
    _rotate(client, tenant)
    previous = _rows(database, tenant.org_id)[0]
    assert _ciphertexts(database, tenant.org_id) == [("previous", True), ("current", True)]
    clock.travel(timedelta(seconds=301))
    with database.session() as session:
        if expired_by == "task":
            assert org_secret.expire_one(session, previous.id) is True
        else:
            assert len(org_secret.sweep(session)) == 1
    assert _ciphertexts(database, tenant.org_id) == [("expired", False), ("current", True)]
    assert _rows(database, tenant.org_id)[0].expired_by == expired_by
    # The current one still signs, alone.
    headers, body = _signed_delivery(database, tenant)
    assert headers["X-AmCore-Org-Signature"].count("v1=") == 1


def test_an_org_secret_cut_short_by_the_next_rotation_loses_its_ciphertext(client, database):
    tenant = make_tenant(database)
    for _ in range(3):
        _rotate(client, tenant)
    assert _ciphertexts(database, tenant.org_id) == [
        ("expired", False),
        ("previous", True),
        ("current", True),
    ]


def test_a_scheduled_rotation_expires_the_previous_secret_as_the_api_does(client, database):
    """Both ways of rotating the organization secret ask for the previous secret's expiry
    just after its grace window (workers/org_secrets.py, ``expire_later``)."""
    tenant = make_tenant(database)
    assert client.post("/v1/webhook-secret/rotate", headers=tenant.headers).status_code == 200
    with published_tasks() as by_api:
        assert client.post("/v1/webhook-secret/rotate", headers=tenant.headers).status_code == 200
    with database.session() as session:
        policy = create_policy(
            session,
            tenant.org_id,
            target="org_secret",
            interval_seconds=86_400,
            next_run_at=clock.now(),
        )
        assert policy.id is not None
        runs = run_due(session)
        current = session.scalars(
            select(OrgSecret.id).where(
                OrgSecret.org_id == tenant.org_id, OrgSecret.state == SecretState.CURRENT
            )
        ).one()
    assert runs[0].operation_id is not None
    with published_tasks() as by_policy:
        advance(database, runs[0].operation_id)

    for published, previous in ((by_api, None), (by_policy, current)):
        expiries = [(args, eta) for name, args, eta in published if name == "org_secret.expire"]
        assert len(expiries) == 1, published
        assert expiries[0][1] is not None  # counted down, not sent at once
        if previous is not None:
            assert expiries[0][0] == [str(previous)]
