"""Slow receivers and long-lived streams cannot starve the API (docs/operating.md, Isolation).

Over real HTTP (uvicorn on a thread of this process), against receivers that drip their
answer one header byte at a time: synchronous tests are capped per organization and sent on
threads of their own; event streams are capped per API key and given back when they end.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from api import isolation
from models import migration as migrations
from models.db import Database
from models.delivery import Delivery, DeliveryAttempt, Event
from models.limits import IN_FLIGHT_GRACE_S
from tests.api.helpers import assert_error
from tests.deliveries.helpers import add_endpoint
from tests.factories import Tenant, add_key, make_tenant
from tests.live import serve_api
from tests.receivers import dripping_receiver, scripted_receiver
from tests.support import overridden

DELIVERY_TIMEOUT_S = 15.0  # longer than any test here holds a drip
DRIP_S = 1.0
ANSWER_S = 5.0  # a bounded wait for what must answer promptly


@pytest.fixture
def base_url(settings) -> Iterator[str]:
    with (
        overridden(settings, delivery_timeout_seconds=DELIVERY_TIMEOUT_S, allow_insecure_urls=True),
        serve_api() as url,
    ):
        yield url


def row_counts(database: Database) -> tuple[int, int, int]:
    with database.session() as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(model))
            for model in (Event, Delivery, DeliveryAttempt)
        )


def fire(
    pool: ThreadPoolExecutor, base_url: str, tenant: Tenant, endpoint_id: uuid.UUID, count: int
) -> list[Future[httpx.Response]]:
    """``count`` concurrent test requests, each on its own connection."""

    def one() -> httpx.Response:
        return httpx.post(
            f"{base_url}/v1/webhooks/{endpoint_id}/test", headers=tenant.headers, timeout=60
        )

    return [pool.submit(one) for _ in range(count)]


def settle(futures: list[Future[httpx.Response]], done: Callable[[httpx.Response], bool]) -> int:
    """How many of the requests answered within ANSWER_S and satisfy ``done``."""
    deadline = time.monotonic() + ANSWER_S
    count = 0
    for future in futures:
        try:
            response = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            continue
        count += done(response)
    return count


def rate_limited(response: httpx.Response) -> bool:
    if response.status_code != 429:
        return False
    assert_error(response, 429, "RATE_LIMITED")
    assert 1 <= int(response.headers["retry-after"]) <= DELIVERY_TIMEOUT_S + IN_FLIGHT_GRACE_S + 1
    return True


def test_tests_beyond_the_org_limit_are_429_change_nothing_and_free_up_when_done(
    database, settings, base_url
):
    tenant, other = make_tenant(database), make_tenant(database, name="Other")
    with (
        overridden(settings, sync_tests_per_org=3),
        dripping_receiver(DRIP_S) as drip,
        scripted_receiver() as healthy,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        slow = add_endpoint(database, tenant.org_id, drip.url)
        fine = add_endpoint(database, tenant.org_id, healthy.url)
        theirs = add_endpoint(database, other.org_id, healthy.url)
        hanging = fire(pool, base_url, tenant, slow.id, 3)
        drip.wait_for(3)
        before = row_counts(database)

        # The organization's fourth test, to any of its endpoints: refused, nothing written.
        extra = fire(pool, base_url, tenant, fine.id, 2)
        assert settle(extra, rate_limited) == 2
        assert row_counts(database) == before
        assert healthy.received == []
        # Another organization is not limited by it.
        answered = httpx.post(
            f"{base_url}/v1/webhooks/{theirs.id}/test", headers=other.headers, timeout=ANSWER_S
        )
        assert answered.status_code == 200, answered.text
        assert answered.json()["outcome"] == "success"

        drip.release()  # the three tests end (the receiver hangs up): their slots are free
        for future in hanging:
            response = future.result(timeout=ANSWER_S)
            assert response.status_code == 200, response.text
            assert response.json()["outcome"] == "dead"
            assert response.json()["error"]
        again = httpx.post(
            f"{base_url}/v1/webhooks/{fine.id}/test", headers=tenant.headers, timeout=ANSWER_S
        )
        assert again.status_code == 200, again.text
        assert again.json()["outcome"] == "success"
    assert drip.received == 3


def test_hanging_tests_hold_none_of_the_threads_other_routes_need(database, settings, base_url):
    """More hanging tests than the threads every other route shares (40): writes and reads of
    another organization still answer, and a test beyond the sending threads is 429."""
    hanging_count = 45
    tenant, other = make_tenant(database), make_tenant(database, name="Other")
    with (
        overridden(settings, sync_tests_per_org=100, sync_test_threads=hanging_count),
        dripping_receiver(DRIP_S) as drip,
        ThreadPoolExecutor(max_workers=hanging_count + 2) as pool,
    ):
        slow = add_endpoint(database, tenant.org_id, drip.url)
        hanging = fire(pool, base_url, tenant, slow.id, hanging_count)
        drip.wait_for(hanging_count, timeout=20)
        with httpx.Client(base_url=base_url, headers=other.headers, timeout=ANSWER_S) as http:
            created = http.post(
                "/v1/webhooks",
                json={"url": "https://hooks.example.com/x", "events": ["brand.vetted"]},
            )
            assert created.status_code == 201, created.text
            listed = http.get("/v1/webhooks")
            assert listed.status_code == 200, listed.text
            assert [item["id"] for item in listed.json()["data"]] == [created.json()["id"]]
            theirs = add_endpoint(database, other.org_id, drip.url)
            before = row_counts(database)
            busy = http.post(f"/v1/webhooks/{theirs.id}/test")
            assert rate_limited(busy)  # every sending thread of this process is taken
            assert row_counts(database) == before
        drip.release()
        for future in hanging:
            assert future.result(timeout=20).status_code == 200
    assert drip.received == hanging_count


# --- event streams ------------------------------------------------------------------------------


def unfinished_operation(database: Database, tenant: Tenant) -> uuid.UUID:
    """A safe migrate that nothing advances: its stream stays open."""
    source = add_endpoint(database, tenant.org_id, "https://hooks.example.com/old")
    with database.session() as session:
        started = migrations.start_migration(session, tenant.org_id, source.id)
        return started.operation.id


class Stream:
    """An open event stream, read by the test's own thread (a socket closed while another
    thread reads it would not hang up until that read returned); ``close`` hangs up."""

    def __init__(self, base_url: str, path: str, tenant: Tenant):
        self.frames: list[dict[str, Any]] = []
        self._http = httpx.Client(base_url=base_url, headers=tenant.headers, timeout=ANSWER_S)
        self._response = self._http.send(self._http.build_request("GET", path), stream=True)
        assert self._response.status_code == 200, self._response.read()
        self._lines = self._response.iter_lines()
        assert self.next_frame(), "no first frame"

    def next_frame(self) -> bool:
        """Read up to the next frame: False when the stream ended first."""
        for line in self._lines:
            if line.startswith("data: "):
                self.frames.append(json.loads(line[len("data: ") :]))
                return True
        return False

    def read_to_end(self) -> None:
        """Every frame until the server ends the stream (each read waits ANSWER_S at most)."""
        while self.next_frame():
            pass

    def close(self) -> None:
        self._response.close()
        self._http.close()


def wait_until(predicate: Callable[[], bool], timeout: float = ANSWER_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_streams_are_capped_per_key_and_given_back_on_disconnect(database, settings, base_url):
    tenant = make_tenant(database)
    second_key = add_key(database, tenant, ["webhooks:read"])
    operation_id = unfinished_operation(database, tenant)
    path = f"/v1/operations/{operation_id}/events"
    with overridden(settings, sse_streams_per_key=2):
        first, second = Stream(base_url, path, tenant), Stream(base_url, path, tenant)
        try:
            refused = httpx.get(f"{base_url}{path}", headers=tenant.headers, timeout=ANSWER_S)
            assert_error(refused, 429, "RATE_LIMITED")
            assert refused.headers["retry-after"] == str(isolation.STREAM_RETRY_AFTER_S)
            # Per key: another key of the same organization has its own.
            Stream(base_url, path, second_key).close()

            first.close()  # the client goes away: its slot comes back
            assert wait_until(lambda: isolation.streams.open(tenant.key_id) == 1)
            third = Stream(base_url, path, tenant)
            assert third.frames[0]["id"] == str(operation_id)
            third.close()
        finally:
            first.close()
            second.close()
        assert wait_until(lambda: isolation.streams.open(tenant.key_id) == 0)
        assert wait_until(lambda: isolation.streams.open(second_key.key_id) == 0)


def test_a_stream_ends_after_its_lifetime_and_gives_its_slot_back(database, settings, base_url):
    tenant = make_tenant(database)
    operation_id = unfinished_operation(database, tenant)
    path = f"/v1/operations/{operation_id}/events"
    with overridden(settings, sse_streams_per_key=1, sse_stream_max_seconds=1.0):
        stream = Stream(base_url, path, tenant)
        try:
            stream.read_to_end()  # else ReadTimeout: the stream outlived its lifetime
        finally:
            stream.close()
        assert [frame["state"] for frame in stream.frames] == ["pending"]  # nothing changed
        assert wait_until(lambda: isolation.streams.open(tenant.key_id) == 0)
        Stream(base_url, path, tenant).close()


def test_a_stream_sends_each_change_and_ends_with_the_operation(database, settings, base_url):
    tenant = make_tenant(database)
    operation_id = unfinished_operation(database, tenant)
    path = f"/v1/operations/{operation_id}/events"
    stream = Stream(base_url, path, tenant)
    try:
        canceled = httpx.post(
            f"{base_url}/v1/operations/{operation_id}/cancel",
            headers=tenant.headers,
            timeout=ANSWER_S,
        )
        assert canceled.status_code == 202, canceled.text
        with database.session() as session:  # the worker's part: the rollback
            migrations.begin_advance(session, operation_id)
        stream.read_to_end()  # else ReadTimeout: the stream did not end with the operation
    finally:
        stream.close()
    states = [frame["state"] for frame in stream.frames]
    assert states[0] == "pending"
    assert states[-1] == "canceled"
    assert stream.frames[-1]["finished_at"] is not None
    assert all(a != b for a, b in zip(stream.frames, stream.frames[1:], strict=False))
    assert wait_until(lambda: isolation.streams.open(tenant.key_id) == 0)
