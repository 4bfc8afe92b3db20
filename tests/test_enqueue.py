"""Invariant 2 (docs/architecture.md): a message is published only after the commit that made
its work visible, and dropped when the transaction rolls back. Messages carry ids only."""

import uuid

import pytest

from models.org import create_org
from tests.support import published_tasks
from workers.enqueue import send_after_commit
from workers.names import TaskName


@pytest.fixture
def published():
    with published_tasks() as seen:
        yield seen


def sent(published) -> list[tuple[str, list[str]]]:
    """(task name, args) of each message published."""
    return [(name, args) for name, args, _eta in published]


def test_messages_wait_for_the_commit_and_go_out_together(database, published):
    first, second = uuid.uuid4(), uuid.uuid4()
    with database.session() as session:
        create_org(session, "Acme")
        send_after_commit(session, TaskName.DELIVERY_SEND, first)
        send_after_commit(session, TaskName.OPERATION_ADVANCE, second, countdown=5)
        session.flush()
        assert sent(published) == []  # flushed, not committed: nothing may be sent yet
    assert sent(published) == [
        (TaskName.DELIVERY_SEND.value, [str(first)]),
        (TaskName.OPERATION_ADVANCE.value, [str(second)]),
    ]


def test_a_rollback_drops_the_messages(database, published):
    def failing_unit_of_work() -> None:
        with database.session() as session:
            create_org(session, "Acme")
            send_after_commit(session, TaskName.DELIVERY_SEND, uuid.uuid4())
            raise RuntimeError("the unit of work fails")

    with pytest.raises(RuntimeError):
        failing_unit_of_work()
    assert sent(published) == []
    # The next transaction on a fresh session starts with an empty outbox.
    with database.session() as session:
        send_after_commit(session, TaskName.DELIVERY_SEND, "after")
    assert sent(published) == [(TaskName.DELIVERY_SEND.value, ["after"])]


def test_a_failed_request_publishes_nothing(client, database, published):
    from tests.factories import make_tenant

    tenant = make_tenant(database)
    rejected = client.post(
        "/v1/events", json={"type": "not.a.type", "data": {}}, headers=tenant.headers
    )
    assert rejected.status_code == 422
    assert sent(published) == []
