"""Liveness and readiness."""

from models.db import Database, get_database, set_database


def test_healthz_and_readyz_when_everything_answers(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_is_503_in_the_envelope_when_the_database_does_not_answer(client, settings):
    unreachable = Database(
        settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/nowhere"})
    )
    current = get_database()
    set_database(unreachable)
    try:
        response = client.get("/readyz")
    finally:
        set_database(current)
        unreachable.dispose()
    assert response.status_code == 503
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert set(body["error"]["details"]) == {"database"}
    assert client.get("/healthz").status_code == 200  # alive, just not ready
