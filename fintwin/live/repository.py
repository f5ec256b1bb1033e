"""The live model in a Triton model repository, written by ``fintwin export`` next to the batch
model ``NAME``::

    <repo>/NAME_live/config.pbtxt      python backend: raw event fields in, predictions out
    <repo>/NAME_live/<N>/step.onnx     the step graph (fintwin.live.step), parity-checked
    <repo>/NAME_live/<N>/fintwin.json  the featuriser spec, the step graph's names and the
                                       stored state layout, provenance
    <repo>/NAME_live/<N>/model.py      a two-line shim importing fintwin.live.triton_model
    <repo>/NAME_live/<N>/fintwin.sha256 SHA-256 of the files above (fintwin.export.integrity)

fintwin is installed where the live model runs (the embedded server's virtual environment;
serve/Dockerfile.live in production), so model.py never changes between versions.

Inputs, one event per row (``max_batch_size`` rows per request): ``customer_id``,
``timestamp``, ``event_type`` BYTES, ``amount`` FP32, the model's numeric (FP32) and
categorical (BYTES) columns by name, and the optional ``cursor`` BYTES; all dims [1].
Outputs per row: the batch model's outputs right after the event (dims as there, per-row
scalars [1]), ``status`` BYTES, ``seq`` INT64, ``stored_cursor`` BYTES (the request's
consumer's stored stream position after it, '' without a cursor), ``alerts`` BYTES (a JSON
list of the alerts the event raised, ``fintwin.live.alerts``) and ``event_tail_probs`` FP32
[3] (the event's type, amount and timing tail probabilities; NaN for a first event). The
alert thresholds are the config's ``alert_*`` parameters (``AlertConfig``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from fintwin.data.contract import CONTRACT_KEY, exported_contract
from fintwin.data.features import FeaturiserSpec
from fintwin.export.onnx import ParityReport
from fintwin.export.triton_repo import FEATURISER_KEYS, FEATURISER_PARAMETER, write_version_files
from fintwin.live.alerts import ALERT_STATE, AlertConfig
from fintwin.live.events import TEXT, event_fields
from fintwin.live.step import (
    DAYS_SINCE_INPUT,
    DISTRIBUTION_OUTPUTS,
    STATE_INPUT,
    STATE_OUTPUT,
    StepModel,
    export_step_model,
    step_model,
)
from fintwin.live.store import StateLayout
from fintwin.live.triton_model import (
    ALERTS_OUTPUT,
    CURSOR_OUTPUT,
    INTRA_OP_THREADS_PARAMETER,
    SEQ_OUTPUT,
    STATE_STORE_PARAMETER,
    STATUS_OUTPUT,
    TAILS_OUTPUT,
)
from fintwin.live.twins import PREDICTION_FIELD, STEP_GRAPH, STEP_KEY, live_model_name
from fintwin.models.checkpoint import TrainedTwin

SHIM_NAME = "model.py"
SHIM = (
    '"""Triton python backend entry point of a fintwin live model (fintwin.live.repository)."""\n'
    "from fintwin.live.triton_model import TritonPythonModel  # noqa: F401\n"
)


def step_metadata(step: StepModel, report: ParityReport) -> dict[str, Any]:
    """The live model's ``step`` metadata: the step graph's names, and the layout of a stored
    twin: the graph's state fields, the predictions after the last event (the predictive
    distribution's parameters among them) and the alerts' state."""
    predictions = {
        PREDICTION_FIELD.format(entry["name"]): (tuple(entry["shape"][1:]) or (1,), entry["dtype"])
        for entry in exported_contract(step.model.contract_sizes())["outputs"]
    } | {PREDICTION_FIELD.format(name): (shape, "float32")
         for name, shape in step.distribution_shapes().items()}
    state = {spec.name: (spec.shape, spec.dtype) for spec in step.layout.fields}
    return {
        "graph": STEP_GRAPH,
        "event_inputs": [spec.name for spec in step.event_inputs],
        "silence_input": DAYS_SINCE_INPUT,
        "state": {name: [STATE_INPUT.format(name), STATE_OUTPUT.format(name)]
                  for name in step.field_names},
        "outputs": [entry["name"] for entry in exported_contract(step.model.contract_sizes())["outputs"]],
        "distribution": list(DISTRIBUTION_OUTPUTS),
        "layout": StateLayout.of(state | predictions | ALERT_STATE).to_json(),
        "parity_max_abs": report.max_abs,
    }


def live_metadata(batch_metadata: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """The batch model's metadata (featuriser spec, quantiles, provenance) without its graph's
    contract, plus the step graph's ``step``."""
    kept = {key: value for key, value in batch_metadata.items()
            if key not in (CONTRACT_KEY, "input_names", "output_names", "parity_max_abs")}
    return kept | {STEP_KEY: step}


