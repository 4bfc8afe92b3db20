"""Real processes for end-to-end tests: free ports, readiness waits, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rotator_env(**overrides: str) -> dict[str, str]:
    """The current environment minus every ROTATOR_ setting, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    env.update(overrides)
    return env


def start(
    args: list[str], env: Mapping[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        args,
        env=dict(env),
        cwd=cwd,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_worker(env: Mapping[str, str], log: Path, hostname: str) -> subprocess.Popen[bytes]:
    """``rotator worker`` as the end-to-end tests run it (two processes, no mingle or gossip),
    logging to ``log`` and working in its folder."""
    command = [str(BIN / "rotator"), "worker", "--loglevel=INFO", "--concurrency=2"]
    command += ["--without-mingle", "--without-gossip", f"--hostname={hostname}"]
    return start(command, env, log, cwd=log.parent)


def start_beat(env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``rotator beat``, logging to ``log``, its schedule file next to it."""
    schedule = log.parent / "celerybeat-schedule"
    command = [str(BIN / "rotator"), "beat", "--loglevel=INFO", f"--schedule={schedule}"]
    return start(command, env, log, cwd=log.parent)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal the process group and wait; kill it if it does not exit in time."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    return proc.returncode
