"""docker-compose.yml describes production: every process of DESIGN.md, and commands that exist."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from app.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROJECT_SERVICES = ("web", "listener", "worker", "scheduler", "migrate")
SERVERS = ("web", "redis", "postgres")


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _command(service: dict) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "commands are written as lists (exec form)"
    return command


def _problems_with(command: list[str]) -> list[str]:
    """Why a command of a project service would not start, or nothing."""
    program, args = command[0], command[1:]
    if program == "inventory":
        if args[0] not in main.commands:
            return [f"`inventory {args[0]}` is not a command of app.cli.main"]
        return []
    if program == "gunicorn":
        problems = []
        if "-c" in args:
            config = args[args.index("-c") + 1].removeprefix("python:")
            if importlib.util.find_spec(config) is None:
                problems.append(f"gunicorn config module {config} not found")
        module, _, attribute = args[-1].partition(":")
        spec = importlib.util.find_spec(module)
        # A text check, not an import: importing wsgi would build the app from this process's environment.
        if spec is None or f"{attribute} =" not in Path(spec.origin).read_text():
            problems.append(f"{args[-1]} does not name a module that defines `{attribute}`")
        return problems
    if program in ("python", "python3") and args[:1] == ["-m"]:
        return [] if importlib.util.find_spec(args[1]) else [f"module {args[1]} not found"]
    return [f"unknown program {program!r}"]


def test_compose_runs_every_process_of_the_design(services):
    for name in (*PROJECT_SERVICES, "redis", "postgres"):
        assert name in services, name


@pytest.mark.parametrize("name", SERVERS)
def test_every_long_running_server_has_a_healthcheck(services, name):
    assert services[name].get("healthcheck", {}).get("test"), name


def test_only_the_container_binds_every_address(services):
    assert services["web"]["environment"]["HOST"] == "0.0.0.0"


def test_web_is_healthy_only_when_ready(services):
    assert "/readyz" in " ".join(services["web"]["healthcheck"]["test"])


def test_redis_keeps_an_append_only_file_and_sends_expiry_events(services):
    command = " ".join(services["redis"]["command"])
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly yes" in command
    assert "--notify-keyspace-events Ex" in command
    assert "--maxmemory-policy noeviction" in command


def test_postgres_is_fifteen_and_its_password_has_no_default(services):
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_project_services_run_in_production_without_default_credentials(services, name):
    env = services[name]["environment"]
    assert env["APP_ENV"] == "production"
    assert env["API_KEYS"].startswith("${API_KEYS:?")
    assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:")


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_every_command_a_service_names_exists(services, name):
    assert _problems_with(_command(services[name])) == []


def test_services_start_after_the_stores_are_healthy_and_migrated(services):
    for name in ("web", "listener", "worker", "scheduler"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == depends["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
