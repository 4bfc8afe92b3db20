"""The operators' view end to end: /metrics and the logs around a whole safe migrate and an
org-secret rotation, on a real worker and beat (subprocesses on Redis in the real pass).

The worker processes write their histograms to ``metrics_dir`` (multiprocess mode); the
in-process API reads them back together with the counts it derives from the database.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from models.org_secret import OrgSecret
from rotator.logs import ContextFilter, JsonFormatter
from tests.factories import Tenant, make_tenant
from tests.receivers import loopback_demo_receiver
from tests.support import BACKEND

pytestmark = pytest.mark.e2e

GRACE_S = 1
E2E_OVERRIDES = {
    "migrate_backoff_initial_seconds": 0.2,
    "migrate_backoff_max_seconds": 0.5,
    "org_secret_grace_seconds": GRACE_S,
    "beat_period_scale": 0.05,  # policy tick every 0.75 s, sweeper every 1.5 s
    # The worker subprocesses (real pass) write their histograms here; /metrics reads them.
    "metrics_dir": str(Path(os.environ["ROTATOR_DATA_DIR"]) / "metrics-e2e"),
}
MIGRATE_STEPS = ("create_endpoint", "send_test_delivery", "await_success", "delete_old_endpoint")
FINAL = {"succeeded", "rolled_back", "failed", "canceled"}


# --- helpers ----------------------------------------------------------------------------------


class Scrape(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """One /metrics answer: (sample name, labels) → value."""

    def get_value(self, name: str, **labels: str) -> float | None:
        return self.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        return self.get_value(name, **labels) or 0.0

    def names(self) -> set[str]:
        return {name for name, _ in self}


def scrape(client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = Scrape()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _wait(predicate, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def _operation(client, tenant, operation_id):
    return client.get(f"/v1/operations/{operation_id}", headers=tenant.headers).json()


def secret_forms(secret: str) -> set[str]:
    """A secret as it could leak: the base64 given out, url-safe or unpadded, and hex."""
    raw = base64.b64decode(secret)
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    return {secret, secret.rstrip("="), urlsafe, urlsafe.rstrip("="), raw.hex(), raw.hex().upper()}


@dataclass
class Scenario:
    tenant: Tenant
    migrate_id: str
    rotation_id: str
    secrets: list[str] = field(default_factory=list)
    api_key: str = ""
    before: Scrape = field(default_factory=Scrape)
    during: Scrape = field(default_factory=Scrape)
    after: Scrape = field(default_factory=Scrape)
    records: list[logging.LogRecord] = field(default_factory=list)


class Capture(logging.Handler):
    """Every record emitted in this process (caplog's way), with the context fields added as
    the real handler adds them. Module-scoped, so that both tests share one scenario run."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def scenario(app, database, workers) -> Scenario:
    root = logging.getLogger()
    capture, level = Capture(), root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        with (
            TestClient(app, raise_server_exceptions=False) as client,
            loopback_demo_receiver() as hooks,
        ):
            result = run_scenario(client, database, hooks)
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
    result.records = capture.records
    return result


def run_scenario(client, database, demo_receiver) -> Scenario:
    """A whole safe migrate, then an org-secret rotation run by a policy on beat."""
    tenant = make_tenant(database)
    before = scrape(client)

    # Safe migrate: the receiver knows only the old secret, so the first test is refused.
    old = client.post(
        "/v1/webhooks",
        json={"url": demo_receiver.url, "events": ["brand.vetted"]},
        headers=tenant.headers,
    ).json()
    demo_receiver.set_secrets([old["secret"]])
    started = client.post(f"/v1/webhooks/{old['id']}/migrate", headers=tenant.headers)
    assert started.status_code == 202, started.text
    migrate = started.json()
    _wait(
        lambda: _operation(client, tenant, migrate["id"])["state"] == "awaiting_receiver",
        "awaiting_receiver",
    )
    during = scrape(client)
    demo_receiver.add_secret(migrate["secret"])
    done = _wait(
        lambda: (op := _operation(client, tenant, migrate["id"]))["state"] in FINAL and op,
        "migrate ended",
    )
    assert done["state"] == "succeeded", done

    # Org secret: rotated once by hand, then by a policy on beat (an operation), after which
    # the first secret's 1-second window closes and the sweeper marks it expired.
    first = client.post("/v1/webhook-secret/rotate", headers=tenant.headers).json()
    policy = client.post(
        "/v1/rotation-policies",
        json={
            "target": "org_secret",
            "strategy": "rotate",
            "interval_seconds": 3600,
            "next_run_at": datetime.now(UTC).isoformat(),
        },
        headers=tenant.headers,
    )
    assert policy.status_code == 201, policy.text

    def rotation_done():
        listed = client.get(
            "/v1/operations", params={"kind": "org_secret_rotation"}, headers=tenant.headers
        ).json()["data"]
        return listed and listed[0]["state"] in FINAL and listed[0]

    rotation = _wait(rotation_done, "org secret rotation by the policy")
    assert rotation["state"] == "succeeded", rotation
    revealed = client.post(
        f"/v1/operations/{rotation['id']}/reveal-secret", headers=tenant.headers
    ).json()

    def first_expired():
        with database.session() as session:
            rows = session.scalars(select(OrgSecret).where(OrgSecret.org_id == tenant.org_id)).all()
        return any(row.state == "expired" for row in rows)

    _wait(first_expired, "the previous org secret expired", timeout=15)

    def settled():  # the last step is observed just after its commit
        now = scrape(client)
        rotated = now.value(
            "rotator_operation_step_duration_seconds_count",
            kind="org_secret_rotation",
            step="rotate_org_secret",
        ) > before.value(
            "rotator_operation_step_duration_seconds_count",
            kind="org_secret_rotation",
            step="rotate_org_secret",
        )
        lag = now.get_value("rotator_org_secret_expiry_lag_seconds")
        return rotated and lag is not None and now

    after = _wait(settled, "the rotation's step and the expiry lag on /metrics")
    return Scenario(
        tenant=tenant,
        migrate_id=migrate["id"],
        rotation_id=rotation["id"],
        secrets=[old["secret"], migrate["secret"], first["webhook_secret"], revealed["secret"]],
        api_key=tenant.api_key,
        before=before,
        during=during,
        after=after,
    )


# --- (a) /metrics -----------------------------------------------------------------------------


def test_metrics_move_with_a_safe_migrate_and_an_org_rotation(scenario: Scenario):
    before, during, after = scenario.before, scenario.during, scenario.after

    def delta(name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    # Counts of rows: one operation of each kind started and succeeded.
    assert delta("rotator_operations_started_total", kind="safe_migrate") == 1
    assert delta("rotator_operations_started_total", kind="org_secret_rotation") == 1
    assert delta("rotator_operations_ended_total", kind="safe_migrate", state="succeeded") == 1
    assert (
        delta("rotator_operations_ended_total", kind="org_secret_rotation", state="succeeded") == 1
    )
    assert delta("rotator_operations_ended_total", kind="safe_migrate", state="rolled_back") == 0
    # The first test delivery was refused (retry), a later one accepted (success).
    retries = delta("rotator_delivery_attempts_total", outcome="retry")
    successes = delta("rotator_delivery_attempts_total", outcome="success")
    assert retries >= 1, retries
    assert successes == 1, successes

    # Histograms, observed in the worker processes: one duration per finished step, one
    # latency per attempt.
    for step in MIGRATE_STEPS:
        count = "rotator_operation_step_duration_seconds_count"
        assert delta(count, kind="safe_migrate", step=step) == 1, step
    assert (
        delta(
            "rotator_operation_step_duration_seconds_count",
            kind="org_secret_rotation",
            step="rotate_org_secret",
        )
        == 1
    )
    assert delta("rotator_delivery_latency_seconds_count", outcome="retry") == retries
    assert delta("rotator_delivery_latency_seconds_count", outcome="success") == successes
    assert (
        after.value("rotator_delivery_latency_seconds_bucket", outcome="success", le="+Inf")
        >= successes
    )

    # Gauges: an operation was waiting mid-way; none is now. Beat ticks every 0.75 s here.
    assert during.value("rotator_oldest_unfinished_operation_age_seconds") > 0
    assert after.value("rotator_oldest_unfinished_operation_age_seconds") == 0
    assert 0 <= after.value("rotator_beat_last_tick_age_seconds") < 5
    lag = after.get_value("rotator_org_secret_expiry_lag_seconds")
    assert lag is not None
    assert 0 <= lag < 10
    assert after.value("rotator_metrics_source_up", source="database") == 1
    if BACKEND == "real":
        for queue in ("control", "deliveries"):  # each plane's queue
            assert after.get_value("rotator_queue_depth", queue=queue) is not None
        assert after.value("rotator_metrics_source_up", source="broker") == 1
    else:
        assert "rotator_queue_depth" not in after.names()


# --- (b) logs ---------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def test_logs_carry_ids_and_never_a_secret(scenario: Scenario, workers):
    forbidden = set().union(*(secret_forms(s) for s in scenario.secrets)) | {scenario.api_key}
    formatter = JsonFormatter()
    in_process = [json.loads(formatter.format(record)) for record in scenario.records]
    assert in_process, "nothing was captured"
    texts = {"in-process": "\n".join(json.dumps(e) for e in in_process)}
    for path in workers.logs:
        texts[Path(path).name] = Path(path).read_text(errors="replace")
    for where, text in texts.items():
        for secret in forbidden:
            assert secret not in text, f"a secret appears in the {where} log"

    # One line per request, with its request id (and the org once authenticated).
    requests = [e for e in in_process if e["message"] == "http request"]
    assert requests
    assert all(e.get("request_id") for e in requests)
    migrate_calls = [e for e in requests if e["path"].endswith("/migrate")]
    assert migrate_calls
    assert migrate_calls[0]["status"] == 202
    assert migrate_calls[0]["org_id"] == str(scenario.tenant.org_id)

    # One line per step, with the operation and task ids; one per delivery attempt.
    worker_side = in_process
    if BACKEND == "real":
        worker_side = [e for path in workers.logs for e in _json_lines(Path(path).read_text())]
        assert any(e["logger"].startswith("celery") for e in worker_side), "Celery logs in JSON"
    steps = [
        e
        for e in worker_side
        if e["message"] == "operation step" and e.get("operation_id") == scenario.migrate_id
    ]
    finished = {e["step"] for e in steps if e["outcome"] == "succeeded"}
    assert finished == set(MIGRATE_STEPS), steps
    assert all(e.get("task_id") and e["task"] == "operation.advance" for e in steps)
    assert any(e["outcome"] == "waiting" for e in steps)
    rotation_steps = [
        e
        for e in worker_side
        if e["message"] == "operation step" and e.get("operation_id") == scenario.rotation_id
    ]
    assert [e["step"] for e in rotation_steps] == ["rotate_org_secret"]
    attempts = [e for e in worker_side if e["message"] == "delivery attempt"]
    assert {e["outcome"] for e in attempts} >= {"retry", "success"}
    assert all(e["delivery_id"] and e["attempt"] >= 1 for e in attempts)
    refused = [e for e in attempts if e["outcome"] == "retry"]
    assert refused[0]["status"] == 401
    assert refused[0]["operation_id"] == scenario.migrate_id
