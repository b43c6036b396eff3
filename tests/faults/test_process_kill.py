"""A web process killed with SIGKILL at each step of a checkout; the reconciler completes or reverses it.

The app runs in a child process (werkzeug's server) with FAULT_PAUSE_AT=<step>: it stops there and
writes FAULT_PAUSE_FILE, the test kills it with SIGKILL, nothing in the process gets to clean up.
"""
from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from sqlalchemy import select

from app.embedded import free_port
from persistence.models import Order
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.faults.conftest import PYTHON, assert_orders_durable, assert_stock_exact

SERVER = """
import sys
from werkzeug.serving import make_server
from app import create_app
server = make_server("127.0.0.1", int(sys.argv[1]), create_app(), threaded=True)
print("serving", flush=True)
server.serve_forever()
"""

POINTS = ["checkout.after_lock", "checkout.after_commit", "checkout.after_finalize"]


def _call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 10):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _up(port: int) -> bool:
    try:
        return _call(port, "GET", "/healthz", timeout=1)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("point", POINTS)
def test_a_web_process_killed_mid_checkout_is_healed_by_the_reconciler(point, base_env, build, processes, tmp_path,
                                                                       capsys):
    client, c = build(base_env)
    vid = make_variant(c.sessions, on_hand=10)
    other = make_variant(c.sessions, on_hand=10)
    port = free_port()
    pause_file = tmp_path / "paused"
    web = processes.start(f"web-{point}", [PYTHON, "-c", SERVER, str(port)], {
        **base_env, "FAULT_PAUSE_AT": point, "FAULT_PAUSE_FILE": str(pause_file)})
    wait_for(lambda: _up(port) or web.poll() is not None, timeout=30, interval=0.1, message="web process up")
    assert web.poll() is None, web.log_path.read_text()

    for variant, qty in ((vid, 3), (other, 2)):
        status, body = _call(port, "POST", "/api/cart/add/", {"user_id": "victim", "variant_id": variant,
                                                               "quantity": qty})
        assert status == 201, body

    outcome: dict = {}

    def checkout():
        try:
            outcome["answer"] = _call(port, "POST", "/api/cart/victim/checkout/", {}, timeout=60)
        except OSError as exc:  # the connection dies with the process
            outcome["error"] = type(exc).__name__

    shopper = threading.Thread(target=checkout, daemon=True)
    shopper.start()
    wait_for(pause_file.exists, timeout=20, interval=0.02, message=f"the web process to pause at {point}")
    assert pause_file.read_text() == point
    web.send_signal(signal.SIGKILL)
    web.wait(10)
    shopper.join(20)
    assert not shopper.is_alive()
    assert "answer" not in outcome, outcome  # the shopper never got a 201 for it

    reconcile_started = time.monotonic()
    first = c.reconciler.reconcile(grace_ms=0)
    c.reconciler.reconcile(grace_ms=0)  # a second pass settles what the first unlocked or finalized
    healed_in = time.monotonic() - reconcile_started
    assert c.reconciler.reconcile(dry_run=True, grace_ms=0).drifted == 0

    with c.sessions() as s:
        orders = s.scalars(select(Order)).all()
        lines = sorted((l.variant_id, l.quantity) for o in orders for l in o.lines)
    state = assert_stock_exact(c, [vid, other])
    if point == "checkout.after_lock":
        # never committed: reversed, and the shopper's holds are theirs again
        assert orders == []
        assert state == {vid: (10, 7, 3), other: (10, 8, 2)}
        assert first.locks_released == 2
        retry = client.post("/api/cart/victim/checkout/")
        assert retry.status_code == 201, retry.get_json()
        assert_orders_durable(c, [retry.get_json()])
        state = assert_stock_exact(c, [vid, other])
        assert state == {vid: (7, 7, 0), other: (8, 8, 0)}
    else:
        # committed: completed, exactly once
        assert len(orders) == 1 and lines == sorted([(vid, 3), (other, 2)])
        assert state == {vid: (7, 7, 0), other: (8, 8, 0)}
        assert first.locks_finalized == (2 if point == "checkout.after_commit" else 0)
        # the stale lines cannot be bought a second time
        assert client.post("/api/cart/victim/checkout/").status_code in (400, 410)
        with c.sessions() as s:
            assert len(s.scalars(select(Order)).all()) == 1
    with capsys.disabled():
        print(f"\n[SIGKILL at {point}] two reconciler passes healed it in {healed_in * 1000:.0f} ms: "
              f"{'reversed, holds held again' if point.endswith('lock') else 'order complete, holds finalized'}")
