"""No secret in any log record or domain object's repr, across the flows that handle secrets.

Every flow that mints, shows, signs with or hands off a secret runs here through its real code
(the API, ``workers.operations.advance``, ``workers.deliveries``, the policy tick, a demo
receiver on loopback that checks the org signature), with every logger at DEBUG, SQLAlchemy's
included. Then every record (message, arguments, extra fields, exception, the JSON line) and the
reprs of the domain objects are searched for each secret, in base64 and in hex.
"""

from __future__ import annotations

import base64
import io
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from models import clock
from models import endpoint as endpoints
from models import migration as migrations
from models import org_secret as org_secrets
from models.delivery import Delivery
from models.operation import Operation, OperationState
from models.org import issue_key
from models.policy import RotationPolicy, create_policy, update_policy
from models.policy_runs import run_due
from receiver import DemoReceiver, serve
from rotator.logs import JsonFormatter
from tests.factories import make_tenant
from tests.support import overridden
from workers.deliveries import attempt
from workers.operations import advance

LOGGERS = ("", "rotator", "sqlalchemy.engine", "httpx", "httpcore", "celery", "kombu", "uvicorn")


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def recorded() -> Iterator[Recorder]:
    recorder = Recorder()
    saved = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.getLogger().addHandler(recorder)
    try:
        yield recorder
    finally:
        logging.getLogger().removeHandler(recorder)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def forms(secret: str) -> list[str]:
    """The secret as the API shows it (base64) and its raw bytes in hex, both cases."""
    raw = base64.b64decode(secret)
    return [secret, raw.hex(), raw.hex().upper(), base64.urlsafe_b64encode(raw).decode()]


def record_texts(record: logging.LogRecord) -> Iterator[str]:
    yield record.getMessage()
    yield repr(record.args)
    for name, value in record.__dict__.items():
        yield f"{name}={value!r}"
    if record.exc_info:
        yield logging.Formatter().formatException(record.exc_info)
    yield JsonFormatter().format(record)


def assert_nowhere(secrets: dict[str, str], texts: dict[str, str]) -> None:
    leaks = [
        (name, where)
        for name, secret in secrets.items()
        for form in forms(secret)
        for where, text in texts.items()
        if form in text
    ]
    assert not leaks, leaks


def _drive(database, operation_id: uuid.UUID, limit: int = 8) -> Operation:
    for _ in range(limit):
        advance(database, operation_id)
        with database.session() as session:
            operation = session.get(Operation, operation_id)
            assert operation is not None
        if operation.finished:
            return operation
    raise AssertionError(f"operation {operation_id} still {operation.state}")


def _due_now(database, org_id: uuid.UUID, **fields: Any) -> uuid.UUID:
    """A policy due now (or the target's policy, changed and made due), ticked once."""
    due = clock.now() - timedelta(seconds=1)
    with database.session() as session:
        existing = session.scalars(
            select(RotationPolicy).where(
                RotationPolicy.org_id == org_id,
                RotationPolicy.target == fields["target"],
                RotationPolicy.deleted_at.is_(None),
            )
        ).first()
        if existing is None:
            create_policy(session, org_id, interval_seconds=3600, next_run_at=due, **fields)
        else:
            changes = {k: v for k, v in fields.items() if k not in ("target", "endpoint_id")}
            update_policy(session, org_id, existing.id, {**changes, "next_run_at": due})
    with database.session() as session:
        (run,) = run_due(session)
    assert run.operation_id is not None
    return run.operation_id


