"""GET /metrics on a real Redis and database: every family of API.md in one scrape, gauges that
follow the stores, the release lag, the jobs' last success, store errors, and one scrape summing
several processes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

import jobs.tasks
from app import clock, keys
from tests.factories import make_variant, make_variants

FAMILIES = {  # API.md, Operations: name -> type
    "inventory_holds": "counter",
    "inventory_rejections": "counter",
    "inventory_reconcile_drift": "counter",
    "inventory_request_seconds": "histogram",
    "inventory_units": "gauge",
    "inventory_holds_live": "gauge",
    "inventory_invariant_violations": "gauge",
    "inventory_release_lag_seconds": "histogram",
    "inventory_job_last_success_timestamp_seconds": "gauge",
    "inventory_store_errors": "counter",
}


def scrape(client) -> dict:
    """{family name: family} of one GET /metrics."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.get_data(as_text=True))}


def value(families: dict, family: str, sample: str | None = None, **labels) -> float | None:
    """One sample's value, None when the scrape has no such sample."""
    for s in families[family].samples if family in families else ():
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


@pytest.fixture
def jobs_container(container):
    jobs.tasks.use_container(container)
    yield container
    jobs.tasks.use_container(None)


def test_one_scrape_has_every_family_of_the_contract_with_its_type(client, sessions):
    make_variant(sessions)
    families = scrape(client)
    assert {name: families[name].type for name in FAMILIES if name in families} == FAMILIES


def test_every_label_of_the_counters_is_there_from_the_start(client):
    families = scrape(client)
    for event in ("created", "released", "expired", "committed"):
        assert value(families, "inventory_holds", "inventory_holds_total", event=event) is not None, event
    for store in ("redis", "database"):
        assert value(families, "inventory_store_errors", "inventory_store_errors_total", store=store) is not None


def test_the_unit_and_hold_gauges_are_the_stores_sums_at_scrape_time(client, container, sessions):
    a, b = make_variants(sessions, 2, on_hand=10)
    container.holds.reserve(a, "g1", 3)
    hold = container.holds.reserve(b, "g2", 1)
    container.holds.reserve(b, "g3", 2)
    families = scrape(client)
    assert value(families, "inventory_units", state="on_hand") == 20
    assert value(families, "inventory_units", state="reserved") == 6
    assert value(families, "inventory_units", state="available") == 14
    assert value(families, "inventory_holds_live") == 3
    container.holds.release(b, hold.hold_id)  # no cache in between: the next scrape reads the stores again
    families = scrape(client)
    assert value(families, "inventory_holds_live") == 2
    assert value(families, "inventory_units", state="available") == 15


def test_a_counter_broken_on_purpose_raises_the_violations_gauge_until_a_reconcile(client, container, sessions,
                                                                                    redis_client):
    vids = make_variants(sessions, 3, on_hand=10)
    for vid in vids:
        container.holds.reserve(vid, "v1", 1)
    assert value(scrape(client), "inventory_invariant_violations") == 0
    redis_client.hincrby(keys.stock(vids[1]), "available", 2)
    redis_client.hincrby(keys.stock(vids[2]), "reserved", -1)
    assert value(scrape(client), "inventory_invariant_violations") == 2
    container.reconciler.reconcile()
    assert value(scrape(client), "inventory_invariant_violations") == 0


def test_the_release_lag_is_observed_per_released_hold_from_its_expiry(client, container, sessions):
    vid = make_variant(sessions, on_hand=10)
    before = scrape(client)
    past = clock.now_ms() - 45_000
    for user in ("l1", "l2", "l3"):
        container.holds.reserve(vid, user, 1, now=past, ttl_ms=1_000)  # lapsed 44 s ago
    container.holds.reserve(vid, "live", 1)  # not lapsed: not released, not observed
    assert container.sweeper.sweep().holds == 3
    after = scrape(client)

    def grew(**labels) -> float:
        name = "inventory_release_lag_seconds"
        suffix = "_count" if not labels else "_bucket"
        return value(after, name, name + suffix, **labels) - (value(before, name, name + suffix, **labels) or 0)

    assert grew() == 3
    assert grew(le="30.0") == 0  # 44 s late: above this bucket...
    assert grew(le="60.0") == 3  # ... within this one


