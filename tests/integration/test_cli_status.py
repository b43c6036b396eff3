"""`inventory status` (tables, and an exit code a probe can use) and `inventory top` (one snapshot on
a pipe, a live view on a terminal that `q` or Ctrl-C ends), against real stores (API.md, Command line)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from app import keys
from app import settings as settings_module
from app.cli import main as cli
from app.embedded import EmbeddedRedis
from tests.conftest import wait_for
from tests.factories import make_variant

TTL_MS = 600_000
_INVENTORY = Path(sys.executable).with_name("inventory")
INVENTORY = [str(_INVENTORY)] if _INVENTORY.exists() else [sys.executable, "-m", "app.cli"]
# From a key press to the process gone: one refresh (1 s) plus the terminal's restore, on a busy machine.
QUIT_BOUND_SECONDS = 10.0
# Python's start and the first summary, on a busy machine.
FIRST_VIEW_SECONDS = 30.0


@pytest.fixture
def cli_env(env, settings, monkeypatch, tmp_path):
    """The test stores in the environment, and a ./var of the test's own (no stack recorded in it)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(settings_module, "VAR_DIR", tmp_path / "var")
    return env


def status(*args: str):
    return CliRunner().invoke(cli, ["status", *args])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- inventory status ----------------------------------------------------------------------------

def test_a_healthy_stack_gets_exit_0_and_the_tables(cli_env, container, sessions):
    a = make_variant(sessions, on_hand=10, sku="STATUS-A")
    b = make_variant(sessions, on_hand=7, sku="STATUS-B")
    container.holds.counters([a, b])
    container.holds.reserve(a, "u1", 3, ttl_ms=TTL_MS)
    container.holds.reserve(a, "u2", 1, ttl_ms=30_000)  # lapses within the next minute
    container.holds.reserve(b, "u1", 2, ttl_ms=TTL_MS)

    result = status()
    assert result.exit_code == 0, result.output + result.stderr
    out = result.stdout
    for title in ("Stores", "Stock", "Invariant", "Jobs"):
        assert title in out
    assert "redis" in out and "database" in out and "DOWN" not in out
    stock_row = _row_after(out, "variants")
    # variants, on hand, available, reserved, holds live, lapsing next minute
    assert stock_row == ["2", "17", "11", "6", "3", "1"], out
    assert "available + reserved == on_hand: ok" in out
    assert result.stderr == ""


def test_a_counter_broken_on_purpose_gets_exit_1_naming_the_variant(cli_env, container, sessions, redis_client):
    good = make_variant(sessions, on_hand=10)
    broken = make_variant(sessions, on_hand=10)
    container.holds.counters([good, broken])
    redis_client.hincrby(keys.stock(broken), "available", 3)

    result = status()
    assert result.exit_code == 1, result.output
    assert f"BROKEN for variant(s) {broken}" in result.stdout
    # the one line on stderr a probe logs names it too, and nothing else
    assert result.stderr.strip().splitlines() == [
        f"Error: invariant broken (available + reserved != on_hand) for variant(s) {broken}"]
    assert f"{good}," not in result.stderr


