"""The command line finds its stack: `inventory run` records its stores and processes in
./var/stack.json, every command run from that directory with REDIS_URL and DATABASE_URL unset uses
them, and with no store to reach every command ends in one line on stderr and exit 1, never a
traceback (API.md, Command line)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app import settings as settings_module
from app import stack
from app.cli import STARTUP_WAIT_SECONDS
from app.settings import load_settings
from tests.processes import free_port, group_members, readyz
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
_INVENTORY = Path(sys.executable).with_name("inventory")
# The installed script when there is one (as a user runs it), else the module.
INVENTORY = [str(_INVENTORY)] if _INVENTORY.exists() else [sys.executable, "-m", "app.cli"]
# A command that has nothing to wait for fails as soon as Python has started; generous for a busy machine.
QUICK_EXIT_SECONDS = 30.0
READY_TIMEOUT_SECONDS = 90.0
# inventory run gives each child 15 s to stop before it kills it, then stops Redis.
STOP_TIMEOUT_SECONDS = 40.0
# Everything that needs the stores: each must fail cleanly when there are none.
STORE_COMMANDS = [["reconcile"], ["reconcile", "--dry-run"], ["sweep"], ["stock", "1"], ["status"], ["top"],
                  ["listen"], ["worker"], ["scheduler"]]
_STORE_VARIABLES = ("REDIS_URL", "DATABASE_URL", "RQ_REDIS_URL", "REDIS_CLUSTER", "API_KEYS",
                    "PROMETHEUS_MULTIPROC_DIR", "FAULT_PAUSE_AT", "FAULT_PAUSE_FILE")


def _env(**extra: str) -> dict[str, str]:
    """The environment of someone at a shell: no store variables unless given."""
    env = {k: v for k, v in os.environ.items() if k not in _STORE_VARIABLES}
    env.update(APP_ENV="development", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1", **extra)
    return env


def _inventory(args: list[str], cwd: Path, timeout: float = QUICK_EXIT_SECONDS, **env: str):
    started = time.monotonic()
    result = subprocess.run([*INVENTORY, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    result.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    return result




def _assert_one_line_failure(name: str, result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, f"{name}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, f"{name}:\n{result.stderr}"
    assert len(lines) == 1, f"{name} printed {len(lines)} lines on stderr:\n{result.stderr}"
    return lines[0]


# --- nothing running -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nothing_running(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every store command, run at once from an empty directory with no store variables."""
    cwd = tmp_path_factory.mktemp("nothing-running")
    with ThreadPoolExecutor(len(STORE_COMMANDS)) as pool:
        results = pool.map(lambda args: _inventory(args, cwd), STORE_COMMANDS)
        return {" ".join(args): result for args, result in zip(STORE_COMMANDS, results)}


@pytest.mark.parametrize("command", [" ".join(args) for args in STORE_COMMANDS])
def test_with_nothing_running_a_command_says_why_in_one_line_and_exits_1(nothing_running, command):
    line = _assert_one_line_failure(command, nothing_running[command])
    assert "no Redis" in line and "REDIS_URL" in line and "inventory run" in line, line


@pytest.fixture(scope="module")
def redis_not_answering(tmp_path_factory) -> tuple[dict[str, subprocess.CompletedProcess], str]:
    """Every store command given a REDIS_URL on which nothing listens, all at once."""
    cwd = tmp_path_factory.mktemp("redis-down")
    url = f"redis://127.0.0.1:{free_port()}/0"
    with ThreadPoolExecutor(len(STORE_COMMANDS)) as pool:
        results = pool.map(lambda args: _inventory(args, cwd, QUICK_EXIT_SECONDS + STARTUP_WAIT_SECONDS,
                                                   REDIS_URL=url), STORE_COMMANDS)
        return {" ".join(args): result for args, result in zip(STORE_COMMANDS, results)}, url


@pytest.mark.parametrize("command", [" ".join(args) for args in STORE_COMMANDS])
def test_with_redis_not_answering_a_command_names_it_in_one_line_and_exits_1_in_bounded_time(
        redis_not_answering, command):
    results, url = redis_not_answering
    result = results[command]
    line = _assert_one_line_failure(command, result)
    assert url in line, line
    # the long-running processes wait STARTUP_WAIT_SECONDS for Redis, then give up; the others at once
    assert result.seconds < STARTUP_WAIT_SECONDS + QUICK_EXIT_SECONDS, f"{command} took {result.seconds:.1f}s"
    if command in ("listen", "worker", "scheduler"):
        assert f"within {STARTUP_WAIT_SECONDS:.0f}s" in line, line
        assert result.seconds >= STARTUP_WAIT_SECONDS - 1, f"{command} gave up after {result.seconds:.1f}s"


