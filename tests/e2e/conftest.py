"""End-to-end fixtures: in the real pass, the API the tests call is ``rotator api`` itself.

Real pass: one ``rotator api`` process per test module, started with the module's end-to-end
settings (``e2e_settings``, handed over as its environment) on the pass's PostgreSQL and Redis;
``client`` is an HTTP client to it, and ``api_url`` its base URL for browsers and raw clients.
What a test then sees is what a deployment answers: its own process, its own pools and caches,
its own Celery producer. Embedded pass: SQLite and the in-memory broker belong to the test
process, so the API runs in it (``client`` is Starlette's in-process client, ``api_url`` a
uvicorn thread), sharing the live settings object the module's fixtures override.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from rotator.settings import Settings
from tests.live import serve_api
from tests.processes import BIN, free_port, rotator_env, start, stop, wait_http
from tests.support import BACKEND, settings_env


@pytest.fixture(scope="module")
def api_url(e2e_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of the API this module's tests call over real HTTP."""
    if BACKEND != "real":
        with serve_api("e2e-api") as url:
            yield url
        return
    folder = tmp_path_factory.mktemp("api")
    port, log = free_port(), folder / "api.log"
    env = {**rotator_env(), **settings_env(e2e_settings)}
    command = [str(BIN / "rotator"), "api", "--port", str(port)]
    proc = start(command, env, log, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, log)
        yield url
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0, f"rotator api exited with {code}:\n{log.read_text(errors='replace')}"


@pytest.fixture
def client(app: object, request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """The API as the tests call it: ``rotator api`` over HTTP in the real pass."""
    if BACKEND != "real":
        with TestClient(app, raise_server_exceptions=False) as test_client:  # type: ignore[arg-type]
            yield test_client
        return
    base_url = request.getfixturevalue("api_url")
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


@pytest.fixture
def local_client(app: object) -> Iterator[TestClient]:
    """The API in this test process, in both passes: for tests that watch it from inside (the
    task messages it publishes, its log records)."""
    with TestClient(app, raise_server_exceptions=False) as test_client:  # type: ignore[arg-type]
        yield test_client