def test_redis_going_down_turns_exit_0_into_exit_1_with_the_store_named(cli_env, container, sessions,
                                                                         monkeypatch, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        monkeypatch.setenv("REDIS_URL", server.url)
        make_variant(sessions, on_hand=5)
        assert status().exit_code == 0
    finally:
        server.stop()
    result = status()
    assert result.exit_code == 1, result.output
    assert "DOWN" in result.stdout and "Stock" not in result.stdout
    assert result.stderr.strip().splitlines() == [f"Error: redis is down at {server.url}: ConnectionError"]


def test_a_database_that_does_not_answer_gets_exit_1_with_the_store_named(cli_env, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{_free_port()}/nowhere")
    result = status()
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: database is down at postgresql://"), result.stderr


def test_the_processes_of_the_recorded_run_are_listed_with_their_liveness(cli_env, settings, tmp_path):
    from app import stack

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stack.write(tmp_path / "var" / "stack.json", {
        "state": stack.RUNNING, "pid": os.getpid(),
        "stores": {"redis_url": settings.redis_url, "database_url": settings.database_url},
        "processes": [{"name": "web", "pid": os.getpid(), "restarts": 0, "started_at": "t0"},
                      {"name": "listener", "pid": dead.pid, "restarts": 2, "started_at": "t1"}]})
    result = status()
    assert result.exit_code == 0, result.output
    assert _row_after(result.stdout, "process", "web") == ["web", str(os.getpid()), "yes", "0", "t0"]
    assert _row_after(result.stdout, "process", "listener") == ["listener", str(dead.pid), "no", "2", "t1"]


def _row_after(text: str, header: str, first: str | None = None) -> list[str]:
    """The cells of the first row under the table whose header starts with `header` (the row starting
    with `first`, when given)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [header])
    for line in lines[start + 2:]:  # past the header and its rule
        cells = line.split()
        if first is None or cells[:1] == [first]:
            return cells
    raise AssertionError(f"no row {first!r} under {header!r}:\n{text}")


# --- inventory top --------------------------------------------------------------------------------

def _top_env(env: dict) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}, **env,
            "PYTHONUNBUFFERED": "1"}


def test_top_on_a_pipe_prints_one_snapshot_busiest_first_and_exits_0(env, container, sessions, tmp_path):
    quiet = make_variant(sessions, on_hand=50, sku="TOP-QUIET")
    busy = make_variant(sessions, on_hand=50, sku="TOP-BUSY")
    container.holds.counters([quiet, busy])
    for i in range(4):  # the summary tells recent holds by their expiry: reserved with the usual TTL
        container.holds.reserve(busy, f"u{i}", 2, ttl_ms=container.settings.hold_ttl_seconds * 1000)

    result = subprocess.run([*INVENTORY, "top"], env=_top_env(env), cwd=tmp_path, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=FIRST_VIEW_SECONDS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "reservations" in out and "refusals" in out and "q or Ctrl-C" not in out
    assert out.index("TOP-BUSY") < out.index("TOP-QUIET")
    busy_row = next(line.split() for line in out.splitlines() if "TOP-BUSY" in line)
    # variant, sku, on hand, available, reserved, holds, reservations/s (4 in the last minute)
    assert busy_row == [str(busy), "TOP-BUSY", "50", "42", "8", "4", f"{4 / 60:.2f}"], out


@pytest.fixture
def tmux(tmp_path):
    """A private tmux server (its socket in the test's directory), killed at the end with everything it runs."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the live view needs a terminal to test")
    sock = str(tmp_path / "tmux.sock")

    def run(*args: str) -> str:
        return subprocess.run(["tmux", "-S", sock, "-f", "/dev/null", *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    yield run
    subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_top_in_a_terminal_refreshes_until_the_quit_key_and_exits_0(env, container, sessions, tmp_path, tmux,
                                                                      key):
    vid = make_variant(sessions, on_hand=10, sku="TOP-LIVE")
    container.holds.counters([vid])
    script = tmp_path / "top.sh"
    code_file = tmp_path / "exit-code"
    exports = "".join(f"export {k}='{v}'\n" for k, v in env.items())
    script.write_text(f"{exports}unset PROMETHEUS_MULTIPROC_DIR\ncd '{tmp_path}'\n"
                      f"{' '.join(INVENTORY)} top\necho $? > '{code_file}'\nsleep 60\n")
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", f"bash {script}")

    def row() -> list[str] | None:
        pane = tmux("capture-pane", "-p", "-t", "top")
        return next((line.split() for line in pane.splitlines() if "TOP-LIVE" in line), None)

    assert wait_for(row, timeout=FIRST_VIEW_SECONDS, interval=0.2, message="the view to show the variant")[2:5] \
        == ["10", "10", "0"]
    container.holds.reserve(vid, "u1", 3, ttl_ms=TTL_MS)
    # refreshed by itself: on hand, available, reserved, holds
    wait_for(lambda: (r := row()) and r[2:6] == ["10", "7", "3", "1"], timeout=10, interval=0.2,
             message="the view to refresh with the new hold")

    sent = time.monotonic()
    tmux("send-keys", "-t", "top", key)
    wait_for(code_file.exists, timeout=QUIT_BOUND_SECONDS, interval=0.1, message=f"top to exit on {key}")
    assert code_file.read_text().strip() == "0"
    assert time.monotonic() - sent < QUIT_BOUND_SECONDS
    assert "Traceback" not in tmux("capture-pane", "-p", "-t", "top")