def live_model_config(name: str, spec: FeaturiserSpec, metadata: dict[str, Any], *,
                      max_batch_size: int = 256, max_queue_delay_us: int = 100,
                      instances: int = 1, state_store: str = "") -> mc.ModelConfig:
    """The python-backend config of live model ``name`` (CPU instances: a step is small)."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    for field in event_fields(spec):
        kind = mc.TYPE_STRING if field.kind == TEXT else mc.TYPE_FP32
        config.input.append(mc.ModelInput(name=field.name, data_type=kind, dims=[1],
                                          optional=field.optional))
    layout = StateLayout.from_json(metadata[STEP_KEY]["layout"])
    shapes = {spec.name: spec.shape for spec in layout.fields}
    for output in metadata[STEP_KEY]["outputs"]:
        dims = list(shapes[PREDICTION_FIELD.format(output)])
        config.output.append(mc.ModelOutput(name=output, data_type=mc.TYPE_FP32, dims=dims))
    for output, kind in ((STATUS_OUTPUT, mc.TYPE_STRING), (SEQ_OUTPUT, mc.TYPE_INT64),
                         (CURSOR_OUTPUT, mc.TYPE_STRING), (ALERTS_OUTPUT, mc.TYPE_STRING)):
        config.output.append(mc.ModelOutput(name=output, data_type=kind, dims=[1]))
    config.output.append(mc.ModelOutput(name=TAILS_OUTPUT, data_type=mc.TYPE_FP32, dims=[3]))
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.instance_group.append(
        mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    )
    config.parameters[STATE_STORE_PARAMETER].string_value = state_store
    config.parameters[INTRA_OP_THREADS_PARAMETER].string_value = "1"
    for name, value in AlertConfig().parameters().items():
        config.parameters[name].string_value = value
    featuriser = {key: metadata[key] for key in FEATURISER_KEYS if key in metadata}
    config.parameters[FEATURISER_PARAMETER].string_value = json.dumps(featuriser, sort_keys=True)
    return config


def export_step_graph(twin: TrainedTwin, scratch: Path) -> tuple[Path, ParityReport, dict]:
    """Write the twin's parity-checked step graph into ``scratch``; return it, its parity
    report and its ``step`` metadata."""
    path = Path(scratch) / STEP_GRAPH
    report = export_step_model(twin, path)
    return path, report, step_metadata(step_model(twin), report)


def write_live_model(repo: Path, name: str, spec: FeaturiserSpec, step_graph: Path,
                     metadata: dict[str, Any], scratch: Path, **options: Any) -> int:
    """Add a version of the live model ``live_model_name(name)`` to ``repo``: the step graph,
    its metadata (``live_metadata``) and the shim; return the version."""
    live = live_model_name(name)
    shim = Path(scratch) / SHIM_NAME
    shim.write_text(SHIM)
    config = live_model_config(live, spec, metadata, **options)
    return write_version_files(repo, live, {STEP_GRAPH: step_graph, SHIM_NAME: shim}, config,
                               metadata)
