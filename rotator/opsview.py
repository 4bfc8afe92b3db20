"""The operators' terminal view of operations (``rotator ops list`` / ``rotator ops watch``).

It reads the database directly, like the other operator commands: no API key is needed on the
operator's host, only ``ROTATOR_DATABASE_URL``.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from models import clock
from models.db import Database
from models.operation import TERMINAL_STATES, Operation, OperationKind, OperationState, StepState
from models.provider import Provider

EXIT_SUCCEEDED, EXIT_ENDED_OTHERWISE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 130
_STEP_MARKS = {
    StepState.PENDING: " ",
    StepState.RUNNING: ">",
    StepState.SUCCEEDED: "✓",
    StepState.FAILED: "✗",
    StepState.SKIPPED: "-",
}


def _short(value: datetime | None) -> str:
    return clock.rfc3339(value) if value else "-"


def _in(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = (value - clock.now()).total_seconds()
    return f"in {seconds:.0f}s" if seconds >= 0 else f"{-seconds:.0f}s ago"


def list_operations(
    db: Database,
    out: TextIO,
    *,
    org_id: uuid.UUID | None = None,
    state: str | None = None,
    limit: int = 50,
) -> int:
    """Top-level operations, newest first; a bulk migrate's children folded under it."""
    with db.session() as session:
        query = (
            select(Operation)
            .where(Operation.parent_id.is_(None))
            .order_by(Operation.created_at.desc(), Operation.id.desc())
        )
        if org_id is not None:
            query = query.where(Operation.org_id == org_id)
        if state is not None:
            query = query.where(Operation.state == state)
        rows = session.scalars(query.limit(limit)).all()
        out.write(f"{'ID':38}  {'KIND':19}  {'STATE':17}  {'STEP':19}  CREATED\n")
        for operation in rows:
            out.write(_row(operation, ""))
            if operation.kind == OperationKind.BULK_MIGRATE:
                for child in children_of(session, operation):
                    out.write(_row(child, "└ "))
    return 0


def _row(operation: Operation, indent: str) -> str:
    current = operation.current_step()
    step = current.name if current and not operation.finished else "-"
    if operation.kind == OperationKind.BULK_MIGRATE:
        step = "-"
    ident = f"{indent}{operation.id}"
    return (
        f"{ident:38}  {operation.kind:19}  {operation.state:17}  {step:19}  "
        f"{_short(operation.created_at)}\n"
    )


def children_of(session: Session, operation: Operation) -> list[Operation]:
    return list(
        session.scalars(
            select(Operation)
            .where(Operation.parent_id == operation.id)
            .order_by(Operation.created_at, Operation.id)
        )
    )


def _counts(kids: Sequence[Operation]) -> str:
    counts: dict[str, int] = {}
    for child in kids:
        counts[child.state] = counts.get(child.state, 0) + 1
    shown = " ".join(f"{state}={counts[state]}" for state in OperationState if state in counts)
    return f"total={len(kids)} {shown}".strip()


def _unfinished(kids: Sequence[Operation]) -> list[str]:
    lines = []
    for child in kids:
        if child.state in TERMINAL_STATES:
            continue
        current = child.current_step()
        waiting = child.started_at is None
        step = "waiting for room" if waiting else (current.name if current else "-")
        lines.append(f"{child.id} {child.source_endpoint_id} {child.state} {step}")
    return lines


def _endpoints(operation: Operation, none_yet: str) -> str:
    """Old -> new; a remote migrate's remote ids, at its provider (named)."""
    source = operation.source_endpoint_id or operation.remote_source_id
    new = operation.new_endpoint_id or operation.remote_new_id or none_yet
    pair = f"{source} -> {new}"
    session = object_session(operation)
    if operation.provider_id is None or session is None:
        return pair
    provider = session.get(Provider, operation.provider_id)
    name = provider.name if provider is not None else "?"
    return f"{pair} at provider {name!r} ({operation.provider_id})"


