import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from models import Base, clock
from models.base import UTCDateTime
from rotator.migrations import downgrade, upgrade


def test_models_and_migrations_agree(database):
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_to_base_and_back(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()


# --- data migrations, on the pass's own backend -------------------------------------------------

SCRATCH_SCHEMA = "migration_scratch"


@pytest.fixture
def scratch_engine(database, tmp_path) -> Iterator[Engine]:
    """An empty database of the pass's backend: a SQLite file, or a PostgreSQL schema of its own
    (dropped afterwards) in the test database."""
    if database.dialect == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'scratch.db'}")
        yield engine
        engine.dispose()
        return
    with database.engine.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {SCRATCH_SCHEMA} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {SCRATCH_SCHEMA}"))
    engine = create_engine(
        database.engine.url, connect_args={"options": f"-csearch_path={SCRATCH_SCHEMA}"}
    )
    try:
        yield engine
    finally:
        engine.dispose()
        with database.engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {SCRATCH_SCHEMA} CASCADE"))


ORGS = sa.table(
    "organizations",
    sa.column("id", sa.Uuid),
    sa.column("name", sa.String),
    sa.column("created_at", UTCDateTime),
)
ENDPOINTS = sa.table(
    "webhook_endpoints",
    sa.column("id", sa.Uuid),
    sa.column("org_id", sa.Uuid),
    sa.column("url", sa.String),
    sa.column("description", sa.String),
    sa.column("events", sa.JSON),
    sa.column("active", sa.Boolean),
    sa.column("api_version", sa.String),
    sa.column("secret_ciphertext", sa.LargeBinary),
    sa.column("created_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
    sa.column("deleted_at", UTCDateTime),
)
ORG_SECRETS = sa.table(
    "org_secrets",
    sa.column("id", sa.Uuid),
    sa.column("org_id", sa.Uuid),
    sa.column("state", sa.String),
    sa.column("secret_ciphertext", sa.LargeBinary),
    sa.column("created_at", UTCDateTime),
)
OPERATIONS = sa.table(
    "operations",
    sa.column("id", sa.Uuid),
    sa.column("org_id", sa.Uuid),
    sa.column("kind", sa.String),
    sa.column("state", sa.String),
    sa.column("trigger", sa.String),
    sa.column("source_endpoint_id", sa.Uuid),
    sa.column("new_endpoint_id", sa.Uuid),
    sa.column("params", sa.JSON),
    sa.column("handoff", sa.String),
    sa.column("new_secret_ciphertext", sa.LargeBinary),
    sa.column("secret_revealed", sa.Boolean),
    sa.column("cancel_requested", sa.Boolean),
    sa.column("wait_seconds", sa.Float),
    sa.column("deadline_at", UTCDateTime),
    sa.column("created_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
    sa.column("finished_at", UTCDateTime),
)


def test_0008_wipes_the_secrets_kept_past_their_use(scratch_engine):
    upgrade(scratch_engine, "0007")
    now = datetime.now(UTC)
    org = uuid.uuid4()
    live, gone = uuid.uuid4(), uuid.uuid4()
    blob = b"\x01sealed"
    expected: dict[uuid.UUID, bool] = {}  # operation -> still holds its copy afterwards

    def operation(kept: bool, **values: Any) -> dict[str, Any]:
        row = {
            "id": uuid.uuid4(),
            "org_id": org,
            "kind": "scheduled_rotation",
            "state": "succeeded",
            "trigger": "schedule",
            "source_endpoint_id": None,
            "new_endpoint_id": live,
            "params": {},
            "handoff": "none",
            "new_secret_ciphertext": blob,
            "secret_revealed": False,
            "cancel_requested": False,
            "wait_seconds": 0.0,
            "deadline_at": now,
            "created_at": now,
            "updated_at": now,
            "finished_at": now,
            **values,
        }
        expected[row["id"]] = kept
        return row

    with scratch_engine.begin() as connection:
        connection.execute(ORGS.insert().values(id=org, name="Acme", created_at=now))
        for endpoint_id, deleted_at in ((live, None), (gone, now)):
            connection.execute(
                ENDPOINTS.insert().values(
                    id=endpoint_id,
                    org_id=org,
                    url="https://hooks.example.com/h",
                    description="",
                    events=["brand.vetted"],
                    active=deleted_at is None,
                    api_version="2026-04-01",
                    secret_ciphertext=blob,
                    created_at=now,
                    updated_at=now,
                    deleted_at=deleted_at,
                )
            )
        connection.execute(
            ORG_SECRETS.insert(),
            [
                {
                    "id": uuid.uuid4(),
                    "org_id": org,
                    "state": state,
                    "secret_ciphertext": blob,
                    "created_at": now,
                }
                for state in ("expired", "previous", "current")
            ],
        )
        connection.execute(
            OPERATIONS.insert(),
            [
                operation(kept=True),  # succeeded, unrevealed, its endpoint live
                operation(kept=False, secret_revealed=True),
                operation(kept=False, state="rolled_back"),
                operation(kept=False, new_endpoint_id=gone),
                operation(kept=True, new_endpoint_id=None, source_endpoint_id=live),
                operation(kept=False, new_endpoint_id=None, source_endpoint_id=gone),
                operation(kept=True, kind="org_secret_rotation", new_endpoint_id=None),
                # Unfinished: its workers still need the copy, revealed or not.
                operation(kept=True, state="running", finished_at=None, secret_revealed=True),
            ],
        )

    upgrade(scratch_engine, "0008")

    with scratch_engine.connect() as connection:
        held = dict(
            connection.execute(
                sa.select(OPERATIONS.c.id, OPERATIONS.c.new_secret_ciphertext.is_not(None))
            ).all()
        )
        secrets = dict(
            connection.execute(
                sa.select(ORG_SECRETS.c.state, ORG_SECRETS.c.secret_ciphertext.is_not(None))
            ).all()
        )
    assert {uuid.UUID(str(key)): bool(value) for key, value in held.items()} == expected
    assert {state: bool(value) for state, value in secrets.items()} == {
        "expired": False,
        "previous": True,
        "current": True,
    }

    downgrade(scratch_engine, "0007")  # the expired row without a ciphertext cannot stay
    with scratch_engine.connect() as connection:
        states = connection.execute(sa.select(ORG_SECRETS.c.state)).scalars().all()
    assert sorted(states) == ["current", "previous"]


IDEMPOTENCY_KEYS = sa.table(
    "idempotency_keys",
    sa.column("id", sa.Uuid),
    sa.column("org_id", sa.Uuid),
    sa.column("key", sa.String),
    sa.column("request_sha256", sa.String),
    sa.column("response_ciphertext", sa.LargeBinary),
    sa.column("created_at", UTCDateTime),
)


def test_0009_keeps_stored_responses_and_binds_them_to_no_key(scratch_engine):
    upgrade(scratch_engine, "0008")
    now = datetime.now(UTC)
    org, row_id = uuid.uuid4(), uuid.uuid4()
    stored = {
        "id": row_id,
        "org_id": org,
        "key": "k-1",
        "request_sha256": "0" * 64,
        "response_ciphertext": b"\x01sealed",
        "created_at": now,
    }
    with scratch_engine.begin() as connection:
        connection.execute(ORGS.insert().values(id=org, name="Acme", created_at=now))
        connection.execute(IDEMPOTENCY_KEYS.insert().values(**stored))

    upgrade(scratch_engine, "0009")
    with scratch_engine.connect() as connection:
        row = connection.execute(text("SELECT * FROM idempotency_keys")).mappings().one()
    assert row["api_key_id"] is None
    assert bytes(row["response_ciphertext"]) == stored["response_ciphertext"]
    assert row["key"] == "k-1"

    downgrade(scratch_engine, "0008")
    with scratch_engine.connect() as connection:
        (count,) = connection.execute(text("SELECT count(*) FROM idempotency_keys")).one()
    assert count == 1
    assert "api_key_id" not in {
        column["name"] for column in inspect(scratch_engine).get_columns("idempotency_keys")
    }


def test_enum_columns_store_their_values_and_refuse_anything_else(database):
    """Kinds, states and targets are enum-typed columns: stored as their values (the strings
    the API shows and the migrations wrote), read back as members, and a string that is not
    one of them never reaches the table."""
    from models.org import create_org
    from models.org_secret import OrgSecret, SecretState

    with database.session() as session:
        org = create_org(session, "Enums")
        row = OrgSecret(org_id=org.id, state=SecretState.CURRENT, created_at=clock.now())
        session.add(row)
        session.flush()
        stored = session.execute(
            sa.select(sa.column("state", sa.String)).select_from(sa.table("org_secrets"))
        ).scalar_one()
        assert stored == "current"  # the value, as a plain string
    with database.session() as session:
        read = session.get(OrgSecret, row.id)
        assert read is not None
        assert read.state is SecretState.CURRENT
    with database.session() as session:
        bad = session.get(OrgSecret, row.id)
        assert bad is not None
        bad.state = "revoked"
        with pytest.raises(sa.exc.StatementError):
            session.flush()
        session.rollback()
