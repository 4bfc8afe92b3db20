"""Worker and beat stopped across ``valid_until``: nothing signs with the expired secret, and
once they run the row is marked expired within one sweep (docs/architecture.md, invariant 5)."""

import time

import pytest
from sqlalchemy import select

from models.attempts import claim
from models.delivery import publish
from models.endpoint import create_endpoint
from models.org_secret import OrgSecret
from receiver import BadSignature, verify
from tests.factories import make_tenant

pytestmark = pytest.mark.e2e

GRACE_S = 1
E2E_OVERRIDES = {"org_secret_grace_seconds": GRACE_S}


def test_stopped_workers_cannot_extend_the_window(client, database, e2e_settings, request):
    tenant = make_tenant(database)
    old = client.post("/v1/webhook-secret/rotate", headers=tenant.headers).json()
    new = client.post("/v1/webhook-secret/rotate", headers=tenant.headers).json()
    time.sleep(GRACE_S + 0.3)  # no worker, no beat: the row still says "previous"

    with database.session() as session:
        create_endpoint(session, tenant.org_id, url="https://r.example/h", events=["brand.vetted"])
        _, (delivery,) = publish(session, tenant.org_id, "brand.vetted", {"n": 1})
    with database.session() as session:
        plan = claim(session, delivery.id)
        states = [row.state for row in session.scalars(select(OrgSecret))]
    assert sorted(states) == ["current", "previous"]
    assert plan is not None
    assert plan.headers["X-AmCore-Org-Signature"].count("v1=") == 1
    verify(plan.headers, plan.body, [new["webhook_secret"]], scheme="org")
    with pytest.raises(BadSignature):
        verify(plan.headers, plan.body, [old["webhook_secret"]], scheme="org")

    request.getfixturevalue("workers")  # now start the worker and beat
    sweep_period = 30 * e2e_settings.beat_period_scale
    deadline = time.monotonic() + sweep_period + 10  # one sweep, plus start-up
    while time.monotonic() < deadline:
        with database.session() as session:
            previous = session.scalars(
                select(OrgSecret).where(OrgSecret.expired_by.is_not(None))
            ).one_or_none()
        if previous is not None:
            break
        time.sleep(0.2)
    assert previous is not None, "the overdue previous secret was never marked expired"
    assert previous.state == "expired"
    assert previous.expired_by in ("task", "sweeper")
    assert previous.expiry_lag_seconds is not None
    assert previous.expiry_lag_seconds > 0
