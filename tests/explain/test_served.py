"""The explanation model through the embedded Triton: an application sends customers' raw
events and gets the reasons `fintwin explain` gives (gRPC and HTTP); bad requests are refused
with 400 / INVALID_ARGUMENT naming what is wrong."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fintwin.explain.explainer import Explainer
from fintwin.explain.serving import explain_model_name, explain_served
from fintwin.serving.server import EmbeddedTriton
from tests.explain.conftest import MODEL, write_explain_repo

pytestmark = pytest.mark.slow  # starts tritonserver: about 20-40 s
EXTRAS = ("balance", "channel")


@pytest.fixture(scope="module")
def explain_repo(tmp_path_factory) -> Path:
    return write_explain_repo(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(explain_repo) -> Iterator[EmbeddedTriton]:
    with EmbeddedTriton(explain_repo, startup_timeout_s=120) as running:
        yield running


def test_served_reasons_equal_fintwin_explain(server, explain_repo, rich_events):
    events = rich_events[rich_events["customer_id"].isin(["c002", "c005", "long"])]
    local = Explainer.from_repository(explain_repo, MODEL).explain(events, "churn_prob", top=3)
    for module, url in ((grpcclient, server.grpc_url), (httpclient, server.http_url)):
        client = module.InferenceServerClient(url)
        served = explain_served(client, explain_model_name(MODEL), events, "churn_prob", 3,
                                spec_columns=EXTRAS)
        client.close()
        assert [s["customer_id"] for s in served] == ["c002", "c005", "long"]
        for got, want in zip(served, local, strict=True):
            assert got["prediction"] == pytest.approx(want.prediction, rel=1e-6)
            assert got["reference"] == pytest.approx(want.reference, rel=1e-6)
            assert [r["text"] for r in got["reasons"]] == [r.text for r in want.reasons]
            assert [r["contribution"] for r in got["reasons"]] == pytest.approx(
                [r.contribution for r in want.reasons], rel=1e-4, abs=1e-9)


def test_bad_requests_are_refused_naming_the_problem(server, rich_events):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    events = rich_events[rich_events["customer_id"] == "c002"]
    model = explain_model_name(MODEL)
    with pytest.raises(InferenceServerException, match="unknown output 'churn'") as refused:
        explain_served(client, model, events, "churn", spec_columns=EXTRAS)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="missing input 'channel'"):
        explain_served(client, model, events, spec_columns=("balance",))
    broken = events.assign(amount=events["amount"].where(events.index != events.index[1], -5.0))
    with pytest.raises(InferenceServerException, match="amount"):
        explain_served(client, model, broken, spec_columns=EXTRAS)
    client.close()
