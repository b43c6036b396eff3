"""Every WEB_SERVER runs the same app the same way: bound where HOST/PORT say, auth and the error
body of API.md, add-to-cart, one Prometheus scrape for every worker, and a clean stop on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.webserver import SERVERS, server_argv
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.processes import free_port, readyz

ROOT = Path(__file__).resolve().parents[2]
ADMIN, STOREFRONT = "admin-key-for-web-tests-1", "storefront-key-for-web-1"
pytestmark = pytest.mark.single_node


def _call(port: int, method: str, path: str, body: dict | None = None, key: str = "") -> tuple[int, dict, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            return response.status, (json.loads(text) if response.headers.get_content_type() == "application/json"
                                     else {}), text
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        return exc.code, json.loads(text or "{}"), text


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize("server", SERVERS)
def test_each_server_serves_the_same_app(server, tmp_path, env, clean_stores, container, sessions):
    port = free_port()
    prom = tmp_path / "prometheus"
    child_env = {**os.environ, **env, "PORT": str(port), "HOST": "127.0.0.1", "WEB_SERVER": server,
                 "WEB_CONCURRENCY": "2", "WEB_THREADS": "2", "API_KEYS": f"admin:{ADMIN},storefront:{STOREFRONT}",
                 "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    log = tmp_path / "web.log"
    proc = subprocess.Popen(server_argv(sys.executable, child_env), cwd=ROOT, env=child_env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or readyz(port) == 200, timeout=30, interval=0.2,
                 message=f"{server} to be ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        wait_for(lambda: len(_children(proc.pid)) == 2, timeout=15, interval=0.1, message="two workers")
        workers = _children(proc.pid)
        variant = make_variant(sessions, on_hand=3)

        assert _call(port, "GET", "/healthz")[:2] == (200, {"status": "ok"})
        status, body, _ = _call(port, "POST", "/api/cart/add/", {"user_id": 1, "variant_id": variant, "quantity": 1})
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        for user in range(2, 6):
            _call(port, "POST", "/api/cart/add/", {"user_id": user, "variant_id": variant, "quantity": 1}, STOREFRONT)
        status, body, _ = _call(port, "POST", "/api/cart/add/", {"user_id": 9, "variant_id": variant, "quantity": 1},
                                STOREFRONT)
        assert (status, body["error"]["code"]) == (400, "insufficient_stock")
        status, body, _ = _call(port, "GET", "/no/such/path")
        assert (status, body["error"]["code"]) == (404, "not_found")
        counters = container.holds.counters([variant])[variant]
        assert (counters.available, counters.reserved) == (0, 3)

        # every worker's requests are in the one scrape (the multiprocess directory)
        status, _, text = _call(port, "GET", "/metrics", key=ADMIN)
        assert status == 200
        adds = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("inventory_request_seconds_count") and "/api/cart/add/" in line)
        assert adds == 5  # 3 added, 2 refused for stock (the 401 is answered before the timer starts)
        assert any(prom.glob("*.db"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    assert code == 0 or code == -signal.SIGTERM, (code, log.read_text()[-3000:])
    wait_for(lambda: not any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text()
                             .split(")")[-1].split()[:1] for w in workers), timeout=10, message="workers gone")
