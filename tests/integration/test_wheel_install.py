"""The package installs whole: a wheel built from this tree, installed with its dependencies into a
fresh virtualenv, carries the Lua scripts and the migrations, and `inventory run` started from a
directory outside the repository (no PYTHONPATH, no REDIS_URL or DATABASE_URL) answers /readyz and
stops every process it started on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import free_port, group_members, readyz

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 30.0
# What the build does not need; .venv and var above all (large, and not the package).
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "var", "build", "dist", "*.egg-info",
                                     "__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", "tests", "bench")

# Where the loader of lua/ lives (it moved once): the first of these that exists.
_SCRIPTS_MODULES = ("app.engine.scripts",)

pytestmark = [
    # About a minute: a wheel build, a dependency install and a whole `inventory run`.
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the processes"),
]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user who installed the wheel: nothing that points into the repository."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "REDIS_URL", "DATABASE_URL",
                        "RQ_REDIS_URL", "REDIS_CLUSTER", "API_KEYS", "PROMETHEUS_MULTIPROC_DIR",
                        "FAULT_PAUSE_AT", "FAULT_PAUSE_FILE")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not _inside(Path(p), REPO))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _run(argv: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, \
        f"{' '.join(map(str, argv))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """{"python", "bin", "site_packages"} of a fresh virtualenv holding the wheel and its dependencies."""
    base = tmp_path_factory.mktemp("wheel-install")
    assert not _inside(base, REPO)
    env = _clean_env()
    # Built from a copy: an in-tree build would leave build/ behind, whose stale modules (removed
    # from the source since) a later wheel would carry.
    src = base / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, src], 600,
         env=env, cwd=base)
    wheels = list(dist.glob("inventory_engine-*.whl"))
    assert len(wheels) == 1, wheels
    # A bare virtualenv, filled by this interpreter's pip (`pip --python`): no copy of pip to install
    # first. Its dependencies come as a user gets them; pip's cache keeps a second run quick, and
    # --no-compile leaves the bytecode to the imports that need it.
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], 120, env=env, cwd=base)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile", wheels[0]],
         900, env=env, cwd=base)
    site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60,
                         env=env, cwd=base).stdout.strip()
    return {"python": python, "bin": venv / "bin", "site_packages": Path(site_packages)}


def test_the_wheel_carries_the_lua_scripts_and_the_migrations(installed, tmp_path):
    assert not _inside(tmp_path, REPO)
    probe = r"""
import json
import importlib, importlib.util
import alembic.script, lua, app, jobs, persistence, persistence.db as db
from alembic.config import Config

for where in SCRIPTS_MODULES:
    if importlib.util.find_spec(where):
        scripts_module = importlib.import_module(where)
        break
else:
    raise SystemExit(f"none of {SCRIPTS_MODULES} found")

cfg = Config()
cfg.set_main_option("script_location", str(db.MIGRATIONS))
scripts = alembic.script.ScriptDirectory.from_config(cfg)
print(json.dumps({
    "modules": [m.__file__ for m in (lua, app, scripts_module, jobs, persistence, db)],
    "lua_dir": str(scripts_module.LUA_DIR),
    "names": scripts_module.names(),
    "sources": {n: scripts_module.source(n) for n in scripts_module.names()},
    "migrations": str(db.MIGRATIONS),
    "migration_files": sorted(str(p.relative_to(db.MIGRATIONS)) for p in db.MIGRATIONS.rglob("*")
                              if p.is_file() and "__pycache__" not in p.parts),
    "heads": list(scripts.get_heads()),
    "revisions": sorted(s.revision for s in scripts.walk_revisions()),
}))
"""
    probe = f"SCRIPTS_MODULES = {_SCRIPTS_MODULES!r}\n{probe}"
    result = _run([installed["python"], "-c", probe], 120, env=_clean_env(), cwd=tmp_path)
    found = json.loads(result.stdout)
    site = installed["site_packages"]
    for path in [*found["modules"], found["lua_dir"], found["migrations"]]:
        assert _inside(Path(path), site), f"{path} is not in the virtualenv's {site}"
        assert not _inside(Path(path), REPO), f"{path} comes from the repository"

    repo_scripts = sorted(p.name.split("-")[0] for p in (REPO / "lua").glob("*.lua"))
    assert found["names"] == repo_scripts
    for path in (REPO / "lua").glob("*.lua"):
        text = found["sources"][path.name.split("-")[0]]
        assert text.strip() and not re.search(r"^--@include ", text, re.MULTILINE), path.name
        for include in re.findall(r"^--@include (\w+)\s*$", path.read_text(), re.MULTILINE):
            assert (REPO / "lua" / "includes" / f"{include}.lua").read_text() in text, (path.name, include)

    repo_versions = {p.name for p in (REPO / "persistence" / "migrations" / "versions").glob("*.py")}
    assert {"env.py", "script.py.mako"} <= set(found["migration_files"])
    assert {f"versions/{name}" for name in repo_versions} <= set(found["migration_files"])
    assert len(found["heads"]) == 1
    assert len(found["revisions"]) == len(repo_versions - {"__init__.py"})








def _poll(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_inventory_run_from_the_wheel_answers_readyz_and_stops(installed, tmp_path):
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    assert not _inside(cwd, REPO)
    port = free_port()
    log_path = tmp_path / "inventory-run.log"
    env = _clean_env(PORT=str(port), APP_ENV="development", LOG_LEVEL="INFO", WEB_CONCURRENCY="2")
    with open(log_path, "w") as log:
        # Its own session and process group: one signal reaches everything it starts.
        proc = subprocess.Popen([str(installed["bin"] / "inventory"), "run"], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pgid = proc.pid

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])

    try:
        status = _poll(lambda: proc.poll() is not None or readyz(port) == 200,
                       READY_TIMEOUT_SECONDS, 0.25)
        assert proc.poll() is None, f"inventory run exited with {proc.returncode}:\n{log_tail()}"
        assert status and readyz(port) == 200, \
            f"/readyz did not answer 200 within {READY_TIMEOUT_SECONDS:.0f}s:\n{log_tail()}"

        banner = log_path.read_text(errors="replace")
        assert "inventory run: http://127.0.0.1:" in banner
        # The stores it made for itself (embedded Redis, SQLite) are under ./var of where it runs.
        store_paths = re.findall(r"^  redis .*\(embedded, data in (\S+)\)$", banner, re.MULTILINE) \
            + re.findall(r"^  database\s+sqlite:///(\S+) ", banner, re.MULTILINE)
        assert len(store_paths) == 2, banner
        for path in store_paths:
            assert _inside(Path(path), cwd / "var"), f"inventory run keeps its data outside ./var: {path}"

        os.killpg(pgid, signal.SIGTERM)
        code = proc.wait(STOP_TIMEOUT_SECONDS)
        assert code == 0, f"inventory run exited with {code} on SIGTERM:\n{log_tail()}"
        all_gone = _poll(lambda: not group_members(pgid), STOP_TIMEOUT_SECONDS)
        assert all_gone, "still running after SIGTERM:\n" + "\n".join(group_members(pgid))
    finally:
        if group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:  # gone in between
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
