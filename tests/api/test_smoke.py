from tests.factories import endpoint_body, make_tenant


def test_create_then_get(client, database):
    tenant = make_tenant(database)
    created = client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers)
    assert created.status_code == 201, created.text
    got = client.get(f"/v1/webhooks/{created.json()['id']}", headers=tenant.headers)
    assert got.status_code == 200
    assert "secret" not in got.json()