def test_the_secret_flows_log_no_secret_and_show_none_in_reprs(
    client, database, settings, recorded
):
    secrets: dict[str, str] = {"at-rest key": settings.encryption_keys[0]}
    tenant = make_tenant(database)
    headers = tenant.headers

    def post(path: str, **kwargs: Any) -> dict[str, Any]:
        response = client.post(path, headers=headers, **kwargs)
        assert response.status_code in (200, 201, 202), (path, response.text)
        body: dict[str, Any] = response.json()
        return body

    # The org secret first: from then on every delivery carries the org signature, and the
    # receiver requires it (a handed-off secret is installed only with it).
    secrets["org secret"] = post("/v1/webhook-secret/rotate")["webhook_secret"]
    placeholder = base64.b64encode(b"p" * 32).decode()
    receiver = DemoReceiver([placeholder], org_secrets=[secrets["org secret"]], out=io.StringIO())
    server = serve(receiver, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    try:
        with overridden(settings, allow_insecure_urls=True, delivery_timeout_seconds=5.0):
            # Create an endpoint; a test delivery and an event delivered through the worker code.
            created = post("/v1/webhooks", json={"url": url, "events": ["brand.vetted"]})
            endpoint_id = created["id"]
            secrets["created"] = created["secret"]
            receiver.set_secrets([created["secret"]])
            assert post(f"/v1/webhooks/{endpoint_id}/test")["outcome"] == "success"
            event = post("/v1/events", json={"type": "brand.vetted", "data": {"brand_id": "b1"}})
            with database.session() as session:
                (delivery_id,) = session.scalars(
                    select(Delivery.id).where(Delivery.event_id == event["id"])
                ).all()
            sent = attempt(database, delivery_id)
            assert sent is not None
            assert sent.outcome == "success"

            # Rotate at once.
            secrets["rotated"] = post(f"/v1/webhooks/{endpoint_id}/rotate-secret")["secret"]
            receiver.set_secrets([secrets["rotated"]])

            # Migrate to success through the real advance functions.
            migrate = post(f"/v1/webhooks/{endpoint_id}/migrate")
            secrets["migrated"] = migrate["secret"]
            receiver.add_secret(migrate["secret"])
            migrated = _drive(database, uuid.UUID(migrate["id"]))
            assert migrated.state == OperationState.SUCCEEDED, migrated.error_code
            endpoint_id = str(migrated.new_endpoint_id)

            # A scheduled rotation, its secret revealed once.
            rotation_id = _due_now(
                database,
                tenant.org_id,
                target="endpoint",
                endpoint_id=uuid.UUID(endpoint_id),
                strategy="rotate",
            )
            assert _drive(database, rotation_id).state == OperationState.SUCCEEDED
            secrets["revealed"] = post(f"/v1/operations/{rotation_id}/reveal-secret")["secret"]
            receiver.set_secrets([secrets["revealed"]])

            # A scheduled safe migrate with the in-band handoff, signed by the org as well.
            handoff_id = _due_now(
                database,
                tenant.org_id,
                target="endpoint",
                endpoint_id=uuid.UUID(endpoint_id),
                strategy="safe_migrate",
                handoff="in_band",
            )
            handed = _drive(database, handoff_id)
            assert handed.state == OperationState.SUCCEEDED, handed.error_code
            installed = receiver.secrets()
            assert len(installed) == 2  # the handoff installed the new secret
            secrets["handed off"] = str(installed[0])
            handoff_events = [e for e in receiver.events() if e["type"] == HANDOFF_TYPE]
            assert [e["org_secret_index"] for e in handoff_events] == [0]

            # A scheduled org secret rotation, revealed.
            org_run = _due_now(database, tenant.org_id, target="org_secret")
            assert _drive(database, org_run).state == OperationState.SUCCEEDED
            secrets["org secret (scheduled)"] = post(f"/v1/operations/{org_run}/reveal-secret")[
                "secret"
            ]
    finally:
        server.shutdown()
        server.server_close()

    secrets["api key"] = base64.b64encode(tenant.api_key.encode()).decode()
    texts = {
        f"record {index} ({record.name})": text
        for index, record in enumerate(recorded.records)
        for text in record_texts(record)
    }
    texts.update({"attempt repr": repr(sent), "operation repr": repr(handed)})
    assert any(r.name.startswith("sqlalchemy.engine") for r in recorded.records)
    assert any(r.name.startswith("rotator") for r in recorded.records)
    assert_nowhere(secrets, texts)
    assert not [where for where, text in texts.items() if tenant.api_key in text]


HANDOFF_TYPE = "webhook.secret_handoff"


def test_domain_objects_that_carry_a_secret_do_not_show_it(database, settings):
    tenant = make_tenant(database)
    with database.session() as session:
        created = endpoints.create_endpoint(
            session, tenant.org_id, url="https://hooks.example.com/r", events=["brand.vetted"]
        )
        rotated = endpoints.rotate_secret(session, tenant.org_id, created.endpoint.id)
        started = migrations.start_migration(session, tenant.org_id, created.endpoint.id)
        org_rotation = org_secrets.rotate(session, tenant.org_id)
        issued = issue_key(session, tenant.org_id, [])
    shown = {
        "WithSecret (create)": repr(created),
        "WithSecret (rotate)": repr(rotated),
        "Started": repr(started),
        "Rotation": repr(org_rotation),
        "IssuedKey": repr(issued),
        "Settings": repr(settings),
    }
    assert started.secret is not None
    secrets = {
        "created": created.secret,
        "rotated": rotated.secret,
        "migrated": started.secret,
        "org secret": org_rotation.secret,
        "at-rest key": settings.encryption_keys[0],
        "api key": base64.b64encode(issued.api_key.encode()).decode(),
    }
    assert_nowhere(secrets, shown)
    assert not [name for name, text in shown.items() if issued.api_key in text]
    assert "secret" not in repr(created).split("endpoint=", 1)[0]  # the id fields stay


def test_a_failed_statement_shows_neither_its_parameters_in_the_error_nor_in_the_log(
    database, recorded
):
    secret = base64.b64encode(b"s" * 32).decode()
    with pytest.raises(DBAPIError) as failed, database.session() as session:
        session.execute(
            text("SELECT no_such_column FROM organizations WHERE name = :name"), {"name": secret}
        )
    texts = {"error": str(failed.value), "repr": repr(failed.value)}
    texts.update(
        {f"record {i}": t for i, r in enumerate(recorded.records) for t in record_texts(r)}
    )
    assert_nowhere({"bound value": secret}, texts)
    assert "no_such_column" in str(failed.value)  # the statement itself is still shown
