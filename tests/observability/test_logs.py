"""rotator.logs: JSON and readable lines, the context fields, and where they get bound."""

import asyncio
import json
import logging
import re
import threading
from contextvars import copy_context

import pytest

from rotator import logs
from rotator.logs import REDACTED, ContextFilter, JsonFormatter, bound, configure_logging


def _record(message="hello %s", args=("world",), level=logging.INFO, **extra):
    record = logging.LogRecord("rotator.test", level, __file__, 1, message, args, None)
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def _line(record) -> dict:
    ContextFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line, "one record, one line"
    return json.loads(line)


def test_a_record_becomes_one_json_object_with_the_usual_fields():
    entry = _line(_record())
    assert entry["message"] == "hello world"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "rotator.test"
    assert entry["ts"].endswith("+00:00")
    assert not {"request_id", "operation_id", "task_id", "org_id"} & set(entry)


def test_extra_fields_are_kept_and_values_json_encoded():
    entry = _line(_record(delivery_id="d1", attempt=2, status=None, when=object))
    assert entry["delivery_id"] == "d1"
    assert entry["attempt"] == 2
    assert entry["status"] is None
    assert isinstance(entry["when"], str)  # not JSON: rendered with str()


@pytest.mark.parametrize(
    "name", ["secret", "new_secret", "api_key", "apikey", "Authorization", "headers", "body"]
)
def test_extra_fields_that_look_like_secrets_are_blanked(name):
    entry = _line(_record(**{name: "c2VjcmV0"}))
    assert entry[name] == REDACTED
    assert "c2VjcmV0" not in json.dumps(entry)


def test_exceptions_are_one_field_of_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record(exc_info=sys.exc_info())
    entry = _line(record)
    assert "ValueError: boom" in entry["exc"]


def test_bound_context_is_added_and_unbound_after_the_block():
    with bound(request_id="r1", org_id="o1"):
        with bound(operation_id="op1", task_id="t1"):
            inner = _line(_record())
        outer = _line(_record())
    after = _line(_record())
    assert {k: inner[k] for k in ("request_id", "org_id", "operation_id", "task_id")} == {
        "request_id": "r1",
        "org_id": "o1",
        "operation_id": "op1",
        "task_id": "t1",
    }
    assert outer["request_id"] == "r1"
    assert "operation_id" not in outer
    assert "request_id" not in after


def test_a_value_given_in_extra_wins_over_the_context():
    with bound(request_id="from-context"):
        entry = _line(_record(request_id="from-extra"))
    assert entry["request_id"] == "from-extra"


def test_unknown_context_fields_are_refused():
    with pytest.raises(KeyError), bound(secret="nope"):
        pass


def test_context_is_per_thread_and_per_task_and_follows_copied_contexts():
    seen: dict[str, object] = {}

    def other_thread():
        seen["thread"] = logs.current()

    async def task(name, value):
        with bound(operation_id=value):
            await asyncio.sleep(0)
            seen[name] = logs.current()["operation_id"]

    async def both():
        await asyncio.gather(task("a", "op-a"), task("b", "op-b"))

    with bound(request_id="r1"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        copied = copy_context()
        asyncio.run(both())
    assert seen["thread"] == {}  # a new thread starts with an empty context
    assert copied.run(logs.current) == {"request_id": "r1"}  # a copied one carries it
    assert (seen["a"], seen["b"]) == ("op-a", "op-b")


def test_celery_task_signals_bind_and_unbind_the_task_id():
    logs._task_started(task_id="t-1")
    assert logs.current()["task_id"] == "t-1"
    logs._task_finished(task_id="t-1")
    assert "task_id" not in logs.current()


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    names = (
        "httpx",
        "httpcore",
        "uvicorn",
        "uvicorn.error",
        "uvicorn.access",
        "alembic.runtime.plugins",
    )
    saved_loggers = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in names
    }
    try:
        yield
    finally:
        root.handlers[:], root.level = saved
        for name, (handlers, level) in saved_loggers.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).setLevel(level)


