"""fintwin's metrics on the real embedded Triton's metrics endpoint, next to Triton's own,
parsed with prometheus_client's parser after live events, a bad request and a batch scoring;
and Debian's prometheus scraping that endpoint with serve/prometheus.yml's settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import tritonclient.http as httpclient
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from fintwin.live.triton_model import STATE_STORE_ENV
from fintwin.monitor.drift import REFERENCE_KEY
from fintwin.monitor.metrics import DRIFT_REFRESH_S, exported_names
from fintwin.serving.client import TwinClient
from fintwin.serving.server import EmbeddedTriton, free_ports
from tests.conftest import make_events
from tests.monitor.conftest import LIVE, MODEL
from tests.monitor.test_dashboards import SERVE, dashboard_metrics

pytestmark = pytest.mark.slow  # one export and one server: about a minute

ROWS_PER_REQUEST = 8


@pytest.fixture(scope="module")
def server(monitored_repo, tmp_path_factory) -> Iterator[EmbeddedTriton]:
    """The embedded server (metrics on a free loopback port), states in a file of this test."""
    store = tmp_path_factory.mktemp("states") / "twins.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STATE_STORE_ENV, f"sqlite:///{store}")
        with EmbeddedTriton(monitored_repo, startup_timeout_s=120) as running:
            yield running


def scrape(server: EmbeddedTriton) -> dict[tuple[str, frozenset], float]:
    """Every sample of the metrics endpoint: (name, labels) -> value."""
    assert server.metrics_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


def send(client: httpclient.InferenceServerClient, rows: pd.DataFrame) -> list[bytes]:
    columns = {
        "customer_id": rows["customer_id"].to_numpy(str),
        "timestamp": rows["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S").to_numpy(),
        "event_type": rows["event_type"].to_numpy(str),
    }
    inputs = []
    for name, values in columns.items():
        tensor = httpclient.InferInput(name, [len(rows), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], object).reshape(-1, 1))
        inputs.append(tensor)
    amount = httpclient.InferInput("amount", [len(rows), 1], "FP32")
    amount.set_data_from_numpy(rows["amount"].to_numpy(np.float32).reshape(-1, 1))
    result = client.infer(LIVE, [*inputs, amount])
    return list(result.as_numpy("status").reshape(-1))


def test_scraped_metrics_count_what_was_served(server, monitored_repo):
    events = make_events(n_customers=4, seed=3).sort_values("timestamp", kind="stable")
    events = events.head(40).reset_index(drop=True)
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        chunks = [events.iloc[i:i + ROWS_PER_REQUEST] for i in range(0, 32, ROWS_PER_REQUEST)]
        statuses = [s for chunk in chunks for s in send(client, chunk)]
        with pytest.raises(InferenceServerException, match="column 'amount'"):
            send(client, events.iloc[32:35].assign(amount=np.nan))
        time.sleep(DRIFT_REFRESH_S + 0.1)  # the drift gauges are refreshed at most this often
        statuses += send(client, events.iloc[32:40])
    finally:
        client.close()
    assert statuses == [b"applied"] * 40
    scored = TwinClient(server.http_url, "http", MODEL).predict(events)

    samples = scrape(server)
    live = {"model": LIVE, "version": "1"}
    assert value(samples, "fintwin_events_total", outcome="applied", **live) == 40
    assert value(samples, "fintwin_events_total", outcome="invalid", **live) == 3
    assert value(samples, "fintwin_requests_total", outcome="ok", **live) == 5
    assert value(samples, "fintwin_requests_total", outcome="invalid", **live) == 1
    assert value(samples, "fintwin_rejected_inputs_total", reason="amount", **live) == 1
    assert value(samples, "fintwin_live_states", **live) == events["customer_id"].nunique()
    assert value(samples, "fintwin_state_store_seconds_count", operation="apply", **live) == 5
    assert value(samples, "fintwin_state_store_seconds_sum", operation="apply", **live) > 0
    assert value(samples, "fintwin_drift_window_events", **live) == 40
    reference = pd.read_json(monitored_repo / LIVE / "1" / "fintwin.json", typ="series")[REFERENCE_KEY]
    psi = {name: value(samples, "fintwin_drift_psi", feature=name, **live)
           for name in reference["binnings"] if name != "activity_90d"}
    assert set(psi) >= {"event_type", "amount", "gap_days", "churn_prob", "horizon_spend"}
    assert all(np.isfinite(v) and v >= 0 for v in psi.values())
    watch = value(samples, "fintwin_drifted_features", level="watch", **live)
    assert watch == sum(v >= 0.1 for v in psi.values())

    batch = {"model": MODEL, "version": "1"}
    assert value(samples, "fintwin_customers_scored_total", **batch) == len(scored) == 4
    assert value(samples, "fintwin_requests_total", outcome="ok", **batch) >= 1
    # Triton's own metrics are on the same endpoint (the parser names counter samples *_total);
    # to Triton a python-backend response carrying an error is a success: 5 ok + 1 invalid
    assert value(samples, "nv_inference_request_success_total", model=LIVE, version="1") == 6
    assert {name for name, _ in samples if name.startswith("fintwin_")} <= exported_names()
    triton = {name.removesuffix("_total") for name, _ in samples if name.startswith("nv_")}
    asked = {name for name in dashboard_metrics() if name.startswith("nv_")}
    assert asked <= triton, asked - triton  # the dashboard's Triton metrics exist


def test_prometheus_scrapes_the_server_and_answers_a_fintwin_query(server, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        events = make_events(n_customers=2, seed=7).head(8).assign(customer_id="prom-c1")
        send(client, events.sort_values("timestamp"))
    finally:
        client.close()
    query = f'sum(fintwin_events_total{{model="{LIVE}",outcome="applied"}})'
    served = sum(v for (name, labels), v in scrape(server).items()
                 if name == "fintwin_events_total" and ("outcome", "applied") in labels
                 and ("model", LIVE) in labels)
    config = yaml.safe_load((SERVE / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [server.metrics_url.split("/")[2]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_ports("127.0.0.1", 1)[0]
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        answer = poll_query(f"http://127.0.0.1:{port}", query, served, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert answer == served >= 8, (tmp_path / "prometheus.log").read_text()[-2000:]


def poll_query(base: str, query: str, want: float, process: subprocess.Popen,
               timeout_s: float = 60.0) -> float | None:
    """The value of an instant ``query`` once it equals ``want`` (the last one seen after
    ``timeout_s``; None when there was none)."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    seen, deadline = None, time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                result = json.loads(response.read())["data"]["result"]
        except (urllib.error.URLError, OSError):
            result = []
        if result:
            seen = float(result[0]["value"][1])
            if seen == want:
                return seen
        time.sleep(0.5)
    return seen
