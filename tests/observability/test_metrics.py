"""rotator.metrics without workers: the database collector, heartbeats, multiprocess files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import timedelta

from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from api import scrape
from models import clock, heartbeat
from models import migration as migrations
from models.org import ALL_SCOPES
from rotator import metrics
from tests.support import overridden


def _samples(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_an_empty_database_shows_every_label_and_no_tick_yet(client):
    samples = _samples(client)
    # Counted by the processes since they started (other tests here may have counted some).
    assert samples[("rotator_operations_started_total", (("kind", "safe_migrate"),))] >= 0
    key = ("rotator_operations_ended_total", (("kind", "safe_migrate"), ("state", "succeeded")))
    assert samples[key] >= 0
    assert samples[("rotator_delivery_attempts_total", (("outcome", "dead"),))] >= 0
    assert samples[("rotator_oldest_unfinished_operation_age_seconds", ())] == 0
    assert math.isinf(samples[("rotator_beat_last_tick_age_seconds", ())])
    assert ("rotator_org_secret_expiry_lag_seconds", ()) not in samples
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_heartbeats_upsert_and_their_age_grows_while_no_tick_runs(client, database):
    with database.session() as session:
        heartbeat.record(session, "policy.tick")
    with database.session() as session:
        heartbeat.record(session, "policy.tick")  # an upsert, not a duplicate key
        heartbeat.record(session, "org_secret.sweep")
    with database.session() as session:
        assert session.query(heartbeat.Heartbeat).count() == 2
    fresh = _samples(client)[("rotator_beat_last_tick_age_seconds", ())]
    clock.travel(timedelta(minutes=10))
    stale = _samples(client)[("rotator_beat_last_tick_age_seconds", ())]
    assert fresh < 5
    assert stale >= 600


def test_same_named_families_from_several_sources_are_merged():
    def source(value, outcome):
        family = CounterMetricFamily("x_attempts", "help", labels=["outcome"])
        family.add_metric([outcome], value)

        class Source:
            def collect(self):
                yield family

        return Source()

    merged = list(scrape._Merged([source(1, "a"), source(2, "a"), source(5, "b")]).collect())
    assert len(merged) == 1
    assert {s.labels["outcome"]: s.value for s in merged[0].samples} == {"a": 3, "b": 5}


OBSERVE = """
from rotator import metrics
from rotator.settings import get_settings
metrics.observe_step(get_settings(), "safe_migrate", "create_endpoint", 0.2)
metrics.observe_delivery(get_settings(), "success", 0.05)
"""


def test_histograms_from_other_processes_are_read_from_the_metrics_dir(client, settings, tmp_path):
    env = {**os.environ, "ROTATOR_METRICS_DIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for _ in range(2):  # two worker processes
        subprocess.run([sys.executable, "-c", OBSERVE], env=env, check=True, timeout=60)
    assert len(list(tmp_path.glob("histogram_*.db"))) == 2
    with overridden(settings, metrics_dir=str(tmp_path)):
        samples = _samples(client)
    step = (("kind", "safe_migrate"), ("step", "create_endpoint"))
    assert samples[("rotator_operation_step_duration_seconds_count", step)] >= 2
    assert samples[("rotator_operation_step_duration_seconds_sum", step)] >= 0.4 - 1e-9
    assert samples[("rotator_delivery_latency_seconds_count", (("outcome", "success"),))] >= 2


def test_observing_never_raises(settings, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(metrics, "_recorders_for", broken)
    metrics.observe_step(settings, "safe_migrate", "create_endpoint", 1.0)
    metrics.observe_delivery(settings, "success", 1.0)


def test_in_flight_deliveries_and_open_circuits_are_gauges(client, database):
    from models import attempts, circuit
    from tests.deliveries.helpers import add_endpoint, publish
    from tests.factories import make_tenant

    tenant = make_tenant(database)
    hook = add_endpoint(database, tenant.org_id, "http://127.0.0.1:9/hooks")
    publish(database, tenant.org_id)
    before = _samples(client)
    assert before[("rotator_deliveries_in_flight", ())] == 0
    assert before[("rotator_endpoint_circuits_open", ())] == 0
    with database.session() as session:
        assert len(attempts.claim_due(session, 10)) == 1
        failures = database.settings.circuit_failure_threshold
        circuit.note(session, [(hook.id, False, True)] * failures)
    after = _samples(client)
    assert after[("rotator_deliveries_in_flight", ())] == 1
    assert after[("rotator_endpoint_circuits_open", ())] == 1


# --- the scrape's cost and its token ------------------------------------------------------------


def test_attempts_are_counted_where_they_happen_and_a_scrape_does_not_read_them(
    client, settings, database
):
    from sqlalchemy import event

    metrics.observe_delivery(settings, "dead", 0.1)  # creates this process's recorders
    recorders = metrics._recorders
    assert recorders is not None
    # A process in multiprocess mode (an earlier end-to-end test) counts in its directory.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "") if recorders.multiprocess else ""
    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_):
        statements.append(statement)

    with overridden(settings, metrics_dir=directory):
        before = _samples(client)[("rotator_delivery_attempts_total", (("outcome", "dead"),))]
        metrics.observe_delivery(settings, "dead", 0.1)
        metrics.observe_delivery(settings, "dead", 0.2)
        event.listen(database.engine, "before_cursor_execute", seen)
        try:
            after = _samples(client)[("rotator_delivery_attempts_total", (("outcome", "dead"),))]
        finally:
            event.remove(database.engine, "before_cursor_execute", seen)
    assert after - before == 2
    assert statements  # the scrape did read the database...
    assert not [s for s in statements if "delivery_attempts" in s]  # ...but not that table


TOKEN = "metrics-token-0123456789"


def test_with_a_token_a_scrape_needs_it(client, settings):
    with overridden(settings, metrics_token=TOKEN):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": "Bearer"},
        ):
            response = client.get("/metrics", headers=headers)
            assert response.status_code == 401, headers
            body = response.json()
            assert body["success"] is False
            assert body["error"]["code"] == "UNAUTHORIZED"
            assert TOKEN not in response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert "rotator_metrics_source_up" in ok.text
        assert (
            client.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        )
    assert client.get("/metrics").status_code == 200  # no token set: open, as before


def test_operations_are_counted_as_they_start_and_end_and_a_scrape_does_not_count_rows(
    client, settings, database, tmp_path
):
    """Started when the start commits (a rolled-back start counts nothing), ended where the
    worker ends it; the scrape itself reads no operation rows but the unfinished ones."""
    from sqlalchemy import event

    from models import operation as operations
    from models.endpoint import create_endpoint
    from tests.factories import make_tenant
    from workers.operations import advance

    metrics.count_operation_started(settings, "safe_migrate")  # this process's recorders
    recorders = metrics._recorders
    assert recorders is not None
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "") if recorders.multiprocess else ""
    started_key = ("rotator_operations_started_total", (("kind", "safe_migrate"),))
    canceled_key = (
        "rotator_operations_ended_total",
        (("kind", "safe_migrate"), ("state", "canceled")),
    )
    tenant = make_tenant(database)
    with overridden(settings, metrics_dir=directory, allow_insecure_urls=True):
        before = _samples(client)
        with database.session() as session:
            source = create_endpoint(
                session, tenant.org_id, url="http://127.0.0.1:9/x", events=["brand.vetted"]
            ).endpoint
        try:
            with database.session() as session:
                migrations.start_migration(session, tenant.org_id, source.id)
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        with database.session() as session:
            operation_id = migrations.start_migration(
                session, tenant.org_id, source.id
            ).operation.id
        with database.session() as session:
            operations.request_cancel(session, tenant.org_id, operation_id, scopes=ALL_SCOPES)
        advance(database, operation_id)  # ends it: canceled before it created anything
        statements: list[str] = []

        def seen(_conn, _cursor, statement, *_):
            statements.append(statement)

        event.listen(database.engine, "before_cursor_execute", seen)
        try:
            after = _samples(client)
        finally:
            event.remove(database.engine, "before_cursor_execute", seen)
    assert after[started_key] - before[started_key] == 1
    assert after[canceled_key] - before[canceled_key] == 1
    on_operations = [s for s in statements if "FROM operations" in s]
    assert on_operations
    assert all("finished_at IS NULL" in s for s in on_operations), on_operations
