"""What ``rotator dev`` prints: readable lines on a terminal, JSON lines otherwise, and beat's
periodic ticks only at DEBUG."""

from __future__ import annotations

import json
import os
import pty
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.processes import BIN, free_port, rotator_env, start, stop, wait_http

pytestmark = pytest.mark.e2e

TICKS = {"delivery.reconcile", "operation.reconcile", "policy.tick", "org_secret.sweep"}
# Every tick runs within a second or two (the longest period is 30 s x 0.05).
FAST_BEAT = {"ROTATOR_BEAT_PERIOD_SCALE": "0.05"}
HUMAN_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")


def _wait_for_every_tick(data_dir: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until each periodic tick has run at least once (its heartbeat row exists)."""
    deadline = time.monotonic() + 30
    database = data_dir / "rotator.db"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "rotator dev exited"
        if database.exists():
            with sqlite3.connect(database) as connection:
                try:
                    names = {row[0] for row in connection.execute("SELECT name FROM heartbeats")}
                except sqlite3.OperationalError:  # not migrated yet
                    names = set()
            if names >= TICKS:
                return
        time.sleep(0.2)
    raise TimeoutError("the periodic ticks did not all run within 30s")


def _is_tick_line(text: str) -> bool:
    return "Sending due task" in text or any(f"Task {tick}[" in text for tick in TICKS)


def test_on_a_terminal_lines_are_readable_and_ticks_are_quiet(tmp_path):
    port = free_port()
    env = rotator_env(**FAST_BEAT)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "rotator"), "dev", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    chunks: list[bytes] = []

    def drain() -> None:  # a full terminal buffer would block the process
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        log = tmp_path / "unused.log"
        log.write_text("(output went to the terminal)")
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        _wait_for_every_tick(tmp_path / ".rotator", proc)
    finally:
        stop(proc)
        reader.join(timeout=10)
        os.close(controller)
    lines = [line for line in b"".join(chunks).decode().splitlines() if line.strip()]
    assert lines, "rotator dev printed nothing"
    assert not [line for line in lines if line.lstrip().startswith("{")], "JSON on a terminal"
    assert any(
        HUMAN_LINE.match(line) and "INFO    rotator.dev: embedded worker and beat" in line
        for line in lines
    ), lines
    assert not [line for line in lines if _is_tick_line(line)], "tick lines at INFO"


def test_piped_lines_are_json_and_ticks_are_debug_lines(tmp_path):
    port = free_port()
    env = rotator_env(ROTATOR_LOG_LEVEL="DEBUG", **FAST_BEAT)
    log = tmp_path / "dev.log"
    proc = start([str(BIN / "rotator"), "dev", "--port", str(port)], env, log, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        _wait_for_every_tick(tmp_path / ".rotator", proc)
    finally:
        stop(proc)
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    ticks = [entry for entry in entries if _is_tick_line(entry["message"])]
    assert {entry["level"] for entry in ticks} == {"DEBUG"}
    sent = {m.group(1) for e in ticks if (m := re.search(r"due task (\S+)", e["message"]))}
    assert sent == TICKS
    assert any(e["logger"] == "rotator.dev" and e["level"] == "INFO" for e in entries)
