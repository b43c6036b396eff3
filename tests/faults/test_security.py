"""Nobody in where they do not belong: keys on every write operation, keys compared in constant
time, no secret in a log line or an error body, the body limit, the per-customer cap under a burst."""
from __future__ import annotations

import hmac
import io
import logging
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app import create_app
from app.api import auth
from app.composition import Container
from app.settings import load_settings
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, wait_for
from tests.factories import make_variant
from tests.faults.conftest import PYTHON, assert_orders_durable, assert_stock_exact, raw_redis
from tests.faults.test_hostile_inputs import snapshot

WRITE = {"post", "put", "patch", "delete"}
STOREFRONT_PATHS = ("/api/cart", "/api/orders")


@pytest.fixture
def secured(auth_env, build):
    return build(auth_env)


def _operations(client):
    spec = client.get("/openapi.json").get_json()
    for path, item in spec["paths"].items():
        for method in item:
            if method in WRITE:
                concrete = re.sub(r"\{[^}]*\}", lambda m: "1~u1" if m.group(0) == "{ref}" else "1", path)
                yield method.upper(), path, concrete


def test_every_write_operation_in_the_openapi_document_needs_a_key_and_the_right_role(secured):
    client, _ = secured
    ops = list(_operations(client))
    # the document lists every write route of the app: none can hide from this test
    routes = {(m, r.rule) for r in client.application.url_map.iter_rules() for m in r.methods
              if m.lower() in WRITE and not r.rule.startswith("/docs")}
    documented = {(m, re.sub(r"\{(\w+)\}", r"<\1>", p)) for m, p, _ in ops}
    undocumented = {(m, re.sub(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>", r"<\1>", rule)) for m, rule in routes} - documented
    assert not undocumented, undocumented
    assert len(ops) >= 20

    for method, path, concrete in ops:
        for headers in ({}, {"Authorization": "Bearer not-a-key-at-all"}, {"Authorization": f"Basic {ADMIN_KEY}"},
                        {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"}, {"Authorization": f"Bearer {ADMIN_KEY}x"}):
            response = client.open(concrete, method=method, json={}, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.get_json())
            assert response.get_json()["error"]["code"] == "unauthorized"
        storefront = client.open(concrete, method=method, json={},
                                 headers={"Authorization": f"Bearer {STOREFRONT_KEY}"})
        if path.startswith(STOREFRONT_PATHS):
            assert storefront.status_code not in (401, 403), (method, path)
        else:
            assert storefront.status_code == 403, (method, path, storefront.get_json())
            assert storefront.get_json()["error"]["code"] == "forbidden"
        admin = client.open(concrete, method=method, json={}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert admin.status_code not in (401, 403, 500), (method, path)


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    """Whichever key matches, or none, every configured key is compared with hmac.compare_digest."""
    keys = {f"key-number-{i:04d}": ("admin" if i % 2 else "storefront") for i in range(6)}
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented, role in (("key-number-0000", "storefront"), ("key-number-0005", "admin"),
                            ("key-number-0006", None), ("", None), ("key-number-000", None)):
        calls.clear()
        assert auth.role_of(keys, presented) == role
        assert len(calls) == len(keys), presented
        assert {a for a, _ in calls} == {k.encode() for k in keys}


def test_no_key_dsn_or_password_in_logs_or_error_bodies(auth_env, clean_stores, own_redis, caplog, tmp_path):
    """Keys, the Redis password and the database password never leave the process through a log
    line or a response, whatever goes wrong."""
    redis_password = "faults-redis-secret-7f3a"
    db_password = "faults-db-secret-91c2"
    server = own_redis()
    raw_redis(server.url).config_set("requirepass", redis_password)
    redis_url = server.url.replace("redis://", f"redis://:{redis_password}@")
    database_url = auth_env["DATABASE_URL"]
    if database_url.startswith("postgres"):
        # trust authentication ignores the password, but the client holds it in its DSN
        database_url = re.sub(r"://([^:@/]+)@", rf"://\1:{db_password}@", database_url)
    env = {**auth_env, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "LOG_LEVEL": "DEBUG"}
    secrets = [ADMIN_KEY, STOREFRONT_KEY, redis_password, db_password]
    bodies = []
    caplog.set_level(logging.DEBUG)

    container = Container(load_settings(env))
    try:
        app = create_app(container=container)
        client = app.test_client()
        vid = make_variant(container.sessions, on_hand=5)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        shop = {"Authorization": f"Bearer {STOREFRONT_KEY}"}
        for response in (
            client.post("/api/cart/add/", json={"user_id": 1, "variant_id": vid, "quantity": 1}, headers=shop),
            client.post("/api/cart/add/", json={"user_id": 1, "variant_id": vid, "quantity": 99}, headers=shop),
            client.post("/api/inventory/1/adjust/", json={"delta": 1, "reason": "x"}, headers=shop),
            client.get("/api/inventory/", headers={"Authorization": f"Bearer {ADMIN_KEY}-wrong"}),
            client.get("/api/inventory/", headers={"Authorization": f"Bearer {redis_password}"}),
            client.post("/api/products/", data="{bad", content_type="application/json", headers=admin),
            client.get("/readyz"),
        ):
            bodies.append(response)
        server.stop()  # Redis goes away: 503s, readiness, logged warnings
        for response in (
            client.post("/api/cart/add/", json={"user_id": 1, "variant_id": vid, "quantity": 1}, headers=shop),
            client.get("/api/cart/1/", headers=shop),
            client.post("/api/ops/reconcile/", json={}, headers=admin),
            client.get("/readyz"),
        ):
            assert response.status_code == 503
            bodies.append(response)
        if database_url.startswith("postgres"):
            # the database goes away too: the same DSN, password and all, on a closed port
            from sqlalchemy.engine import make_url

            gone = make_url(database_url).set(port=1).render_as_string(hide_password=False)
            broken = Container(load_settings({**env, "DATABASE_URL": gone}))
            try:
                broken_client = create_app(container=broken).test_client()
                for response in (broken_client.get("/readyz"),
                                 broken_client.get("/api/orders/", headers=shop),
                                 broken_client.get("/api/products/")):
                    assert response.status_code == 503
                    bodies.append(response)
            finally:
                broken.close()
    finally:
        container.close()

    status = subprocess.run([PYTHON, "-m", "app.cli", "status"], env={**env, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    outputs = [caplog.text, status.stdout, status.stderr]
    outputs += [r.get_data(as_text=True) + str(dict(r.headers)) for r in bodies]
    for text in outputs:
        for secret in secrets:
            assert secret not in text, f"a secret leaked: {text[:500]}"
    assert "***" in status.stdout  # the status command shows the URLs, redacted


def test_the_body_limit_is_enforced_with_and_without_a_content_length(auth_env, build):
    client, c = build({**auth_env, "MAX_BODY_BYTES": "2048"})
    vid = make_variant(c.sessions, on_hand=5)
    headers = {"Authorization": f"Bearer {STOREFRONT_KEY}", "Content-Type": "application/json"}
    valid = f'{{"user_id": "big", "variant_id": {vid}, "quantity": 1}}'.encode()
    chunked = {"Transfer-Encoding": "chunked"}
    terminated = {"wsgi.input_terminated": True}
    before = snapshot(c)
    # valid JSON followed by padding: cut off at the limit it would still parse, so it must be refused whole
    padded = valid + b" " * 4096
    for response in (
        client.post("/api/cart/add/", data=padded, headers=headers),
        client.post("/api/cart/add/", input_stream=io.BytesIO(padded), headers={**headers, **chunked},
                    environ_overrides=terminated),
        client.post("/api/cart/add/", data=b"x" * 10_000_000, headers=headers),
    ):
        assert response.status_code == 413, response.get_data(as_text=True)[:200]
        assert response.get_json()["error"]["code"] == "payload_too_large"
    assert snapshot(c) == before
    # a chunked body under the limit still works
    ok = client.post("/api/cart/add/", input_stream=io.BytesIO(valid), headers={**headers, **chunked},
                     environ_overrides=terminated)
    assert ok.status_code == 201, ok.get_json()


@pytest.mark.parametrize("quantities", [[1] * 24, [1, 2] * 12])
def test_the_per_customer_cap_holds_under_a_concurrent_burst_from_one_customer(auth_env, build, quantities, capsys):
    cap = 3
    client, c = build({**auth_env, "MAX_UNITS_PER_CUSTOMER": str(cap)})
    vid = make_variant(c.sessions, on_hand=100)
    headers = {"Authorization": f"Bearer {STOREFRONT_KEY}"}
    barrier = threading.Barrier(len(quantities))

    def add(qty):
        barrier.wait(10)
        return qty, client.post("/api/cart/add/", json={"user_id": "greedy", "variant_id": vid, "quantity": qty},
                                headers=headers)

    with ThreadPoolExecutor(len(quantities)) as pool:
        results = list(pool.map(add, quantities))
    won = [qty for qty, r in results if r.status_code == 201]
    refused = [r for _, r in results if r.status_code != 201]
    assert all(r.status_code == 400 and r.get_json()["error"]["code"] in ("limit_exceeded",) for r in refused), \
        [r.get_json() for r in refused]
    held = c.holds.counters([vid])[vid].reserved
    assert held == sum(won) <= cap
    if quantities == [1] * 24:
        assert len(won) == cap  # exactly the cap succeeds
    assert_stock_exact(c, [vid])
    # the cart shows what is held: a slow writer of an older quantity must not win
    wait_for(lambda: client.get("/api/cart/greedy/", headers=headers).get_json()["items"][0]["quantity"] == held,
             timeout=2, message="the cart line to show the held quantity")
    # and ordering what is held cannot pass the cap either
    order = client.post("/api/cart/greedy/checkout/", headers=headers)
    assert order.status_code == 201
    assert_orders_durable(c, [order.get_json()])
    assert_stock_exact(c, [vid])
    again = client.post("/api/cart/add/", json={"user_id": "greedy", "variant_id": vid, "quantity": 1},
                        headers=headers)
    assert held < cap or again.get_json()["error"]["code"] == "limit_exceeded"
    with capsys.disabled():
        print(f"\n[cap {cap}, burst of {len(quantities)} adds of {sorted(set(quantities))}] {len(won)} succeeded "
              f"holding {held} units, {len(refused)} refused limit_exceeded")
