"""The operators' terminal view of operations (``rotator ops list`` / ``rotator ops watch``).

It reads the database directly, like the other operator commands: no API key is needed on the
operator's host, only ``ROTATOR_DATABASE_URL``.
"""

from __future__ import annotations

import sys
import time
import uuid
from datetime import datetime
from typing import TextIO

from sqlalchemy import select

from models import clock
from models.db import Database
from models.operation import Operation, OperationState, StepState

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
    with db.session() as session:
        query = select(Operation).order_by(Operation.created_at.desc(), Operation.id.desc())
        if org_id is not None:
            query = query.where(Operation.org_id == org_id)
        if state is not None:
            query = query.where(Operation.state == state)
        rows = session.scalars(query.limit(limit)).all()
        out.write(f"{'ID':36}  {'KIND':19}  {'STATE':17}  {'STEP':19}  CREATED\n")
        for operation in rows:
            current = operation.current_step()
            step = current.name if current and not operation.finished else "-"
            out.write(
                f"{operation.id!s:36}  {operation.kind:19}  {operation.state:17}  {step:19}  "
                f"{_short(operation.created_at)}\n"
            )
    return 0


def render(operation: Operation) -> str:
    lines = [
        f"operation {operation.id}  {operation.kind}  trigger={operation.trigger}",
        f"state     {operation.state}"
        + (
            f"  error={operation.error_code}: {operation.error_message}"
            if operation.error_code
            else ""
        ),
        f"endpoints {operation.source_endpoint_id} -> {operation.new_endpoint_id or '(not yet)'}",
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


def _facts(operation: Operation) -> dict[str, str]:
    """What ``watch`` reports line by line off a terminal, in the order it prints them: the
    endpoints, each step (state, tries, last error), then the operation's state (and error).
    Relative times are left out: they change on every poll without anything happening."""
    facts = {"endpoints": f"{operation.source_endpoint_id} -> {operation.new_endpoint_id or '-'}"}
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
                if live:
                    out.write("\x1b[H\x1b[2J" + render(operation))
                else:
                    facts = _facts(operation)
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
