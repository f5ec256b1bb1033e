"""serve/: the Grafana dashboard asks for the metrics fintwin exports, and the compose file,
the Prometheus scrape config and Grafana's provisioning point at each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fintwin.monitor.metrics import HISTOGRAM, METRICS, exported_names

SERVE = Path(__file__).resolve().parents[2] / "serve"
DASHBOARD = SERVE / "grafana" / "dashboards" / "fintwin.json"
METRIC_NAME = re.compile(r"\b(?:fintwin|nv_inference)_[a-z0-9_]+\b")


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def dashboard_metrics() -> set[str]:
    return {name for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((SERVE / "docker-compose.yml").read_text())["services"]


def mount(service: dict, target: str) -> Path:
    """The host path (relative to serve/) bound at ``target`` in a service."""
    found = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == target]
    assert len(found) == 1 and found[0]["read_only"] is True, target
    return (SERVE / found[0]["source"]).resolve()


def flags(command: list[str]) -> dict[str, str]:
    return dict(flag.removeprefix("--").partition("=")[::2] for flag in command)


def test_dashboard_shows_every_fintwin_metric_by_its_exported_name():
    asked = {name for name in dashboard_metrics() if name.startswith("fintwin_")}
    assert asked <= exported_names(), asked - exported_names()
    shown = {spec.name for spec in METRICS
             if (spec.name + "_bucket" if spec.kind == HISTOGRAM else spec.name) in asked}
    assert shown == {spec.name for spec in METRICS}
    triton = {name for name in dashboard_metrics() if name.startswith("nv_inference_")}
    assert {"nv_inference_request_success", "nv_inference_request_duration_us",
            "nv_inference_queue_duration_us", "nv_inference_exec_count"} <= triton


def test_every_panel_reads_the_provisioned_prometheus(services):
    datasource = yaml.safe_load(
        (SERVE / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels:
        for source in [panel.get("datasource"), *(t["datasource"] for t in panel.get("targets", []))]:
            if source is not None:
                assert source == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    # Prometheus lives in tritonserver's network namespace, which publishes its port
    assert services["prometheus"]["network_mode"] == f"service:{host}"
    assert f"127.0.0.1:{port}:{port}" in services[host]["ports"]


def test_grafana_mounts_the_provisioning_and_the_dashboard_where_they_point(services):
    grafana = services["grafana"]
    assert mount(grafana, "/etc/grafana/provisioning") == SERVE / "grafana" / "provisioning"
    provider = yaml.safe_load(
        (SERVE / "grafana/provisioning/dashboards/fintwin.yml").read_text())["providers"][0]
    assert mount(grafana, provider["options"]["path"]) == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_prometheus_reads_the_scrape_config_that_targets_tritons_metrics_port(services):
    prometheus = services["prometheus"]
    config_file = flags(prometheus["command"])["config.file"]
    assert mount(prometheus, config_file) == SERVE / "prometheus.yml"
    config = yaml.safe_load((SERVE / "prometheus.yml").read_text())
    triton = flags(services["tritonserver"]["command"][1:])
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]
    assert triton["metrics-address"] == "127.0.0.1"  # reached from the shared namespace
    assert targets == [f"127.0.0.1:{triton['metrics-port']}"]
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"
