"""GET /v1/webhooks/deliveries[/{id}]: the attempt log, its filters and its pages (docs/api.md)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from models import clock
from tests.api.helpers import assert_error, assert_validation, parse_time
from tests.deliveries.helpers import MISSING_ID, Hook, add_endpoint, delivery, publish
from tests.factories import Tenant, add_key, make_tenant
from tests.receivers import scripted_receiver
from tests.support import overridden
from workers.deliveries import attempt

LOG = "/v1/webhooks/deliveries"
ATTEMPT_FIELDS = {
    "id",
    "endpoint_id",
    "event_id",
    "event_type",
    "url",
    "attempt",
    "outcome",
    "response_status",
    "response_time_ms",
    "request_body_sha256",
    "request_body_bytes",
    "response_body_excerpt",
    "request_headers",
    "error",
    "occurred_at",
}


@dataclass
class Log:
    """Seven attempts of one organization, made at three moments, and one of another org."""

    tenant: Tenant
    other: Tenant
    ok: Hook
    bad: Hook
    mark1: datetime  # between the first and second moments
    mark2: datetime  # between the second and third
    foreign_attempt: str
    foreign_endpoint: uuid.UUID


def _send(database: Any, delivery_id: uuid.UUID) -> None:
    assert attempt(database, delivery_id) is not None


@pytest.fixture
def log(client, database, settings) -> Iterator[Log]:
    tenant = make_tenant(database)
    other = make_tenant(database, name="Other")
    with (
        overridden(
            settings,
            allow_insecure_urls=True,
            delivery_retry_schedule=[5.0, 5.0],
            delivery_retry_jitter=0.0,
        ),
        scripted_receiver() as good,
        scripted_receiver(default_status=500) as failing,
    ):
        ok = add_endpoint(database, tenant.org_id, good.url, ["brand.vetted", "wallet.balance_low"])
        bad = add_endpoint(database, tenant.org_id, failing.url, ["brand.vetted"])
        foreign = add_endpoint(database, other.org_id, good.url)
        # Moment 1: brand.vetted to both: 200 success, 500 retry.
        _, first = publish(database, tenant.org_id, "brand.vetted")
        by_endpoint = {delivery(database, d).endpoint_id: d for d in first}
        for delivery_id in first:
            _send(database, delivery_id)
        _, (foreign_delivery,) = publish(database, other.org_id, "brand.vetted")
        foreign_attempt = attempt(database, foreign_delivery)
        assert foreign_attempt is not None
        clock.travel(timedelta(minutes=30))
        mark1 = clock.now()
        clock.travel(timedelta(minutes=30))
        # Moment 2: wallet.balance_low to ok answered 429 (retry); bad's retry fails again.
        good.answer(429)
        _, (wallet,) = publish(database, tenant.org_id, "wallet.balance_low")
        _send(database, wallet)
        assert attempt(database, by_endpoint[ok.id]) is None  # succeeded already
        _send(database, by_endpoint[bad.id])
        clock.travel(timedelta(minutes=30))
        mark2 = clock.now()
        clock.travel(timedelta(minutes=30))
        # Moment 3: wallet succeeds, bad is dead, and a test delivery to ok succeeds.
        _send(database, wallet)
        _send(database, by_endpoint[bad.id])
        tested = client.post(f"/v1/webhooks/{ok.id}/test", headers=tenant.headers)
        assert tested.json()["outcome"] == "success", tested.text
        yield Log(
            tenant=tenant,
            other=other,
            ok=ok,
            bad=bad,
            mark1=mark1,
            mark2=mark2,
            foreign_attempt=str(foreign_attempt.id),
            foreign_endpoint=foreign.id,
        )


def _list(client: Any, tenant: Tenant, **params: Any) -> dict[str, Any]:
    response = client.get(LOG, params=params, headers=tenant.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"success", "data", "meta"}
    assert body["success"] is True
    return body


def _all(client: Any, tenant: Tenant) -> list[dict[str, Any]]:
    body = _list(client, tenant, limit=200)
    assert body["meta"] == {"limit": 200, "next_cursor": None}
    rows: list[dict[str, Any]] = body["data"]
    return rows


def _ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["id"] for row in rows]


def _key(row: dict[str, Any]) -> tuple[datetime, uuid.UUID]:
    return parse_time(row["occurred_at"]), uuid.UUID(row["id"])


def test_the_log_holds_every_attempt_newest_first(client, log):
    rows = _all(client, log.tenant)
    assert len(rows) == 7
    for row in rows:
        assert set(row) == ATTEMPT_FIELDS
    assert sorted(rows, key=_key, reverse=True) == rows
    summary = sorted(
        (row["event_type"], row["outcome"], row["response_status"], row["attempt"]) for row in rows
    )
    assert summary == [
        ("brand.vetted", "dead", 500, 3),
        ("brand.vetted", "retry", 500, 1),
        ("brand.vetted", "retry", 500, 2),
        ("brand.vetted", "success", 200, 1),
        ("wallet.balance_low", "retry", 429, 1),
        ("wallet.balance_low", "success", 200, 2),
        ("webhook.test", "success", 200, 1),
    ]
    # The newest attempts are the third moment's; the oldest the first's.
    assert {row["event_type"] for row in rows[:3]} == {
        "wallet.balance_low",
        "brand.vetted",
        "webhook.test",
    }
    assert {row["outcome"] for row in rows[-2:]} == {"success", "retry"}


def _filter_cases(log: Log) -> list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool], int]]:
    def at(row: dict[str, Any]) -> datetime:
        return parse_time(row["occurred_at"])

    def status(row: dict[str, Any]) -> int:
        return row["response_status"] if row["response_status"] is not None else -1

    return [
        ({"endpoint_id": str(log.ok.id)}, lambda r: r["endpoint_id"] == str(log.ok.id), 4),
        ({"endpoint_id": str(log.bad.id)}, lambda r: r["endpoint_id"] == str(log.bad.id), 3),
        ({"endpoint_id": MISSING_ID}, lambda r: False, 0),
        ({"event_type": "brand.vetted"}, lambda r: r["event_type"] == "brand.vetted", 4),
        (
            {"event_type": "wallet.balance_low"},
            lambda r: r["event_type"] == "wallet.balance_low",
            2,
        ),
        ({"event_type": "webhook.test"}, lambda r: r["event_type"] == "webhook.test", 1),
        ({"event_type": "lookup.completed"}, lambda r: False, 0),
        ({"outcome": "success"}, lambda r: r["outcome"] == "success", 3),
        ({"outcome": "retry"}, lambda r: r["outcome"] == "retry", 3),
        ({"outcome": "dead"}, lambda r: r["outcome"] == "dead", 1),
        ({"since": log.mark1.isoformat()}, lambda r: at(r) >= log.mark1, 5),
        ({"until": log.mark1.isoformat()}, lambda r: at(r) <= log.mark1, 2),
        (
            {"since": clock.rfc3339(log.mark1), "until": clock.rfc3339(log.mark2)},
            lambda r: log.mark1 <= at(r) <= log.mark2,
            2,
        ),
        ({"since": log.mark2.isoformat()}, lambda r: at(r) >= log.mark2, 3),
        ({"http_status_min": 400}, lambda r: status(r) >= 400, 4),
        ({"http_status_max": 299}, lambda r: 0 <= status(r) <= 299, 3),
        ({"http_status_min": 429, "http_status_max": 429}, lambda r: status(r) == 429, 1),
        ({"http_status_min": 500, "http_status_max": 599}, lambda r: status(r) >= 500, 3),
        (
            {"endpoint_id": str(log.bad.id), "outcome": "retry"},
            lambda r: r["endpoint_id"] == str(log.bad.id) and r["outcome"] == "retry",
            2,
        ),
        (
            {"event_type": "brand.vetted", "http_status_max": 299},
            lambda r: r["event_type"] == "brand.vetted" and 0 <= status(r) <= 299,
            1,
        ),
    ]


def test_every_filter_narrows_to_exactly_the_matching_attempts(client, log):
    everything = _all(client, log.tenant)
    for params, matches, count in _filter_cases(log):
        body = _list(client, log.tenant, **params, limit=200)
        expected = [row for row in everything if matches(row)]
        assert len(expected) == count, (params, expected)
        assert body["data"] == expected, params  # same rows, same (newest first) order
        assert body["meta"]["next_cursor"] is None


def test_filters_apply_across_pages(client, log):
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"endpoint_id": str(log.bad.id), "limit": 1}
        if cursor:
            params["cursor"] = cursor
        body = _list(client, log.tenant, **params)
        pages += 1
        assert all(row["endpoint_id"] == str(log.bad.id) for row in body["data"])
        seen += _ids(body["data"])
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    whole = _list(client, log.tenant, endpoint_id=str(log.bad.id))["data"]
    assert [row["attempt"] for row in whole] == [3, 2, 1]
    assert seen == _ids(whole)
    assert len(seen) == len(set(seen)) == 3


@pytest.mark.parametrize("limit", [1, 2, 3, 6, 7, 50])
def test_cursor_walks_every_attempt_once_newest_first(client, log, limit):
    everything = _ids(_all(client, log.tenant))
    walked: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        body = _list(client, log.tenant, **params)
        pages += 1
        assert body["meta"]["limit"] == limit
        assert len(body["data"]) <= limit
        walked += _ids(body["data"])
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
        assert cursor
        assert len(body["data"]) == limit
    assert walked == everything
    assert len(set(walked)) == 7
    assert pages == -(-7 // limit)


def test_default_limit_is_50(client, log):
    assert _list(client, log.tenant)["meta"] == {"limit": 50, "next_cursor": None}


def test_one_attempt_by_id(client, log):
    rows = _all(client, log.tenant)
    for row in rows:
        response = client.get(f"{LOG}/{row['id']}", headers=log.tenant.headers)
        assert response.status_code == 200, response.text
        assert response.json() == row
    dead = next(row for row in rows if row["outcome"] == "dead")
    assert dead["endpoint_id"] == str(log.bad.id)
    assert dead["url"] == log.bad.url
    assert dead["error"] is None
    assert dead["request_headers"]["X-AmCore-Signature"] == "[redacted]"
    assert len(dead["request_body_sha256"]) == 64
    assert dead["request_body_bytes"] > 0
    assert dead["response_body_excerpt"] == '{"ok": false}'
    assert isinstance(dead["response_time_ms"], int)


def test_organizations_see_only_their_own_attempts(client, log):
    mine = _ids(_all(client, log.tenant))
    theirs = _ids(_all(client, log.other))
    assert theirs == [log.foreign_attempt]
    assert log.foreign_attempt not in mine
    response = client.get(f"{LOG}/{log.foreign_attempt}", headers=log.tenant.headers)
    assert_error(response, 404, "NOT_FOUND", "not found")
    own = client.get(f"{LOG}/{log.foreign_attempt}", headers=log.other.headers)
    assert own.status_code == 200
    # Filtering on another organization's endpoint finds nothing (no error, no leak).
    assert _list(client, log.tenant, endpoint_id=str(log.foreign_endpoint))["data"] == []
    assert_error(client.get(f"{LOG}/{MISSING_ID}", headers=log.tenant.headers), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"event_type": "brand.nope"}, "event_type"),
        ({"event_type": ""}, "event_type"),
        ({"outcome": "abandoned"}, "outcome"),
        ({"outcome": "SUCCESS"}, "outcome"),
        ({"http_status_min": 500, "http_status_max": 400}, "http_status_min"),
        ({"http_status_min": 99}, "http_status_min"),
        ({"http_status_max": 600}, "http_status_max"),
        ({"http_status_min": "abc"}, "http_status_min"),
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"limit": -1}, "limit"),
        ({"since": "2026-01-01T00:00:00"}, "since"),
        ({"until": "2026-01-01T00:00:00"}, "until"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"endpoint_id": "not-a-uuid"}, "endpoint_id"),
        ({"cursor": "garbage!"}, "cursor"),
    ],
)
def test_invalid_queries_are_422(client, database, params, field):
    tenant = make_tenant(database)
    response = client.get(LOG, params=params, headers=tenant.headers)
    details = assert_validation(response)
    assert field in details, details


def test_limit_bounds_are_inclusive(client, database):
    tenant = make_tenant(database)
    for limit in (1, 200):
        assert _list(client, tenant, limit=limit)["meta"] == {"limit": limit, "next_cursor": None}


def test_event_type_filter_accepts_every_system_type(client, database):
    tenant = make_tenant(database)
    for event_type in ("webhook.test", "webhook.secret_handoff"):
        assert _list(client, tenant, event_type=event_type)["data"] == []


def test_reading_the_log_needs_webhooks_read(client, database, log):
    assert_error(client.get(LOG), 401, "UNAUTHORIZED", "authentication failed")
    one = f"{LOG}/{log.foreign_attempt}"
    assert_error(client.get(one), 401, "UNAUTHORIZED")
    writer = add_key(database, log.tenant, ["webhooks:write", "events:write", "org:admin:write"])
    assert_error(
        client.get(LOG, headers=writer.headers), 403, "FORBIDDEN", "missing required scope"
    )
    mine = _ids(_all(client, log.tenant))[0]
    assert_error(client.get(f"{LOG}/{mine}", headers=writer.headers), 403, "FORBIDDEN")
    # Scope is checked before the query: even an invalid filter is a 403.
    assert_error(client.get(LOG, params={"limit": 0}, headers=writer.headers), 403, "FORBIDDEN")
    reader = add_key(database, log.tenant, ["webhooks:read"])
    assert len(_all(client, Tenant(log.tenant.org_id, reader.key_id, reader.api_key))) == 7
