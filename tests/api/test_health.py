def test_healthz_answers_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_ready_when_stores_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_json()


def test_unknown_path_gets_the_error_body(client):
    response = client.get("/api/nope/")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_openapi_document_is_served(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.get_json()["openapi"].startswith("3.")


def _sample(client, name: str, **labels) -> float:
    """The value of one sample of GET /metrics (0 when it is not there yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_every_hold_created_and_every_refusal(client, sessions):
    from tests.factories import make_variant

    vid = make_variant(sessions, on_hand=3)
    created = _sample(client, "inventory_holds_total", event="created")
    refused = _sample(client, "inventory_rejections_total", reason="insufficient_stock")
    for user in ("m1", "m2", "m3"):
        body = {"user_id": user, "variant_id": vid, "quantity": 1}
        assert client.post("/api/cart/add/", json=body).status_code == 201
    assert client.post("/api/cart/add/", json={"user_id": "m4", "variant_id": vid, "quantity": 1}).status_code == 400
    assert _sample(client, "inventory_holds_total", event="created") == created + 3
    assert _sample(client, "inventory_rejections_total", reason="insufficient_stock") == refused + 1
