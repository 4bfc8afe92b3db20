"""``ROTATOR_DOCS``: /docs and /redoc are served (with a strict policy) or absent."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.support import overridden


def _client_with(settings, **values) -> TestClient:
    with overridden(settings, **values):
        return TestClient(create_app(), raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("values", "served"),
    [
        ({"docs": "auto", "env": "development"}, True),
        ({"docs": "auto", "env": "production"}, False),
        ({"docs": "on", "env": "production"}, True),
        ({"docs": "off", "env": "development"}, False),
    ],
)
def test_docs_follow_the_setting_and_openapi_json_stays(settings, values, served):
    client = _client_with(settings, **values)
    for path in ("/docs", "/redoc"):
        response = client.get(path)
        if served:
            assert response.status_code == 200
            assert "text/html" in response.headers["content-type"]
        else:
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "NOT_FOUND"
    assert client.get("/openapi.json").status_code == 200


def test_served_docs_carry_a_policy_that_admits_only_their_own_scripts(settings):
    client = _client_with(settings, docs="on")
    response = client.get("/docs")
    policy = dict(
        part.strip().split(" ", 1)
        for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    scripts = policy["script-src"].split()
    assert "'unsafe-inline'" not in scripts
    assert "'unsafe-eval'" not in scripts
    # The page's one inline script is admitted by its hash, and is the script the page holds.
    inline = re.findall(rb"<script>(.*?)</script>", response.content, re.S)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0]).digest()).decode()
    assert f"'sha256-{digest}'" in scripts
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "content-security-policy" in client.get("/redoc").headers
