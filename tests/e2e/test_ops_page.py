"""The operators' page (/ops): its security headers, and an operator's session in a real browser.

The browser is headless Chromium from the Debian package (``/usr/bin/chromium``, which
``.ci/run`` installs), driven by Playwright for Python. ``playwright install`` is never run: the
browser Playwright downloads itself is not used. Without ``/usr/bin/chromium`` the browser test
fails, it does not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    ConsoleMessage,
    Locator,
    Page,
    Route,
    ViewportSize,
    expect,
    sync_playwright,
)

from receiver import DemoReceiver
from tests.factories import make_tenant

E2E_OVERRIDES = {"migrate_backoff_initial_seconds": 0.2, "migrate_backoff_max_seconds": 0.5}

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "test-artifacts" / "ops-page.png"
# The docs' copy (docs/operating.md) is committed: rewritten only when missing or asked for, so
# a test run does not leave a changed file in the working tree every time.
DOCS_SCREENSHOT = ROOT / "docs" / "ops-page.png"
UPDATE_DOCS = os.environ.get("ROTATOR_UPDATE_SCREENSHOTS") == "1"

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
STORAGE_KEY = "rotator.ops.apiKey"
WAIT_MS = 20_000  # the list refresh is 5 s; a migration step takes a fraction of a second

ASSETS = [
    ("/ops", "text/html; charset=utf-8"),
    ("/ops/app.js", "text/javascript; charset=utf-8"),
    ("/ops/app.css", "text/css; charset=utf-8"),
]


# --- the page's responses, without a browser ------------------------------------------------


@pytest.mark.parametrize(("path", "content_type"), ASSETS)
def test_ops_page_files_are_served_with_strict_security_headers(client, path, content_type):
    response = client.get(path)  # no key: the page holds no data
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    policy = dict(
        (directive.strip().split(" ", 1) + [""])[:2]
        for directive in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert policy[directive] == "'self'", directive
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-request-id"]


def test_ops_page_has_no_inline_code_and_keeps_the_key_out_of_persistent_storage(client):
    html = client.get("/ops").text
    assert '<script src="/ops/app.js" defer></script>' in html
    assert '<link rel="stylesheet" href="/ops/app.css">' in html
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None  # no inline script
    assert "<style" not in html
    assert " style=" not in html
    assert re.search(r"\son[a-z]+=", html) is None  # no inline event handlers
    script = client.get("/ops/app.js").text
    # (The script's comments name these too: look for uses.)
    for forbidden in (
        r"\.(innerHTML|outerHTML)\b",
        r"\binsertAdjacentHTML\(",
        r"\bdocument\.(write|cookie)\b",
        r"\blocalStorage\s*[.\[]",
        r"\beval\(",
        r"\bnew Function\(",
    ):
        assert re.search(forbidden, script) is None, forbidden
    assert "window.sessionStorage.setItem(" in script
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/ops")]


# --- the browser session --------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_api(workers: object, api_url: str) -> str:
    """The API over real HTTP for the browser, with workers behind it: ``rotator api`` in the
    real pass, a uvicorn thread of this process in the embedded one (tests/e2e/conftest.py)."""
    return api_url


def _chromium() -> str:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the operations page is tested in the Debian package's "
            "Chromium. Install it with `apt-get update && apt-get install -y chromium` "
            "(.ci/run does); never with `playwright install`.",
            pytrace=False,
        )
    return str(CHROMIUM)


def _row(page: Page, operation_id: str) -> Locator:
    return page.locator(f'[data-testid="op"][data-op-id="{operation_id}"]')


def _step(row: Locator, name: str) -> Locator:
    return row.locator(f'[data-testid="step"][data-step="{name}"]')


def _wait_state(
    http: httpx.Client, operation_id: str, states: set[str], timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = http.get(f"/v1/operations/{operation_id}").json()
        if body["state"] in states or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


class Api:
    """The operator's other window: curl, as it were, with the same key."""

    def __init__(self, http: httpx.Client, receiver: DemoReceiver):
        self.http = http
        self.receiver = receiver

    def endpoint(self) -> dict[str, Any]:
        created = self.http.post(
            "/v1/webhooks",
            json={"url": self.receiver.url, "events": ["brand.vetted"]},  # type: ignore[attr-defined]
        )
        assert created.status_code == 201, created.text
        endpoint: dict[str, Any] = created.json()
        return endpoint

    def migrate(self, endpoint: dict[str, Any]) -> dict[str, Any]:
        started = self.http.post(f"/v1/webhooks/{endpoint['id']}/migrate")
        assert started.status_code == 202, started.text
        operation: dict[str, Any] = started.json()
        return operation


