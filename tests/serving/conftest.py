"""Serving fixtures: a stand-in ONNX model with the exported model's contract, a repository
holding it, an in-process reference, and ONE embedded Triton server for the whole test run.

Shared functions reach the tests through the ``standin`` fixture: test modules never import
conftest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fintwin.data.contract import (
    BATCH_AXIS,
    CONTRACT_KEY,
    OUTPUT_NAMES,
    SEQUENCE_AXIS,
    exported_contract,
    model_inputs,
)
from fintwin.data.contract import random_inputs as contract_random_inputs
from fintwin.data.features import FEATURISER_KEY, FeaturiserSpec, Vocab
from fintwin.export.triton_repo import (
    CONFIG_NAME,
    format_model_config,
    read_model_config,
    write_model_version,
)
from fintwin.serving.client import InProcessRunner, TritonTransport
from fintwin.serving.python_model import MAX_BATCH_ELEMENTS_PARAMETER
from fintwin.serving.server import EmbeddedTriton

MODEL_NAME = "twin"
VOCAB_SIZE = 12
SIZES = {"vocab_size": VOCAB_SIZE, "quantiles": 3, "numeric_features": 0}
INPUTS = model_inputs(SIZES)
MAX_BATCH_SIZE = 64
PREFERRED_BATCH_SIZES = (8, 32)
MAX_QUEUE_DELAY_US = 200
MAX_LEN = 256  # fintwin.json: longer sequences are refused
MAX_BATCH_ELEMENTS = 8192  # config parameter: rows x events per request and per run
METADATA = {  # fintwin.json
    FEATURISER_KEY: FeaturiserSpec(
        Vocab(tuple(f"type_{i}" for i in range(2, VOCAB_SIZE))), max_len=MAX_LEN, horizon_days=90.0
    ).to_dict(),
    "quantiles": [0.1, 0.5, 0.9],
    CONTRACT_KEY: exported_contract(SIZES),
}


class StandInTwin(nn.Module):
    """Tiny causal model with the exported contract: reads each row at position length - 1."""

    def __init__(self) -> None:
        super().__init__()
        self.event = nn.Embedding(VOCAB_SIZE, 8)
        self.day_of_week = nn.Embedding(7, 3)
        self.day_of_month = nn.Embedding(32, 3)
        self.hour = nn.Embedding(24, 3)
        self.mix = nn.Linear(8 + 3 * 3 + 2, 16)
        self.heads = nn.Linear(16, VOCAB_SIZE + 8)

    def forward(
        self,
        event_type,
        amount,
        delta_t,
        day_of_week,
        day_of_month,
        hour,
        length,
        days_since_last_event,
    ):
        features = torch.cat(
            [
                self.event(event_type),
                self.day_of_week(day_of_week),
                self.day_of_month(day_of_month),
                self.hour(hour),
                torch.log1p(amount).unsqueeze(-1),
                torch.log1p(delta_t).unsqueeze(-1),
            ],
            dim=-1,
        )
        hidden = torch.cumsum(torch.tanh(self.mix(features)), dim=1)  # position t sees <= t
        index = (length - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        out = self.heads(hidden.gather(1, index).squeeze(1))
        probs = torch.softmax(out[:, :VOCAB_SIZE], dim=-1)
        rest = out[:, VOCAB_SIZE:]
        positive = F.softplus(rest)
        quantiles = torch.cumsum(positive[:, 1:4], dim=-1)
        return (
            probs,
            positive[:, 0],
            quantiles,
            torch.sigmoid(rest[:, 4]),
            positive[:, 5],
            torch.sigmoid(rest[:, 6]),
            positive[:, 7] * torch.exp(-days_since_last_event / 90.0),  # fewer after a silence
            positive[:, 7] * positive[:, 5] * torch.exp(-days_since_last_event / 90.0),
        )


def export_standin(path: Path) -> Path:
    """Export StandInTwin with the dynamo exporter, dynamic batch and sequence axes."""
    torch.manual_seed(0)
    model = StandInTwin().eval()
    example = random_inputs(np.random.default_rng(0), batch=3, seq=5, lengths=[5, 2, 1])
    dims = {axis: torch.export.Dim(axis) for axis in (BATCH_AXIS, SEQUENCE_AXIS)}
    torch.onnx.export(
        model,
        tuple(torch.from_numpy(example[spec.name]) for spec in INPUTS),
        str(path),
        dynamo=True,
        dynamic_shapes={
            spec.name: {i: dims[axis] for i, axis in enumerate(spec.axes) if axis in dims}
            for spec in INPUTS
        },
        external_data=False,
        input_names=[spec.name for spec in INPUTS],
        output_names=list(OUTPUT_NAMES),
        verbose=False,
    )
    return path


def random_inputs(
    rng: np.random.Generator, batch: int, seq: int, lengths: list[int] | None = None
) -> dict[str, np.ndarray]:
    """A valid right-padded batch of the contract's inputs: zeros after each row's length."""
    return contract_random_inputs(rng, SIZES, batch, seq, lengths)


def assert_outputs_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same output names, dtypes, shapes and values (atol 1e-5)."""
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


