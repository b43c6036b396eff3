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


# --- the monitoring profile (deploy/) -----------------------------------------------------------

MONITORING = ("prometheus", "grafana")
DEPLOY = ROOT / "deploy"


def _mount_sources(service: dict) -> dict[str, str]:
    """{target in the container: source} of a service's bind mounts and volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


class _StoresRead:
    """What the ops service's scan returns, so the exported families can be listed without stores."""

    def gauges(self) -> dict:
        return {"totals": {"on_hand": 1, "available": 1, "reserved": 0, "holds_live": 0}, "violations": 0,
                "job_success_s": {"sweep": 1.0, "reconcile": 1.0}}


@pytest.fixture(scope="module")
def exported_samples() -> set[str]:
    """Every sample name /metrics serves: the counters and histograms and the gauges read at scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    from app.metrics import REQUEST_LATENCY, render

    REQUEST_LATENCY.labels("GET", "/healthz", "200")  # a labelled histogram shows once it has a series
    body, _ = render(_StoresRead())
    return {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def _metric_names(expr: str) -> set[str]:
    import re

    return set(re.findall(r"\binventory_[a-z_]+\b", expr))


@pytest.mark.parametrize("name", MONITORING)
def test_prometheus_and_grafana_run_only_in_the_monitoring_profile(services, name):
    assert services[name]["profiles"] == ["monitoring"]


def test_the_services_of_the_design_run_without_a_profile(services):
    for name in (*PROJECT_SERVICES, "redis", "postgres"):
        assert "profiles" not in services[name], name


@pytest.mark.parametrize("name", MONITORING)
def test_the_monitoring_servers_listen_on_loopback_only(services, name):
    assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])


def test_prometheus_scrapes_the_web_service_with_the_admin_key_it_is_handed(services):
    prometheus = services["prometheus"]
    mounts = _mount_sources(prometheus)
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["web:8000"]
    assert job["authorization"]["type"] == "Bearer"
    secret = job["authorization"]["credentials_file"].removeprefix("/run/secrets/")
    assert secret in prometheus["secrets"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["secrets"][secret] == {"environment": "METRICS_API_KEY"}


def test_prometheus_loads_the_alert_rules_and_each_names_an_exported_metric(services, exported_samples):
    mounts = _mount_sources(services["prometheus"])
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    for path in config["rule_files"]:
        assert mounts[path] == "./deploy/" + Path(path).name
    rules = [r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert rules
    for rule in rules:
        names = _metric_names(rule["expr"])
        assert names <= exported_samples, (rule["alert"], names - exported_samples)


def test_grafana_is_provisioned_with_the_prometheus_source_and_the_dashboards(services):
    grafana = services["grafana"]
    mounts = _mount_sources(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./deploy/grafana/dashboards"
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/inventory.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"


def test_every_dashboard_panel_queries_a_metric_the_service_exports(exported_samples):
    import json

    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    dashboards = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        assert dashboard["panels"]
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                names = _metric_names(target["expr"])
                assert names, (panel["title"], target["expr"])
                assert names <= exported_samples, (panel["title"], names - exported_samples)


def test_the_dashboard_shows_every_family_of_the_contract(exported_samples):
    import json

    exprs = " ".join(t["expr"] for p in json.loads((DEPLOY / "grafana/dashboards/inventory.json").read_text())["panels"]
                     for t in p["targets"])
    for family in ("inventory_units", "inventory_holds_live", "inventory_holds_total", "inventory_rejections_total",
                   "inventory_invariant_violations", "inventory_release_lag_seconds_bucket",
                   "inventory_job_last_success_timestamp_seconds", "inventory_store_errors_total",
                   "inventory_request_seconds_bucket", "inventory_reconcile_drift_total"):
        assert family in exprs, family


def test_web_listener_and_worker_write_their_metrics_to_one_volume_in_directories_of_their_own(services):
    web_dir = services["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    dirs = {}
    for name in ("web", "listener", "worker"):
        service = services[name]
        assert _mount_sources(service)[web_dir] == "metrics", name
        dirs[name] = service["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    # web's scrape reads its directory and the subdirectories beside its files (app/metrics.py);
    # each container has its own pids, so no two may write into the same directory
    assert len(set(dirs.values())) == 3
    assert all(Path(d).parent == Path(web_dir) for name, d in dirs.items() if name != "web")
