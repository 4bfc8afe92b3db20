"""docs/architecture.md, "Celery settings that matter", asserted on the app the workers run."""

from workers.app import (
    CONTROL_QUEUE,
    DELIVERY_QUEUE,
    HARD_TIME_LIMIT_S,
    VISIBILITY_TIMEOUT_S,
    app,
)
from workers.names import TaskName

# The beat schedule is installed by this task module, which beat imports before it schedules.
app.loader.import_default_modules()


def test_reliability_settings():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1


def test_time_limits_far_below_the_visibility_timeout():
    conf = app.conf
    assert conf.task_soft_time_limit < conf.task_time_limit == HARD_TIME_LIMIT_S
    assert conf.broker_transport_options["visibility_timeout"] == VISIBILITY_TIMEOUT_S
    assert conf.task_time_limit * 10 <= VISIBILITY_TIMEOUT_S


def test_json_only_utc_and_events_for_flower():
    conf = app.conf
    assert conf.task_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.enable_utc is True
    assert str(conf.timezone) == "UTC"
    assert conf.worker_send_task_events is True
    assert conf.task_send_sent_event is True


def test_every_beat_entry_expires_and_names_a_registered_task():
    app.loader.import_default_modules()
    for name, entry in app.conf.beat_schedule.items():
        assert entry["task"] in app.tasks, name
        assert entry.get("options", {}).get("expires"), name


def test_deliveries_and_the_control_plane_are_routed_to_their_own_queues():
    app.loader.import_default_modules()
    assert {queue.name for queue in app.conf.task_queues} == {CONTROL_QUEUE, DELIVERY_QUEUE}
    assert app.conf.task_default_queue == CONTROL_QUEUE
    for name in app.tasks:
        if name.startswith("celery."):
            continue
        route = app.amqp.router.route({}, name)
        expected = DELIVERY_QUEUE if name == TaskName.DELIVERY_SEND else CONTROL_QUEUE
        assert route["queue"].name == expected, name
    # Every beat tick is control-plane work.
    for entry in app.conf.beat_schedule.values():
        assert app.amqp.router.route({}, entry["task"])["queue"].name == CONTROL_QUEUE