@pytest.mark.e2e
def test_operator_watches_a_migration_live_and_cancels_another(live_api, database, demo_receiver):
    executable = _chromium()
    tenant = make_tenant(database)
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # 401 and 409 answers are part of the scenario; Chromium logs every non-2xx fetch.
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(message.text)

    with (
        httpx.Client(base_url=live_api, headers=tenant.headers, timeout=10) as http,
        sync_playwright() as playwright,
    ):
        api = Api(http, demo_receiver)
        browser = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            page = context.new_page()
            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.goto(f"{live_api}/ops")

            # A wrong key is rejected and not kept.
            key_input = page.get_by_test_id("key-input")
            expect(key_input).to_have_attribute("type", "password")
            key_input.fill("am_live_" + "x" * 34)
            page.get_by_test_id("key-submit").click()
            expect(page.get_by_test_id("key-error")).to_contain_text("Key rejected")
            assert page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") is None
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACT.with_name("ops-page-key-rejected.png")))

            # The real key: kept in the tab's sessionStorage, nowhere else.
            key_input.fill(tenant.api_key)
            page.get_by_test_id("key-submit").click()
            expect(page.get_by_test_id("empty-state")).to_be_visible()
            expect(page.get_by_test_id("key-status")).to_have_text(tenant.api_key[:12] + "…")
            assert page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") == tenant.api_key
            assert page.evaluate("localStorage.length") == 0
            assert context.cookies() == []
            page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads

            # 1. A migration against a receiver that knows only the old secret. The page finds
            # it by its periodic refresh and follows it: awaiting_receiver, the 401, the retries.
            first_endpoint = api.endpoint()
            demo_receiver.set_secrets([first_endpoint["secret"]])
            first = api.migrate(first_endpoint)
            row = _row(page, first["id"])
            expect(row).to_have_attribute("data-state", "awaiting_receiver", timeout=WAIT_MS)
            expect(row.get_by_test_id("op-state")).to_have_text("Awaiting receiver")
            expect(row.get_by_test_id("op-kind")).to_have_text("Safe migrate")
            expect(row.get_by_test_id("op-live")).to_be_visible()
            expect(row.get_by_test_id("op-cancel")).to_be_visible()
            waiting = _step(row, "await_success")
            expect(waiting.get_by_test_id("step-error")).to_have_text("receiver answered 401")
            expect(waiting.get_by_test_id("step-attempts")).to_have_text(
                re.compile(r"^([3-9]|\d\d+)$")
            )
            expect(waiting.get_by_test_id("step-next")).to_have_text(
                re.compile(r"^(in \d+s|due now|overdue \d+s)$")
            )
            expect(_step(row, "create_endpoint")).to_have_attribute("data-state", "succeeded")
            expect(row.get_by_test_id("fact-source")).to_have_text(first_endpoint["id"])

            # The operator installs the new secret. The list refresh is held from now on, so
            # only the operation's event stream can bring the change to the page.
            held: list[Route] = []
            list_requests = re.compile(r"/v1/operations\?")

            def hold(route: Route) -> None:
                held.append(route)

            page.route(list_requests, hold)
            demo_receiver.add_secret(first["secret"])
            expect(row).to_have_attribute("data-state", "succeeded", timeout=WAIT_MS)
            for name in ("create_endpoint", "send_test_delivery", "await_success"):
                expect(_step(row, name)).to_have_attribute("data-state", "succeeded")
            expect(_step(row, "delete_old_endpoint")).to_have_attribute("data-state", "succeeded")
            expect(row.get_by_test_id("op-cancel")).to_be_hidden()
            expect(row.get_by_test_id("op-live")).to_be_hidden()  # the stream ended with it
            page.unroute(list_requests)
            for route in held:
                route.continue_()
            assert page.evaluate("window.__sameDocument") is True

            # 2. Another migration, canceled from the page (a click, then a confirming click).
            second = api.migrate(api.endpoint())
            page.get_by_test_id("refresh").click()
            row = _row(page, second["id"])
            expect(row).to_have_attribute("data-state", "awaiting_receiver", timeout=WAIT_MS)
            cancel = row.get_by_test_id("op-cancel")
            cancel.click()
            expect(cancel).to_have_text("Confirm cancel")
            cancel.click()
            expect(row).to_have_attribute("data-state", "canceled", timeout=WAIT_MS)
            expect(cancel).to_be_hidden()
            assert http.get(f"/v1/operations/{second['id']}").json()["state"] == "canceled"
            assert http.get(f"/v1/webhooks/{second['source_endpoint_id']}").status_code == 200

            # 3. A refused cancel shows the API's message. The operation ends elsewhere (the
            # API, with the same key) after the page drew its button and before its request.
            third = api.migrate(api.endpoint())
            page.get_by_test_id("refresh").click()
            row = _row(page, third["id"])
            expect(row).to_have_attribute("data-state", "awaiting_receiver", timeout=WAIT_MS)

            def canceled_elsewhere_first(route: Route) -> None:
                assert http.post(f"/v1/operations/{third['id']}/cancel").status_code == 202
                assert _wait_state(http, third["id"], {"canceled"})["state"] == "canceled"
                route.continue_()

            cancel_url = re.compile(rf"/v1/operations/{third['id']}/cancel$")
            page.route(cancel_url, canceled_elsewhere_first)
            cancel = row.get_by_test_id("op-cancel")
            cancel.click()
            cancel.click()
            refused = row.get_by_test_id("op-action-error")
            expect(refused).to_contain_text("the operation has already ended")
            expect(refused).to_contain_text("409 CONFLICT")
            expect(row).to_have_attribute("data-state", "canceled", timeout=WAIT_MS)
            page.unroute(cancel_url)
            row.get_by_test_id("op-toggle").click()  # fold it away for the screenshot

            # 4. One left waiting for its receiver, for the screenshot.
            fourth = api.migrate(api.endpoint())
            page.get_by_test_id("refresh").click()
            row = _row(page, fourth["id"])
            expect(row).to_have_attribute("data-state", "awaiting_receiver", timeout=WAIT_MS)
            expect(_step(row, "await_success").get_by_test_id("step-attempts")).to_have_text(
                re.compile(r"^([3-9]|\d\d+)$")
            )
            expect(page.get_by_test_id("live-text")).to_have_text("Live · 1 stream")
            expect(_step(row, "await_success").get_by_test_id("step-next")).to_have_text(
                re.compile(r"^(in \d+s|due now)$")  # a retry is scheduled: show it
            )
            expect(page.get_by_test_id("op")).to_have_count(4)
            ids = page.get_by_test_id("op").evaluate_all("rows => rows.map(r => r.dataset.opId)")
            assert ids == [fourth["id"], third["id"], second["id"], first["id"]]  # newest first
            page.screenshot(path=str(ARTIFACT))
            if UPDATE_DOCS or not DOCS_SCREENSHOT.exists():
                DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ARTIFACT, DOCS_SCREENSHOT)

            # The state filter asks the API for one state only.
            page.get_by_test_id("state-filter").select_option("canceled")
            expect(page.get_by_test_id("op")).to_have_count(2)
            page.get_by_test_id("state-filter").select_option("")
            expect(page.get_by_test_id("op")).to_have_count(4)

            # 5. A bulk migrate: one row for the parent, its children as its progress bar.
            sources = [api.endpoint(), api.endpoint()]
            demo_receiver.set_secrets([endpoint["secret"] for endpoint in sources])
            started = http.post(
                "/v1/webhooks/migrate",
                json={"endpoint_ids": [e["id"] for e in sources], "max_concurrency": 1},
            )
            assert started.status_code == 202, started.text
            bulk = started.json()
            page.get_by_test_id("refresh").click()
            row = _row(page, bulk["id"])
            expect(row.get_by_test_id("op-kind")).to_have_text("Bulk migrate")
            expect(row.get_by_test_id("child-segment")).to_have_count(2, timeout=WAIT_MS)
            for item in bulk["secrets"]:
                demo_receiver.add_secret(item["secret"])
            expect(row).to_have_attribute("data-state", "succeeded", timeout=WAIT_MS)
            expect(row.get_by_test_id("op-progress-text")).to_have_text("2/2")
            expect(
                row.locator('[data-testid="child-segment"][data-state="succeeded"]')
            ).to_have_count(2)
            expect(page.get_by_test_id("op")).to_have_count(5)  # children are not rows of their own

            # 6. A remote migrate, named by its provider: this same API, another organization's
            # account, whose receiver learns the new secret from reveal-secret.
            account = make_tenant(database, name="Account at the provider")
            at_remote = http.post(
                "/v1/webhooks",
                json={"url": demo_receiver.url, "events": ["brand.vetted"]},
                headers=account.headers,
            ).json()
            demo_receiver.add_secret(at_remote["secret"])
            provider = http.post(
                "/v1/providers",
                json={"name": "AgentMessage EU", "base_url": live_api, "api_key": account.api_key},
            )
            assert provider.status_code == 201, provider.text
            remote = http.post(
                f"/v1/providers/{provider.json()['id']}/webhooks/{at_remote['id']}/migrate"
            ).json()
            page.get_by_test_id("refresh").click()
            row = _row(page, remote["id"])
            expect(row.get_by_test_id("op-kind")).to_have_text("Remote migrate")
            expect(row.get_by_test_id("op-provider")).to_have_text("at AgentMessage EU")
            revealed = http.post(f"/v1/operations/{remote['id']}/reveal-secret")
            until = time.monotonic() + WAIT_MS / 1000
            while revealed.status_code == 409 and time.monotonic() < until:  # not created yet
                time.sleep(0.2)
                revealed = http.post(f"/v1/operations/{remote['id']}/reveal-secret")
            assert revealed.status_code == 200, revealed.text
            demo_receiver.add_secret(revealed.json()["secret"])
            expect(row).to_have_attribute("data-state", "succeeded", timeout=WAIT_MS)

            # Forgetting the key clears the tab.
            page.get_by_test_id("forget-key").click()
            expect(page.get_by_test_id("key-panel")).to_be_visible()
            expect(page.get_by_test_id("op")).to_have_count(0)
            assert page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") is None
            assert page.evaluate("window.__sameDocument") is True
        finally:
            browser.close()
            # Leave no migration running into the next test's empty tables.
            for operation in http.get("/v1/operations").json()["data"]:
                if operation["finished_at"] is None:
                    http.post(f"/v1/operations/{operation['id']}/cancel")
                    _wait_state(http, operation["id"], {"canceled", "rolled_back", "failed"})

    assert problems == [], problems  # no script error, no Content-Security-Policy violation