def render(operation: Operation, kids: Sequence[Operation] = ()) -> str:
    head = [
        f"operation {operation.id}  {operation.kind}  trigger={operation.trigger}",
        f"state     {operation.state}"
        + (
            f"  error={operation.error_code}: {operation.error_message}"
            if operation.error_code
            else ""
        ),
    ]
    if operation.kind == OperationKind.BULK_MIGRATE:
        lines = [
            *head,
            f"children  {_counts(kids)}  max_concurrency={operation.params.get('max_concurrency')}",
            "",
            "    unfinished (child, old endpoint, state, step)",
            *(f"    {line}" for line in _unfinished(kids)),
        ]
        return "\n".join(lines) + "\n"
    lines = [
        *head,
        f"endpoints {_endpoints(operation, '(not yet)')}",
        f"deadline  {_short(operation.deadline_at)} ({_in(operation.deadline_at)})",
        "",
        f"    {'STEP':21} {'STATE':10} {'TRIES':>5}  {'NEXT ATTEMPT':14} LAST ERROR",
    ]
    for step in operation.steps:
        mark = _STEP_MARKS.get(StepState(step.state), "?")
        next_at = _in(step.next_attempt_at) if step.state == StepState.RUNNING else "-"
        lines.append(
            f"  {mark} {step.name:21} {step.state:10} {step.attempts:>5}  {next_at:14} "
            f"{step.last_error or ''}"
        )
    return "\n".join(lines) + "\n"


def _facts(operation: Operation, kids: Sequence[Operation] = ()) -> dict[str, str]:
    """What ``watch`` reports line by line off a terminal, in the order it prints them: the
    endpoints, each step (state, tries, last error), then the operation's state (and error).
    Relative times are left out: they change on every poll without anything happening."""
    facts = {"endpoints": _endpoints(operation, "-")}
    if operation.kind == OperationKind.BULK_MIGRATE:
        facts = {"children": _counts(kids)}
        for child in kids:
            current = child.current_step()
            where = "waiting" if child.started_at is None else (current.name if current else "-")
            facts[f"child {child.id}"] = f"{child.state} {where}"
    for step in operation.steps:
        fact = f"{step.state} tries={step.attempts}"
        if step.next_attempt_at is not None and step.state == StepState.RUNNING:
            fact += f" next_attempt={_short(step.next_attempt_at)}"
        if step.last_error:
            fact += f" last_error={step.last_error}"
        facts[f"step {step.name}"] = fact
    state = str(operation.state)
    if operation.error_code:
        state += f" error={operation.error_code}: {operation.error_message}"
    facts["state"] = state
    return facts


def change_lines(
    operation: Operation, before: dict[str, str] | None, facts: dict[str, str]
) -> list[str]:
    """One line per fact that changed since ``before`` (every fact the first time)."""
    prefix = f"{clock.rfc3339(clock.now())} operation {operation.id}"
    lines = []
    if before is None:
        lines.append(f"{prefix} {operation.kind} trigger={operation.trigger}")
    for name, value in facts.items():
        if before is None or before.get(name) != value:
            lines.append(f"{prefix} {name} {value}")
    return lines


def watch(
    db: Database, operation_id: uuid.UUID, out: TextIO | None = None, *, interval: float = 0.5
) -> int:
    """Follow the operation until it ends: 0 when it succeeded, 1 when it ended otherwise.

    On a terminal the view is redrawn in place; otherwise (a pipe, a log file, CI) each change
    is one line, so the output reads as a log."""
    out = out or sys.stdout
    live = out.isatty()
    last_facts: dict[str, str] | None = None
    try:
        while True:
            with db.session() as session:
                operation = session.get(Operation, operation_id)
                if operation is None:
                    out.write(f"operation {operation_id} not found\n")
                    return EXIT_NOT_FOUND
                kids = (
                    children_of(session, operation)
                    if operation.kind == OperationKind.BULK_MIGRATE
                    else []
                )
                if live:
                    out.write("\x1b[H\x1b[2J" + render(operation, kids))
                else:
                    facts = _facts(operation, kids)
                    for line in change_lines(operation, last_facts, facts):
                        out.write(line + "\n")
                    last_facts = facts
                finished, state = operation.finished, operation.state
            out.flush()
            if finished:
                return EXIT_SUCCEEDED if state == OperationState.SUCCEEDED else EXIT_ENDED_OTHERWISE
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