def test_configure_logging_writes_json_lines_at_the_configured_level(
    settings, capsys, restore_logging
):
    settings_copy = settings.model_copy(update={"log_level": "WARNING"})
    configure_logging(settings_copy)
    with bound(request_id="r9"):
        logging.getLogger("rotator.x").info("hidden")
        logging.getLogger("rotator.x").warning("shown %d", 1)
    logging.getLogger("httpx").warning("an httpx warning passes")
    err = capsys.readouterr().err.strip().splitlines()
    entries = [json.loads(line) for line in err]
    assert [e["message"] for e in entries] == ["shown 1", "an httpx warning passes"]
    assert entries[0]["request_id"] == "r9"

    configure_logging(settings_copy.model_copy(update={"log_level": "INFO"}))
    logging.getLogger("httpx").info("HTTP Request: POST https://hook.example/?token=x")
    logging.getLogger("rotator.x").info("info now")
    entries = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [e["message"] for e in entries] == ["info now"], "httpx's INFO lines carry URLs"


def test_celery_leaves_logging_to_us(restore_logging):
    """A receiver of ``setup_logging`` makes Celery skip its own set-up; ours installs JSON."""
    from celery import signals

    import workers.app  # noqa: F401 - connects the receivers

    answered = signals.setup_logging.send(sender=None, loglevel=logging.INFO, logfile=None)
    assert answered, "no receiver: Celery would configure logging itself"
    formatters = [type(h.formatter) for h in logging.getLogger().handlers]
    assert formatters == [JsonFormatter]


def test_one_line_per_request_with_request_id_and_org_id(client, database, caplog):
    from tests.factories import make_tenant

    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.INFO)
    tenant = make_tenant(database)
    listed = client.get("/v1/webhooks?limit=5", headers=tenant.headers)
    anonymous = client.get("/v1/webhooks")
    lines = [r for r in caplog.records if r.getMessage() == "http request"]
    assert len(lines) == 2
    ok, refused = (json.loads(JsonFormatter().format(r)) for r in lines)
    assert ok["request_id"] == listed.headers["x-request-id"]
    assert ok["org_id"] == str(tenant.org_id)
    assert (ok["method"], ok["path"], ok["status"]) == ("GET", "/v1/webhooks", 200)
    assert isinstance(ok["duration_ms"], float)
    assert refused["request_id"] == anonymous.headers["x-request-id"]
    assert refused["status"] == 401
    assert "org_id" not in refused
    assert tenant.api_key not in caplog.text
    assert "limit" not in json.dumps(ok), "no query string"


# --- readable lines on a terminal ---------------------------------------------------------------


@pytest.fixture
def terminal():
    """A real terminal (a pseudo-terminal's other end) as a text stream, and a plain file."""
    import os
    import pty

    controller, device = pty.openpty()
    with open(device, "w") as stream:
        yield stream
    os.close(controller)


@pytest.mark.parametrize(
    ("log_format", "on_terminal", "human"),
    [
        ("auto", True, True),
        ("auto", False, False),
        ("json", True, False),
        ("human", False, True),
    ],
)
def test_the_format_follows_the_setting_and_whether_stderr_is_a_terminal(
    settings, terminal, tmp_path, log_format, on_terminal, human
):
    assert terminal.isatty()
    with (tmp_path / "file.log").open("w") as plain:
        stream = terminal if on_terminal else plain
        chosen = logs.human_format(settings.model_copy(update={"log_format": log_format}), stream)
    assert chosen is human


def test_configure_logging_on_a_terminal_installs_readable_lines(
    settings, terminal, monkeypatch, restore_logging
):
    monkeypatch.setattr("sys.stderr", terminal)
    configure_logging(settings)
    assert [type(h.formatter) for h in logging.getLogger().handlers] == [logs.HumanFormatter]
    configure_logging(settings.model_copy(update={"log_format": "json"}))
    assert [type(h.formatter) for h in logging.getLogger().handlers] == [JsonFormatter]


def test_a_readable_line_has_time_level_logger_message_and_fields():
    with bound(operation_id="op1"):
        record = _record(attempt=2, new_secret="c2VjcmV0", data={"name": "celery's copy"})
        ContextFilter().filter(record)
    line = logs.HumanFormatter().format(record)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} INFO    rotator\.test: hello world  "
        r"operation_id=op1 attempt=2 new_secret=\[redacted\]",
        line,
    ), line


def test_a_readable_line_puts_the_traceback_below():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record(level=logging.ERROR, exc_info=sys.exc_info())
    first, *rest = logs.HumanFormatter().format(record).splitlines()
    assert first.endswith("ERROR   rotator.test: hello world")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


def test_log_format_is_read_from_the_environment_and_checked(monkeypatch):
    from pydantic import ValidationError

    from rotator.settings import Settings

    monkeypatch.setenv("ROTATOR_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("ROTATOR_LOG_FORMAT", "pretty")
    with pytest.raises(ValidationError, match="log_format"):
        Settings()
