"""The /ops/ dashboard in a real headless browser against a real server, Redis and database."""
from __future__ import annotations

import json
import re
import time
import urllib.request

from app import keys
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY
from tests.factories import make_variant

KEY_STORE = "inventory.ops.api_key"  # the session-storage entry the page keeps the key in

# The three counts of a variant's row, as the page shows them, or null while the row is absent.
ROW_COUNTS = """id => {
  const row = document.querySelector(`tr[data-variant-id="${id}"]`);
  if (!row) return null;
  const out = {};
  for (const field of ["on_hand", "available", "reserved"]) {
    out[field] = row.querySelector(`[data-field="${field}"]`).textContent;
  }
  return out;
}"""


def wait_for_counts(page, variant_id: int, on_hand: int, available: int, reserved: int, timeout_ms: int = 5000):
    """Wait, bounded, until the variant's row shows exactly these counts as plain integers."""
    want = {"on_hand": str(on_hand), "available": str(available), "reserved": str(reserved)}
    page.wait_for_function(f"([id, want]) => JSON.stringify(({ROW_COUNTS})(id)) === JSON.stringify(want)",
                           arg=[variant_id, want], timeout=timeout_ms)
    return page.evaluate(ROW_COUNTS, variant_id)


def add_to_cart(served, user_id: int, variant_id: int, quantity: int) -> dict:
    """A reservation through the HTTP API, as a storefront would make it."""
    request = urllib.request.Request(
        f"{served.url}/api/cart/add/", method="POST",
        data=json.dumps({"user_id": user_id, "variant_id": variant_id, "quantity": quantity}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {STOREFRONT_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        return json.load(response)


def enter_key(page, key: str) -> None:
    field = page.locator('input[name="api_key"]')
    field.wait_for(state="visible")
    field.fill(key)
    field.press("Enter")


def summary_requests(page) -> list:
    """Every request the page makes for the summary, recorded as it makes them."""
    seen: list = []
    page.on("request", lambda r: seen.append(r) if "/api/ops/summary/" in r.url else None)
    return seen


def test_with_authentication_on_the_page_asks_for_the_admin_key_then_shows_the_variants_counts(
        serve, auth_env, open_tab):
    served = serve(auth_env)
    variant = make_variant(served.container.sessions, on_hand=12, sku="RED-SHIRT-M")
    tab = open_tab(served)
    requests = summary_requests(tab.page)

    tab.page.goto(f"{served.url}/ops/")
    enter_key(tab.page, ADMIN_KEY)
    counts = wait_for_counts(tab.page, variant, on_hand=12, available=12, reserved=0)

    assert all(re.fullmatch(r"\d+", value) for value in counts.values()), counts
    row = tab.page.locator(f'tr[data-variant-id="{variant}"]')
    assert row.locator('[data-field="sku"]').inner_text() == "RED-SHIRT-M"
    assert tab.page.locator('input[name="api_key"]').is_hidden()
    assert tab.page.evaluate(f"sessionStorage.getItem('{KEY_STORE}')") == ADMIN_KEY
    # the first poll went without a key and was refused; the key typed in is sent from then on
    assert requests[0].headers.get("authorization") is None
    assert requests[-1].headers.get("authorization") == f"Bearer {ADMIN_KEY}"
    assert tab.outside == []


def test_a_new_holds_reserved_units_appear_within_three_seconds_without_a_reload(serve, auth_env, open_tab):
    served = serve(auth_env)
    variant = make_variant(served.container.sessions, on_hand=12)
    tab = open_tab(served)
    tab.page.goto(f"{served.url}/ops/")
    enter_key(tab.page, ADMIN_KEY)
    wait_for_counts(tab.page, variant, on_hand=12, available=12, reserved=0)
    tab.page.evaluate("window.notReloaded = true")  # gone if the page were loaded again

    add_to_cart(served, user_id=101, variant_id=variant, quantity=3)
    started = time.monotonic()
    wait_for_counts(tab.page, variant, on_hand=12, available=9, reserved=3, timeout_ms=3000)

    assert time.monotonic() - started < 3.5
    assert tab.page.evaluate("window.notReloaded") is True
    assert tab.page.locator("#total-reserved").inner_text() == "3"
    assert tab.page.locator("#total-holds_live").inner_text() == "1"


def test_the_key_stays_for_the_tab_so_a_reload_needs_no_second_entry(serve, auth_env, open_tab):
    served = serve(auth_env)
    variant = make_variant(served.container.sessions, on_hand=4)
    tab = open_tab(served)
    tab.page.goto(f"{served.url}/ops/")
    enter_key(tab.page, ADMIN_KEY)
    wait_for_counts(tab.page, variant, on_hand=4, available=4, reserved=0)

    tab.page.reload()
    wait_for_counts(tab.page, variant, on_hand=4, available=4, reserved=0)
    assert tab.page.locator('input[name="api_key"]').is_hidden()


def test_with_authentication_off_the_page_shows_the_data_at_once(serve, env, open_tab):
    served = serve(env)
    variant = make_variant(served.container.sessions, on_hand=7)
    tab = open_tab(served)

    tab.page.goto(f"{served.url}/ops/")
    wait_for_counts(tab.page, variant, on_hand=7, available=7, reserved=0)

    assert tab.page.locator('input[name="api_key"]').is_hidden()
    assert tab.page.evaluate(f"sessionStorage.getItem('{KEY_STORE}')") is None
    assert tab.outside == []


def test_a_key_without_the_admin_role_is_refused_forgotten_and_asked_for_again(serve, auth_env, open_tab):
    served = serve(auth_env)
    make_variant(served.container.sessions, on_hand=3)
    tab = open_tab(served)
    tab.page.goto(f"{served.url}/ops/")

    enter_key(tab.page, STOREFRONT_KEY)

    message = tab.page.locator("#key-message")
    message.filter(has_text="not an admin key").wait_for(state="visible")
    assert tab.page.locator("tr[data-variant-id]").count() == 0
    assert tab.page.locator("#dashboard").is_hidden()
    assert tab.page.evaluate(f"sessionStorage.getItem('{KEY_STORE}')") is None


def test_variants_asked_for_in_the_address_are_pinned_first_beside_the_busiest(serve, env, open_tab):
    served = serve(env)
    sessions = served.container.sessions
    busy, also_busy, idle = (make_variant(sessions, on_hand=10) for _ in range(3))
    add_to_cart(served, user_id=1, variant_id=busy, quantity=2)
    add_to_cart(served, user_id=2, variant_id=also_busy, quantity=1)
    tab = open_tab(served)

    tab.page.goto(f"{served.url}/ops/?variant_id={idle}")
    wait_for_counts(tab.page, idle, on_hand=10, available=10, reserved=0)

    order = tab.page.eval_on_selector_all("tr[data-variant-id]", "rows => rows.map(r => r.dataset.variantId)")
    assert order[:3] == [str(idle), str(busy), str(also_busy)], order
    assert "pinned" in tab.page.locator(f'tr[data-variant-id="{idle}"]').get_attribute("class")
    assert "pinned" not in (tab.page.locator(f'tr[data-variant-id="{busy}"]').get_attribute("class") or "")


def test_a_broken_invariant_is_shown_with_the_variant_that_broke_it(serve, env, open_tab, redis_client):
    served = serve(env)
    variant = make_variant(served.container.sessions, on_hand=5)
    add_to_cart(served, user_id=1, variant_id=variant, quantity=1)  # builds the variant's counters
    tab = open_tab(served)
    tab.page.goto(f"{served.url}/ops/")
    tab.page.locator("#invariant-state", has_text="holds").wait_for()

    redis_client.hincrby(keys.stock(variant), "available", 2)  # drift: 6 available + 1 reserved != 5

    tab.page.locator("#invariant-state", has_text="broken").wait_for(timeout=3000)
    assert str(variant) in tab.page.locator("#invariant-detail").inner_text()
    assert "bad" in tab.page.locator("#invariant").get_attribute("class")
