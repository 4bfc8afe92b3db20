"""Structured logs: one JSON object per line, with the request / operation / task in context.

``configure_logging(settings)`` installs one stderr handler on the root logger with
``JsonFormatter`` (or ``HumanFormatter``: ``ROTATOR_LOG_FORMAT``, by default readable lines when
stderr is a terminal), ``ContextFilter`` and ``PeriodicTicksAtDebug``; every process calls it
from its command-line entry point (and Celery's ``setup_logging`` signal, so Celery leaves
logging to us). Context travels in
context variables: the request middleware binds ``request_id`` (and ``org_id`` once a caller
authenticated), Celery's task signals bind ``task_id``, and the operation worker binds
``operation_id``; every record emitted meanwhile carries them.

Never log a secret: log ids, states and counts, never headers, bodies, URLs or secrets. As a
last line of defence the formatter blanks any extra field whose name looks like it holds one.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO, Any

from rotator.settings import Settings

CONTEXT_FIELDS = ("request_id", "org_id", "operation_id", "task_id")
_vars: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"rotator_{name}", default=None) for name in CONTEXT_FIELDS
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's message again, with terminal colours
}
_SECRET_LOOKING = re.compile(
    r"secret|password|passwd|token|authorization|api_?key|header|body", re.I
)
REDACTED = "[redacted]"
_looked_at: dict[str, bool] = {}


def _secret_looking(name: str) -> bool:
    verdict = _looked_at.get(name)
    if verdict is None:
        verdict = _looked_at[name] = bool(_SECRET_LOOKING.search(name))
        if len(_looked_at) > 4096:  # field names are code, not data; bounded all the same
            _looked_at.clear()
    return verdict


def current() -> dict[str, str]:
    """The context fields bound now (only those that are set)."""
    values = {name: var.get() for name, var in _vars.items()}
    return {name: value for name, value in values.items() if value is not None}


def set_context(**values: object) -> dict[str, Token[str | None]]:
    """Bind context fields (None unbinds); returns the tokens ``reset_context`` takes."""
    tokens = {}
    for name, value in values.items():
        if name not in _vars:
            raise KeyError(f"unknown log context field: {name}")
        tokens[name] = _vars[name].set(None if value is None else str(value))
    return tokens


def reset_context(tokens: dict[str, Token[str | None]]) -> None:
    for name, token in tokens.items():
        _vars[name].reset(token)


@contextmanager
def bound(**values: object) -> Iterator[None]:
    """Bind context fields for the block: ``with bound(operation_id=op.id): ...``."""
    tokens = set_context(**values)
    try:
        yield
    finally:
        reset_context(tokens)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (a value passed in ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _vars.items():
            value = var.get()
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def _fields(record: logging.LogRecord, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The record's context fields, then its ``extra=`` fields (secret-looking ones blanked)."""
    entry: dict[str, Any] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            entry[name] = str(value)
    fields = record.__dict__
    for name in sorted(fields.keys() - _RECORD_ATTRS - skip):
        if name in entry or name.startswith("_"):
            continue
        entry[name] = REDACTED if _secret_looking(name) else fields[name]
    return entry


def _exception(record: logging.LogRecord) -> str | None:
    if record.exc_info:
        return "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", <context>, <extra fields>, "exc"?}`` per line."""

    _OWN = frozenset({"ts", "level", "logger", "message"})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record, self._OWN))
        exc = _exception(record)
        if exc:
            entry["exc"] = exc
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``16:51:37.100 INFO    rotator.dev: message  key=value ...`` for a person at a terminal:
    local time, the same fields as the JSON lines (secret-looking ones blanked), a traceback on
    the lines below."""

    # Celery repeats its message as a ``data`` dict: the JSON lines keep it, people need it once.
    _SKIP = frozenset({"data"})

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{when}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        fields = _fields(record, self._SKIP)
        if fields:
            line += "  " + " ".join(f"{name}={value}" for name, value in fields.items())
        exc = _exception(record)
        if exc:
            line += "\n" + exc
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


class PeriodicTicksAtDebug(logging.Filter):
    """Celery's INFO lines about beat's periodic ticks (sent, received, succeeded) become DEBUG
    lines: several every 15 seconds would drown what happens. A tick that finds work logs its
    own INFO line (schedules/ticks.py). ``level`` is the configured level: below DEBUG's, the
    demoted lines are dropped here (the loggers already let them through as INFO)."""

    def __init__(self, level: str = "INFO") -> None:
        super().__init__()
        from schedules.beat import TICKS

        self.ticks = frozenset(str(name) for name, _ in TICKS)
        threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        self.shown = threshold <= logging.DEBUG

    def _is_tick(self, record: logging.LogRecord) -> bool:
        if record.name == "celery.beat":  # everything beat sends is a periodic tick
            return str(record.msg).startswith("Scheduler: Sending due task")
        data = getattr(record, "data", None)  # celery.worker.strategy, celery.app.trace
        return isinstance(data, dict) and data.get("name") in self.ticks

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not record.name.startswith("celery."):
            return True
        if not self._is_tick(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.shown


def human_format(settings: Settings, stream: IO[str] | None = None) -> bool:
    """Whether log lines are written for a person: ``ROTATOR_LOG_FORMAT=human``, or ``auto``
    (the default) and ``stream`` (stderr, where the lines go) is a terminal."""
    if settings.log_format != "auto":
        return settings.log_format == "human"
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def logging_config(settings: Settings) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` dict (uvicorn applies it in each of its workers too)."""
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": "rotator.logs.ContextFilter"},
            "ticks": {"()": "rotator.logs.PeriodicTicksAtDebug", "level": level},
        },
        "formatters": {
            "json": {"()": "rotator.logs.JsonFormatter"},
            "human": {"()": "rotator.logs.HumanFormatter"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "human" if human_format(settings) else "json",
                "filters": ["context", "ticks"],
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's own lines go through our handler; the middleware logs each request.
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            # httpx logs every request's URL at INFO; a receiver's URL may carry a credential.
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
    }


def configure_logging(settings: Settings) -> None:
    """Log lines on stderr for this process (JSON, or readable ones: ``human_format``), at
    ``ROTATOR_LOG_LEVEL``. Idempotent."""
    # The lines never show the caller's file and line, thread or process: spare every record
    # those lookups (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.config.dictConfig(logging_config(settings))


# --- Celery ---------------------------------------------------------------------------------


def _celery_setup_logging(**_: object) -> None:
    from rotator.settings import get_settings

    configure_logging(get_settings())


_task_tokens: dict[str, dict[str, Token[str | None]]] = {}


def _task_started(task_id: str | None = None, **_: object) -> None:
    if task_id is not None:
        _task_tokens[task_id] = set_context(task_id=task_id)


def _task_finished(task_id: str | None = None, **_: object) -> None:
    tokens = _task_tokens.pop(task_id, None) if task_id is not None else None
    if tokens is not None:
        try:
            reset_context(tokens)
        except ValueError:  # pragma: no cover - finished in another context: just unbind
            set_context(task_id=None)


def connect_celery() -> None:
    """Celery leaves logging to ``configure_logging``; each task binds its ``task_id``."""
    from celery import signals

    signals.setup_logging.connect(_celery_setup_logging, weak=False)
    signals.task_prerun.connect(_task_started, weak=False)
    signals.task_postrun.connect(_task_finished, weak=False)
