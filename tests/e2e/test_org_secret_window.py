"""The org secret's grace window in real time, on a real worker and beat (grace shortened)."""

import time

import pytest
from celery.signals import before_task_publish
from sqlalchemy import select

from models.org_secret import OrgSecret
from receiver import BadSignature, verify
from tests.factories import make_tenant
from tests.receivers import scripted_receiver

pytestmark = pytest.mark.e2e

GRACE_S = 2
E2E_OVERRIDES = {"org_secret_grace_seconds": GRACE_S}


def _publish(client, tenant):
    response = client.post(
        "/v1/events", json={"type": "brand.vetted", "data": {"n": 1}}, headers=tenant.headers
    )
    assert response.status_code == 202, response.text


def _states(database, org_id):
    with database.session() as session:
        rows = session.scalars(
            select(OrgSecret).where(OrgSecret.org_id == org_id).order_by(OrgSecret.created_at)
        ).all()
    return [(row.state, row.expired_by, row.expiry_lag_seconds) for row in rows]


def test_window_closes_on_time_and_the_row_is_tidied(local_client, database, workers, caplog):
    # In this process: the test reads the task messages the API publishes, and its log records.
    client = local_client
    published: list[str] = []

    def capture(body=None, headers=None, **_):
        published.append(repr(body) + repr(headers))

    before_task_publish.connect(capture, weak=False)
    caplog.set_level("DEBUG")
    tenant = make_tenant(database)
    try:
        with scripted_receiver() as receiver:
            endpoint = client.post(
                "/v1/webhooks",
                json={"url": receiver.url, "events": ["brand.vetted"]},
                headers=tenant.headers,
            ).json()
            old = client.post("/v1/webhook-secret/rotate", headers=tenant.headers).json()
            new = client.post("/v1/webhook-secret/rotate", headers=tenant.headers).json()
            rotated_at = time.time()
            _publish(client, tenant)
            (inside,) = receiver.wait_for(1)
            verify(inside.headers, inside.body, [old["webhook_secret"]], scheme="org")
            verify(inside.headers, inside.body, [new["webhook_secret"]], scheme="org")

            time.sleep(max(0.0, rotated_at + GRACE_S + 0.2 - time.time()))
            _publish(client, tenant)
            _, after = receiver.wait_for(2)
        verify(after.headers, after.body, [new["webhook_secret"]], scheme="org")
        with pytest.raises(BadSignature):
            verify(after.headers, after.body, [old["webhook_secret"]], scheme="org")

        # The ETA task (or the sweeper, whichever runs first) marks the row within a sweep.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = _states(database, tenant.org_id)
            if states[0][0] == "expired":
                break
            time.sleep(0.2)
        assert [s[0] for s in states] == ["expired", "current"]
        assert states[0][1] in ("task", "sweeper")
        assert states[0][2] >= 0
    finally:
        before_task_publish.disconnect(capture)

    secrets = [old["webhook_secret"], new["webhook_secret"], endpoint["secret"]]
    assert published, "no task message was captured"
    for secret in secrets:
        assert all(secret not in message for message in published)
        assert secret not in caplog.text
    for proc_log in workers.logs:
        text = proc_log.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text