def test_a_record_left_by_a_killed_run_leads_to_one_line_naming_the_dead_run(tmp_path):
    dead_pid = _dead_pid()
    url = f"redis://127.0.0.1:{free_port()}/0"
    stack.write(stack.stack_file(tmp_path / "var"), {
        "state": stack.RUNNING, "pid": dead_pid, "processes": [],
        "stores": {"redis_url": url, "database_url": f"sqlite:///{tmp_path / 'var' / 'inventory.db'}"}})
    line = _assert_one_line_failure("sweep", _inventory(["sweep"], tmp_path))
    assert url in line and "stack.json" in line and f"pid {dead_pid}) is not running" in line, line


def test_a_record_of_a_stopped_run_is_not_used_and_the_line_says_it_stopped(tmp_path):
    path = stack.stack_file(tmp_path / "var")
    stack.write(path, {"state": stack.RUNNING, "pid": os.getpid(), "processes": [],
                       "stores": {"redis_url": "redis://127.0.0.1:9/0", "database_url": "sqlite://"}})
    stack.mark_stopped(path, os.getpid())
    line = _assert_one_line_failure("stock 1", _inventory(["stock", "1"], tmp_path))
    assert "stopped at" in line and "inventory run" in line and "127.0.0.1:9" not in line, line


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the settings' fallback --------------------------------------------------------------------------

def test_unset_store_variables_come_from_a_running_record_and_set_ones_win(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_module, "VAR_DIR", tmp_path / "var")
    recorded = {"redis_url": "redis://127.0.0.1:4444/0", "database_url": "sqlite:////elsewhere/inv.db",
                "rq_redis_url": "redis://127.0.0.1:5555/0", "redis_cluster": False}
    stack.write(stack.stack_file(tmp_path / "var"), {"state": stack.RUNNING, "pid": 1, "stores": recorded})

    found = load_settings({})
    assert (found.redis_url, found.database_url, found.rq_redis_url) == (
        recorded["redis_url"], recorded["database_url"], recorded["rq_redis_url"])
    assert found.stack_file == str(tmp_path / "var" / "stack.json")

    given = load_settings({"REDIS_URL": "redis://10.0.0.1:6379/2"})
    # the variable wins, and the recorded queue Redis belongs to the recorded Redis only
    assert (given.redis_url, given.rq_redis_url) == ("redis://10.0.0.1:6379/2", "")
    assert given.database_url == recorded["database_url"]
    both = load_settings({"REDIS_URL": "redis://10.0.0.1:6379/2", "DATABASE_URL": "postgresql://u@db/x"})
    assert (both.database_url, both.stack_file) == ("postgresql://u@db/x", "")
    # `inventory run` makes its own stores: it never takes them from an earlier record
    own = load_settings({}, use_stack=False)
    assert own.redis_url == "" and own.database_url.endswith("var/inventory.db") and own.stack_file == ""


def test_the_record_is_replaced_whole_and_readable_only_by_its_owner(tmp_path):
    path = stack.stack_file(tmp_path / "var")
    stack.write(path, {"state": stack.RUNNING, "pid": 1, "stores": {"redis_url": "redis://:pw@h:1/0"}})
    stack.write(path, {"state": stack.RUNNING, "pid": 2, "stores": {"redis_url": "redis://:pw@h:2/0"}})
    assert stack.read(path)["pid"] == 2
    assert path.stat().st_mode & 0o077 == 0  # it holds store URLs, passwords included
    assert [p.name for p in path.parent.iterdir()] == ["stack.json"]  # no temporary file left behind
    path.write_text("{half a rec")
    assert stack.read(path) is None and stack.running_stores(path) is None


# --- a running stack ------------------------------------------------------------------------------





