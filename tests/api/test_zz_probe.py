import base64, json
from tests.factories import endpoint_body, make_tenant

def test_probe(client, database):
    t = make_tenant(database)
    h = t.headers
    def show(r): print(r.request.method, r.request.url, r.status_code, r.text[:300], dict(r.headers).get("x-request-id"))
    show(client.post("/v1/webhooks", json=endpoint_body(api_version=""), headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(url="https://a.com/\u0000x"), headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(description="a\u0000b"), headers=h))
    show(client.post("/v1/webhooks", content=b'{"url": "https://a.com/\\ud800", "events": ["brand.vetted"]}', headers=h))
    show(client.post("/v1/webhooks", content=b"[" * 200000 + b"]" * 200000, headers=h))
    for c in [["2024-01-01T00:00:00+00:00", 5], ["0001-01-01T00:00:00+01:00", "0190a1b2-0000-7000-8000-000000000000"], ["9999-12-31T23:59:59-01:00", "0190a1b2-0000-7000-8000-000000000000"], {"a": 1, "b": 2}, 7, "xx", ["2024-01-01T00:00:00", "0190a1b2-0000-7000-8000-000000000000"]]:
        cur = base64.urlsafe_b64encode(json.dumps(c).encode()).decode().rstrip("=")
        show(client.get("/v1/webhooks", params={"cursor": cur}, headers=h))
    show(client.get("/v1/webhooks", params={"cursor": "é!!"}, headers=h))
    show(client.put("/v1/webhooks", headers=h))
    show(client.get("/nope"))
    show(client.get("/v1/webhooks/not-a-uuid", headers=h))
    show(client.post("/v1/webhooks", content=b"x" * (1024 * 1024 + 1), headers=h))
    def gen():
        for _ in range(20):
            yield b"x" * 100000
    show(client.post("/v1/webhooks", content=gen(), headers=h))
    show(client.patch("/v1/webhooks/0190a1b2-0000-7000-8000-000000000000", json={"active": None}, headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(url="https://[::1/x"), headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(url="https://a.com:99999/x"), headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(url="https://"), headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(url="https://:80"), headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(url="https://a.com/\x7f"), headers=h))
    show(client.post("/v1/webhooks", json=endpoint_body(description="x"*199 + "\U0001F600"), headers=h))
    show(client.get("/v1/webhooks", params={"limit": "abc"}, headers=h))
    show(client.get("/v1/webhooks", headers={"Authorization": ("Bearer am_live_" + "é"*34).encode()}))
