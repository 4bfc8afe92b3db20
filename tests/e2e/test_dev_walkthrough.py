"""The README walk-through, against a real ``rotator dev`` process on a fresh data directory."""

import json
import signal
import subprocess

import httpx
import pytest

from tests.processes import BIN, free_port, rotator_env, start, stop, wait_http

pytestmark = pytest.mark.e2e


def test_rotator_dev_serves_the_walkthrough_on_a_fresh_directory(tmp_path):
    port = free_port()
    env = rotator_env()  # nothing configured: the embedded defaults, as a new user has
    log = tmp_path / "dev.log"
    proc = start([str(BIN / "rotator"), "dev", "--port", str(port)], env, log, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", proc, log)
        assert (tmp_path / ".rotator" / "rotator.db").exists()
        assert (tmp_path / ".rotator" / "encryption.key").exists()

        created_org = subprocess.run(
            [str(BIN / "rotator"), "orgs", "create", "--name", "Acme"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            check=True,
            text=True,
        )
        key = json.loads(created_org.stdout)["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=auth, timeout=10) as http:
            # rotator dev allows http:// and loopback targets, for local receivers.
            created = http.post(
                "/v1/webhooks",
                json={"url": "http://127.0.0.1:9000/hooks", "events": ["brand.vetted"]},
            )
            assert created.status_code == 201, created.text
            endpoint = created.json()
            assert endpoint["secret_displayed_once"] is True
            listed = http.get("/v1/webhooks").json()
            assert [item["id"] for item in listed["data"]] == [endpoint["id"]]
            patched = http.patch(
                f"/v1/webhooks/{endpoint['id']}", json={"description": "local receiver"}
            )
            assert patched.json()["description"] == "local receiver"
            rotated = http.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret")
            assert rotated.status_code == 200
            assert rotated.json()["secret"] != endpoint["secret"]
            assert http.delete(f"/v1/webhooks/{endpoint['id']}").status_code == 204
            assert http.get(f"/v1/webhooks/{endpoint['id']}").status_code == 404
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0, log.read_text()