@pytest.fixture(scope="module")
def running_stack(tmp_path_factory):
    """`inventory run` from a fresh directory, its Redis embedded and its database a SQLite file
    outside ./var (so only the record can tell the other commands where it is)."""
    base = tmp_path_factory.mktemp("running-stack")
    cwd = base / "shop"
    cwd.mkdir()
    database_url = f"sqlite:///{base / 'elsewhere' / 'shop.db'}"
    (base / "elsewhere").mkdir()
    port = free_port()
    log_path = base / "inventory-run.log"
    with open(log_path, "w") as log:
        # A process group of its own: one signal reaches everything it starts.
        proc = subprocess.Popen([*INVENTORY, "run"], cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=_env(PORT=str(port), DATABASE_URL=database_url, WEB_CONCURRENCY="2"))
    tail = lambda: "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])  # noqa: E731
    try:
        wait_for(lambda: proc.poll() is not None or readyz(port) == 200, READY_TIMEOUT_SECONDS, 0.25,
                 "inventory run to answer /readyz")
        assert proc.poll() is None, f"inventory run exited with {proc.returncode}:\n{tail()}"
        yield {"proc": proc, "cwd": cwd, "port": port, "database_url": database_url, "tail": tail,
               "record": cwd / "var" / "stack.json"}
    finally:
        if group_members(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # gone in between
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_inventory_run_records_its_stores_and_live_processes(running_stack):
    record = json.loads(running_stack["record"].read_text())
    assert record["state"] == "running" and record["pid"] == running_stack["proc"].pid
    assert record["stores"]["database_url"] == running_stack["database_url"]
    assert record["stores"]["redis_embedded"] and record["stores"]["redis_url"].startswith("redis://127.0.0.1:")
    names = [p["name"] for p in record["processes"]]
    assert names == ["run", "redis", "web", "listener", "worker", "scheduler"]
    assert all(stack.pid_alive(p["pid"]) and p["restarts"] == 0 for p in record["processes"]), record


@pytest.mark.parametrize("args, expected", [
    (["stock", "1"], "variant 1 ("),
    (["reconcile", "--dry-run"], "would repair 0"),
    (["sweep"], "released 0 hold(s)"),
])
def test_from_the_stacks_directory_with_no_variables_a_command_uses_the_recorded_stores(
        running_stack, args, expected):
    result = _inventory(args, running_stack["cwd"])
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{running_stack['tail']()}"
    assert expected in result.stdout
    # the database came from the record: the default SQLite under ./var was never made
    assert not (running_stack["cwd"] / "var" / "inventory.db").exists()


def test_status_from_the_stacks_directory_reports_it_healthy(running_stack):
    result = _inventory(["status"], running_stack["cwd"])
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    for name in ("web", "listener", "worker", "scheduler"):
        assert name in result.stdout
    assert "Traceback" not in result.stderr


def test_a_second_run_in_the_same_directory_is_refused_in_one_line(running_stack):
    result = _inventory(["run"], running_stack["cwd"], PORT=str(free_port()))
    line = _assert_one_line_failure("run", result)
    assert f"pid {running_stack['proc'].pid}" in line and "is running from this directory" in line, line


def test_a_restarted_child_is_recorded_with_its_new_pid_and_restart_count(running_stack):
    path = running_stack["record"]
    before = {p["name"]: p for p in stack.read(path)["processes"]}
    os.kill(before["listener"]["pid"], signal.SIGKILL)

    def restarted():
        now = {p["name"]: p for p in stack.read(path)["processes"]}
        return now if now["listener"]["restarts"] == 1 else None

    now = wait_for(restarted, timeout=20, interval=0.1, message="the record to show the listener restarted")
    assert now["listener"]["pid"] != before["listener"]["pid"] and stack.pid_alive(now["listener"]["pid"])
    assert {n: p["pid"] for n, p in now.items() if n != "listener"} == \
        {n: p["pid"] for n, p in before.items() if n != "listener"}


def test_sigterm_stops_every_process_and_marks_the_record_stopped(running_stack):
    # Runs last in this module: it stops the stack the tests above used.
    proc = running_stack["proc"]
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(STOP_TIMEOUT_SECONDS)
    assert code == 0, f"inventory run exited with {code} on SIGTERM:\n{running_stack['tail']()}"
    wait_for(lambda: not group_members(proc.pid), STOP_TIMEOUT_SECONDS, 0.2, "every process to exit")
    record = stack.read(running_stack["record"])
    assert record["state"] == "stopped" and record["stopped_at"]
    # and the commands no longer take the stores of a stack that is gone
    line = _assert_one_line_failure("sweep", _inventory(["sweep"], running_stack["cwd"]))
    assert "stopped at" in line, line
