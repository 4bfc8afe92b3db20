"""One organization's hanging test deliveries cannot starve the API for everyone else.

Real ``rotator api`` processes (two in the real pass, sharing PostgreSQL; one on the SQLite
file in the embedded pass) and a receiver that drips its answer one header byte every 2 s.
Organization A fires 50 concurrent ``POST /v1/webhooks/{id}/test`` at it, spread over the
processes: five hang (``ROTATOR_SYNC_TESTS_PER_ORG``, across processes), the rest are 429
at once, and while the five hang organization B's writes, reads and tests answer promptly.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from models.delivery import Delivery
from tests.api.helpers import assert_error
from tests.deliveries.helpers import add_endpoint
from tests.factories import make_tenant
from tests.processes import BIN, free_port, rotator_env, start, stop, wait_http
from tests.receivers import dripping_receiver, scripted_receiver
from tests.support import BACKEND, settings_env

pytestmark = pytest.mark.e2e

# Longer than the test holds its drip: the five tests end when the receiver hangs up.
E2E_OVERRIDES = {"delivery_timeout_seconds": 20.0}
PER_ORG = 5
FIRED = 50
PROMPTLY_S = 5.0  # a bounded wait for what must not be starved


@pytest.fixture
def apis(e2e_settings, tmp_path) -> Iterator[list[str]]:
    """Two ``rotator api`` processes on the shared PostgreSQL in the real pass; one in the
    embedded pass (SQLite is one process's database). Their base URLs."""
    env = {
        **rotator_env(),
        **settings_env(e2e_settings),
        "ROTATOR_SYNC_TESTS_PER_ORG": str(PER_ORG),
    }
    started = []
    for index in range(2 if BACKEND == "real" else 1):
        port, log = free_port(), tmp_path / f"api-{index}.log"
        command = [str(BIN / "rotator"), "api", "--port", str(port)]
        started.append((f"http://127.0.0.1:{port}", start(command, env, log, cwd=tmp_path), log))
    try:
        for base, proc, log in started:
            wait_http(f"{base}/healthz", proc, log)
        yield [base for base, _, _ in started]
    finally:
        codes = [(stop(proc, signal.SIGINT), log) for _, proc, log in started]
    for code, log in codes:
        assert code == 0, log.read_text()


def test_hanging_tests_of_one_org_leave_the_api_to_the_others(database, apis):
    a, b = make_tenant(database, name="A"), make_tenant(database, name="B")
    with (
        dripping_receiver(interval_s=2.0) as drip,
        scripted_receiver() as healthy,
        ThreadPoolExecutor(max_workers=FIRED) as pool,
        httpx.Client(base_url=apis[0], timeout=PROMPTLY_S) as http,
        httpx.Client(timeout=60, limits=httpx.Limits(max_connections=FIRED)) as firing,
    ):
        slow = add_endpoint(database, a.org_id, drip.url)

        def test_delivery(api: str) -> httpx.Response:
            return firing.post(f"{api}/v1/webhooks/{slow.id}/test", headers=a.headers)

        # Spread over the processes: the limit is the organization's, wherever it asks.
        fired = [pool.submit(test_delivery, apis[i % len(apis)]) for i in range(FIRED)]
        drip.wait_for(PER_ORG)
        done = _answered(fired, FIRED - PER_ORG)
        assert len(done) == FIRED - PER_ORG  # and five hang
        for response in done:
            assert_error(response, 429, "RATE_LIMITED")
            assert int(response.headers["retry-after"]) >= 1

        # While A's tests hang: B writes, reads and tests; A's next test is refused.
        created = http.post(
            "/v1/webhooks",
            json={"url": healthy.url, "events": ["brand.vetted"]},
            headers=b.headers,
        )
        assert created.status_code == 201, created.text
        listed = http.get("/v1/webhooks", headers=b.headers)
        assert listed.status_code == 200, listed.text
        assert [item["id"] for item in listed.json()["data"]] == [created.json()["id"]]
        tested = http.post(f"/v1/webhooks/{created.json()['id']}/test", headers=b.headers)
        assert tested.status_code == 200, tested.text
        assert tested.json()["outcome"] == "success"
        assert_error(
            http.post(f"/v1/webhooks/{slow.id}/test", headers=a.headers), 429, "RATE_LIMITED"
        )
        assert drip.received == PER_ORG

        drip.release()  # the receiver hangs up: A's five tests end
        for future in fired:
            assert future.result(timeout=PROMPTLY_S).status_code in (200, 429)
    with database.session() as session:
        made = session.scalar(select(func.count()).where(Delivery.org_id == a.org_id))
    assert made == PER_ORG  # the refused ones wrote nothing


def _answered(futures: list[Future[httpx.Response]], count: int) -> list[httpx.Response]:
    """The responses so far, once ``count`` have come (or PROMPTLY_S has passed)."""
    deadline = time.monotonic() + PROMPTLY_S
    while sum(future.done() for future in futures) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # any more that were about to come
    return [future.result() for future in futures if future.done()]
