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