def test_the_jobs_last_success_times_are_gauges(client, jobs_container):
    families = scrape(client)
    assert value(families, "inventory_job_last_success_timestamp_seconds", job="sweep") is None  # never ran
    t0 = clock.now_ms() / 1000
    jobs.tasks.sweep_job()
    jobs.tasks.reconcile_job()
    families = scrape(client)
    for job in ("sweep", "reconcile"):
        at = value(families, "inventory_job_last_success_timestamp_seconds", job=job)
        assert at is not None and t0 - 1 <= at <= clock.now_ms() / 1000 + 1, job


@pytest.mark.single_node  # a cluster client connects when built: the app could not even start
def test_a_redis_outage_answered_503_is_counted_and_the_scrape_still_serves_the_counters(build_app, env, client):
    before = value(scrape(client), "inventory_store_errors", "inventory_store_errors_total", store="redis")
    broken, _ = build_app({**env, "REDIS_URL": "redis://127.0.0.1:9/0"})  # nothing listens on port 9
    response = broken.post("/api/cart/add/", json={"user_id": "o1", "variant_id": 1, "quantity": 1})
    assert response.status_code == 503
    # the broken app's own scrape: its counters, no gauges (it cannot read them), that failure counted too
    families = scrape(broken)
    assert "inventory_units" not in families and "inventory_holds" in families
    after = value(scrape(client), "inventory_store_errors", "inventory_store_errors_total", store="redis")
    assert after == before + 2


def test_a_database_outage_answered_503_is_counted(build_app, env, client):
    before = value(scrape(client), "inventory_store_errors", "inventory_store_errors_total", store="database")
    broken, _ = build_app({**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none"})
    response = broken.get("/api/inventory/")
    assert response.status_code == 503
    assert response.get_json()["error"]["details"]["store"] == "database"
    after = value(scrape(client), "inventory_store_errors", "inventory_store_errors_total", store="database")
    assert after == before + 1


# --- one scrape, several processes --------------------------------------------------------------

_SWEEPING_PROCESS = textwrap.dedent("""
    from app import clock
    from app.composition import build_container
    c = build_container()
    past = clock.now_ms() - 10_000
    for user in ("p1", "p2"):
        c.holds.reserve({vid}, user, 1, now=past, ttl_ms=1_000)
    assert c.sweeper.sweep().holds == 2
    c.close()
""")
_SCRAPING_PROCESS = textwrap.dedent("""
    import sys
    from app import create_app
    client = create_app().test_client()
    client.get("/healthz")
    sys.stdout.write(client.get("/metrics").get_data(as_text=True))
""")


def test_one_scrape_sums_the_counters_of_every_process_sharing_the_directory(env, sessions, tmp_path):
    vid = make_variant(sessions, on_hand=5)
    child_env = {**os.environ, **env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    # two sweeping processes, like a listener and a worker, then exited: one beside the web process,
    # one in a subdirectory of its own (a container with its own pids, docker-compose.yml)
    for directory in (tmp_path, tmp_path / "listener"):
        subprocess.run([sys.executable, "-c", _SWEEPING_PROCESS.format(vid=vid)], check=True, timeout=60,
                       env={**child_env, "PROMETHEUS_MULTIPROC_DIR": str(directory)})
    out = subprocess.run([sys.executable, "-c", _SCRAPING_PROCESS], env=child_env, check=True, timeout=60,
                         capture_output=True, text=True).stdout
    families = {f.name: f for f in text_string_to_metric_families(out)}
    assert value(families, "inventory_holds", "inventory_holds_total", event="expired") == 4
    assert value(families, "inventory_holds", "inventory_holds_total", event="created") == 4
    assert value(families, "inventory_release_lag_seconds", "inventory_release_lag_seconds_count") == 4
    # the scraping process's own request, and the gauges read from the stores
    assert value(families, "inventory_request_seconds", "inventory_request_seconds_count",
                 endpoint="/healthz", method="GET", status="200") == 1
    assert value(families, "inventory_units", state="on_hand") == 5