def _live_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live, non-zombie process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z":
            yield int(entry.name), int(ppid), int(pgrp)


def processes_in_group(group: int) -> list[int]:
    """PIDs of live processes in process group ``group``."""
    return [pid for pid, _, pgrp in _live_processes() if pgrp == group]


def children_of(parent: int) -> list[int]:
    """PIDs of live processes whose parent is ``parent``."""
    return [pid for pid, ppid, _ in _live_processes() if ppid == parent]


class StandIn:
    """Constants and functions of the stand-in model, handed to tests by the ``standin`` fixture."""

    model_name = MODEL_NAME
    vocab_size = VOCAB_SIZE
    max_len = MAX_LEN
    max_batch_elements = MAX_BATCH_ELEMENTS
    output_names = OUTPUT_NAMES
    metadata = METADATA
    random_inputs = staticmethod(random_inputs)
    assert_outputs_equal = staticmethod(assert_outputs_equal)
    processes_in_group = staticmethod(processes_in_group)
    children_of = staticmethod(children_of)


@pytest.fixture(scope="session")
def standin() -> type[StandIn]:
    return StandIn


@pytest.fixture(scope="session")
def standin_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_standin(tmp_path_factory.mktemp("standin") / "standin.onnx")


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory, standin_onnx: Path) -> Path:
    """The stand-in exported with ``max_len`` and a ``max_batch_elements`` budget in its config."""
    repo = tmp_path_factory.mktemp("model_repository")
    write_model_version(
        repo,
        MODEL_NAME,
        standin_onnx,
        METADATA,
        device="cpu",
        max_batch_size=MAX_BATCH_SIZE,
        preferred_batch_sizes=PREFERRED_BATCH_SIZES,
        max_queue_delay_us=MAX_QUEUE_DELAY_US,
    )
    config_path = repo / MODEL_NAME / CONFIG_NAME
    config = read_model_config(config_path)
    config.parameters[MAX_BATCH_ELEMENTS_PARAMETER].string_value = str(MAX_BATCH_ELEMENTS)
    config_path.write_text(format_model_config(config))
    return repo


@pytest.fixture(scope="session")
def reference(model_repo: Path) -> Iterator[InProcessRunner]:
    runner = InProcessRunner(model_repo, MODEL_NAME, intra_op_threads=1)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def triton_server(model_repo: Path) -> Iterator[EmbeddedTriton]:
    with EmbeddedTriton(model_repo, startup_timeout_s=90) as server:
        group = server.process.pid  # the server leads its own process group
        yield server
    assert not processes_in_group(group), "tritonserver or a python stub outlived the server"


@pytest.fixture(params=["grpc", "http"])
def transport(
    request: pytest.FixtureRequest, triton_server: EmbeddedTriton
) -> Iterator[TritonTransport]:
    url = triton_server.grpc_url if request.param == "grpc" else triton_server.http_url
    client = TritonTransport(url, request.param, MODEL_NAME)
    yield client
    client.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
