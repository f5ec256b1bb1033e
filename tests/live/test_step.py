"""The step model: one event at a time from the empty state gives the full-history model's
outputs after every event (both encoders, random and trained weights); bootstrapped states
equal stepped ones; the ONNX step graph equals PyTorch; the state fits the state store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf

from fintwin.data.contract import OUTPUT_NAMES
from fintwin.data.sequences import SequenceSet, inference_sequences
from fintwin.export.graph import ExportableTwin
from fintwin.export.onnx import ExportParityError, ParityReport, export_onnx, ort_session
from fintwin.live import step as step_module
from fintwin.live.step import (
    StepModel,
    bootstrap_states,
    divergence_past_max_len,
    export_step_model,
    step_model,
)
from fintwin.live.store import StateUpdate, open_store
from fintwin.models.checkpoint import TrainedTwin, load_twin
from fintwin.models.module import TwinModule
from tests.models.conftest import SCALING, TINY_ENCODERS, build_batch, build_module

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # scaled: |a - b| / max(1, |b|), as the export's parity check
WINDOW = 8  # a max_len shorter than the tiny histories, to step past it
ENCODERS = sorted(TINY_ENCODERS)
Tensors = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_transformer_checkpoint(tmp_path_factory, events_csv) -> Path:
    """A tiny transformer twin trained for two epochs through train.py's code path."""
    from fintwin.training import run
    from tests.test_train import compose_cfg, tiny_overrides

    out = tmp_path_factory.mktemp("transformer_run")
    run(compose_cfg(out, tiny_overrides(events_csv, "transformer")))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(params=["lstm", "transformer"])
def trained(request, tiny_checkpoint) -> TrainedTwin:
    """The tiny trained twin of each encoder."""
    if request.param == "lstm":
        return load_twin(tiny_checkpoint)
    return load_twin(request.getfixturevalue("tiny_transformer_checkpoint"))


def with_max_len(twin: TrainedTwin, max_len: int) -> TrainedTwin:
    return replace(twin, spec=replace(twin.spec, max_len=max_len))


def twin_sequences(twin: TrainedTwin, events_csv: str) -> SequenceSet:
    """The tiny event file's customers as the twin scores them."""
    return inference_sequences(twin.spec.read_events(events_csv), twin.spec)


def step_through(step: StepModel, batch: Tensors, days: torch.Tensor) -> tuple[list[Tensors], Tensors]:
    """Every row's events fed one by one from the empty state: the outputs after each event
    and each row's state after its last event."""
    length = batch["length"]
    state = {k: torch.from_numpy(v) for k, v in step.initial_state(len(length)).items()}
    outputs = []
    with torch.no_grad():
        for t in range(int(length.max())):
            event = {spec.name: batch[spec.name][:, t] for spec in step.event_inputs}
            out, new = step.step(event, days, state)
            live = length > t
            state = {k: torch.where(live.view(-1, *[1] * (v.dim() - 1)), new[k], v)
                     for k, v in state.items()}
            outputs.append(out)
    return outputs, state


def full_history_outputs(model, batch: Tensors, events: int, days: torch.Tensor) -> Tensors:
    """The full-history model's outputs after each row's first ``events`` events."""
    prefix = {k: v[:, :events] for k, v in batch.items() if v.dim() >= 2}
    prefix["length"] = batch["length"].clamp(max=events)
    prefix["days_since_last_event"] = days
    with torch.no_grad():
        return model.predict_last(prefix)


def worst_difference(got: Tensors, want: Tensors, rows: torch.Tensor) -> dict[str, float]:
    return {
        name: float(((got[name] - want[name]).abs() / want[name].abs().clamp(min=1.0))[rows].max())
        for name in OUTPUT_NAMES
    }


def assert_steps_match_full_history(step: StepModel, batch: Tensors, days: torch.Tensor) -> None:
    outputs, _ = step_through(step, batch, days)
    for t, got in enumerate(outputs):
        want = full_history_outputs(step.model, batch, t + 1, days)
        worst = worst_difference(got, want, batch["length"] > t)
        assert max(worst.values()) <= TOLERANCE, f"after event {t + 1}: {worst}"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize(("n_numeric", "categorical_sizes"), [(0, []), (2, [4, 3])])
def test_stepping_gives_the_full_history_outputs_after_every_event(
    encoder, n_numeric, categorical_sizes
):
    """Random weights; several customers of different lengths up to max_len in one batch;
    with and without numeric and categorical features."""
    model = build_module(TINY_ENCODERS[encoder], n_numeric=n_numeric,
                         categorical_sizes=categorical_sizes)
    step = StepModel(model, max_len=12)
    batch = build_batch([12, 7, 1, 9], n_numeric=n_numeric, seed=3,
                        categorical_sizes=categorical_sizes)
    assert_steps_match_full_history(step, batch, torch.tensor([0.0, 5.0, 40.0, 200.0]))


def test_trained_twin_steps_as_it_scores(trained, events_csv):
    """The 60 customers of the tiny event file (1 to 25 events), each scored after 30 days
    of silence."""
    sequences = twin_sequences(trained, events_csv)
    batch = sequences.batch(np.arange(len(sequences)), with_targets=False)
    assert sequences.lengths.min() == 1 and sequences.lengths.max() == 25
    step = step_model(trained)
    assert_steps_match_full_history(step, batch, torch.full((len(sequences),), 30.0))


def test_bootstrap_equals_stepping(trained, events_csv):
    """States from the histories in batched passes (chunks of 16 customers) equal the states
    after stepping every event, field by field."""
    sequences = twin_sequences(trained, events_csv)
    chunks = list(bootstrap_states(trained, sequences, batch_size=16))
    assert [len(index) for index, _ in chunks] == [16, 16, 16, 12]
    np.testing.assert_array_equal(np.concatenate([index for index, _ in chunks]), np.arange(60))
    bootstrapped = {name: np.concatenate([states[name] for _, states in chunks])
                    for name in chunks[0][1]}
    batch = sequences.batch(np.arange(len(sequences)), with_targets=False)
    _, stepped = step_through(step_model(trained), batch, torch.zeros(len(sequences)))
    assert bootstrapped.keys() == stepped.keys()
    for name, value in stepped.items():
        np.testing.assert_allclose(bootstrapped[name], value.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def test_bootstrap_refuses_histories_longer_than_max_len(trained, events_csv):
    sequences = twin_sequences(trained, events_csv)
    with pytest.raises(ValueError, match="history of 25 events is longer than the twin's max_len 8"):
        next(bootstrap_states(with_max_len(trained, WINDOW), sequences))


def default_model(name: str) -> StepModel:
    """The default config of an encoder on CDNOW (one event type, one numeric feature)."""
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"))
    scaling = SCALING | {"numeric_mean": [0.5], "numeric_std": [2.0]}
    model = TwinModule(encoder=config["encoder"], vocab_size=3, scaling=scaling, n_numeric=1,
                       n_components=config["n_components"])  # types: padding, unknown, purchase
    return StepModel(model, max_len=64)


def test_state_layout_of_the_default_configs():
    """Fixed per-customer shapes from the model config; bytes per customer on CDNOW."""
    lstm, transformer = default_model("lstm"), default_model("transformer")
    assert lstm.layout.describe() == (
        "c: float32 array of shape (1, 128), h: float32 array of shape (1, 128), "
        "hidden: float32 array of shape (128,), since: float32 array of shape (3, 2), "
        "summary: float32 array of shape (5, 2)"
    )
    assert lstm.layout.nbytes == (3 * 128 + 3 * 2 + 5 * 2) * 4 == 1600
    shapes = {spec.name: spec.shape for spec in transformer.layout.fields}
    assert shapes["k"] == shapes["v"] == (2, 4, 64, 32)  # layers, heads, max_len, head size
    assert shapes["count"] == (1,) and shapes["elapsed"] == (2,)
    assert transformer.layout.nbytes == 2 * 2 * 4 * 64 * 32 * 4 + 8 + 8 + 512 + 24 + 40 == 131664


def test_initial_state_is_all_zeros():
    step = StepModel(build_module(TINY_ENCODERS["transformer"]), max_len=WINDOW)
    state = step.initial_state(3)
    assert [name for name in state] == step.field_names
    for spec in step.layout.fields:
        assert state[spec.name].shape == (3, *spec.shape)
        assert state[spec.name].dtype == spec.dtype and not state[spec.name].any()


@pytest.mark.parametrize("encoder", ENCODERS)
def test_stepped_states_round_trip_through_the_store(tmp_path, encoder):
    step = StepModel(build_module(TINY_ENCODERS[encoder], n_numeric=2), max_len=WINDOW)
    batch = build_batch([WINDOW + 3, 2], n_numeric=2)
    _, state = step_through(step, batch, torch.zeros(2))
    arrays = [{name: value[i].numpy() for name, value in state.items()} for i in range(2)]
    with open_store(f"sqlite:///{tmp_path / 'twins.db'}") as store:
        store.declare("twin", 1, step.layout)
        updates = [StateUpdate(f"c{i}", 1, 0, arrays[i]) for i in range(2)]
        assert store.apply("twin", 1, updates).applied == (0, 1)
        stored = store.get("twin", 1, ["c0", "c1"]).states
    for i in range(2):
        for name, value in arrays[i].items():
            np.testing.assert_array_equal(stored[f"c{i}"].arrays[name], value, err_msg=name)


def test_past_max_len_the_transformer_forgets_and_the_lstm_carries():
    """Two customers differing only in their first event's amount: once that event has left
    the window, a one-layer transformer without running features answers the same for both;
    the LSTM still tells them apart."""
    config = TINY_ENCODERS["transformer"] | {
        "num_layers": 1, "type_recency": False, "history_summary": False
    }
    batch = build_batch([WINDOW + 2, WINDOW + 2], seed=4)
    for key in ("event_type", "amount", "delta_t", "day_of_week", "day_of_month", "hour"):
        batch[key][1] = batch[key][0]
    batch["amount"][1, 0] = batch["amount"][0, 0] + 500.0
    days = torch.zeros(2)
    transformer, _ = step_through(StepModel(build_module(config), WINDOW), batch, days)
    lstm, _ = step_through(StepModel(build_module(TINY_ENCODERS["lstm"]), WINDOW), batch, days)
    churn = [out["churn_prob"] for out in transformer]
    assert churn[WINDOW - 1][0] != churn[WINDOW - 1][1]  # the first event is still in view
    assert churn[WINDOW][0] == churn[WINDOW][1] and churn[WINDOW + 1][0] == churn[WINDOW + 1][1]
    assert lstm[WINDOW + 1]["churn_prob"][0] != lstm[WINDOW + 1]["churn_prob"][1]


def test_divergence_past_max_len(trained, events_csv):
    """One row per event past max_len of each long customer; zero rows when none is long."""
    sequences = twin_sequences(trained, events_csv)
    long = sequences.lengths > WINDOW
    frame = divergence_past_max_len(trained.model, sequences, WINDOW)
    assert list(frame.columns) == ["customer_id", "events", *OUTPUT_NAMES]
    assert len(frame) == int((sequences.lengths[long] - WINDOW).sum())
    expected_ids = np.repeat(sequences.customer_ids[long], sequences.lengths[long] - WINDOW)
    assert sorted(frame["customer_id"]) == sorted(expected_ids)
    assert frame["events"].min() == WINDOW + 1 and frame["events"].max() == 25
    values = frame[list(OUTPUT_NAMES)].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and values.max() > TOLERANCE
    assert divergence_past_max_len(trained.model, sequences, 25).empty


@pytest.fixture(scope="module", params=ENCODERS)
def exported_step(request, tmp_path_factory) -> tuple[TrainedTwin, Path, ParityReport]:
    """Each tiny trained twin with a window of 8 events, its step graph and parity report."""
    checkpoint = "tiny_checkpoint" if request.param == "lstm" else "tiny_transformer_checkpoint"
    twin = with_max_len(load_twin(request.getfixturevalue(checkpoint)), WINDOW)
    path = tmp_path_factory.mktemp(f"step_{request.param}") / "step.onnx"
    return twin, path, export_step_model(twin, path)


def onnx_step_through(path: Path, step: StepModel, batch: Tensors,
                      days: torch.Tensor) -> list[Tensors]:
    """``step_through`` with the exported graph in onnxruntime: the outputs after each event."""
    session = ort_session(path, threads=1)
    state = step.initial_state(len(days))
    outputs = []
    for t in range(int(batch["length"].max())):
        feeds = {spec.name: batch[spec.name][:, t].numpy() for spec in step.event_inputs}
        feeds["days_since_last_event"] = days.numpy()
        feeds |= {f"state_{name}": value for name, value in state.items()}
        got = dict(zip(step.output_names, session.run(step.output_names, feeds), strict=True))
        state = {name: got[f"new_state_{name}"] for name in step.field_names}
        outputs.append({name: torch.from_numpy(got[name]) for name in OUTPUT_NAMES})
    return outputs


def test_exported_step_graph_steps_as_torch(exported_step, events_csv):
    """The step graph (window of 8 events) fed the customers' events one by one with
    onnxruntime: equal to the PyTorch step model after every event, past the window too, and
    so to the full-history model up to the window."""
    twin, path, report = exported_step
    assert report.worst <= TOLERANCE and report.shapes == [(1, 1), (4, 1), (33, 1)]
    graph = onnx.load(path)
    assert {value.type.tensor_type.shape.dim[0].dim_param for value in graph.graph.input} == {
        "batch"
    }
    step = step_model(twin)
    sequences = twin_sequences(twin, events_csv)  # at most 8 events each
    full = twin_sequences(with_max_len(twin, 100), events_csv)  # up to 25 events
    batch = full.batch(np.arange(len(full)), with_targets=False)
    days = torch.full((len(full),), 12.0)
    got = onnx_step_through(path, step, batch, days)
    want, _ = step_through(step, batch, days)
    assert len(got) == 25 and int(sequences.lengths.max()) == WINDOW
    for t in range(len(got)):
        worst = worst_difference(got[t], want[t], batch["length"] > t)
        assert max(worst.values()) <= TOLERANCE, f"after event {t + 1}: {worst}"
        if t < WINDOW:
            expected = full_history_outputs(twin.model, batch, t + 1, days)
            worst = worst_difference(got[t], expected, batch["length"] > t)
            assert max(worst.values()) <= TOLERANCE, f"full history, event {t + 1}: {worst}"


@pytest.mark.slow
def test_exported_step_graph_equals_the_exported_full_history_model(
    exported_step, events_csv, tmp_path
):
    """Both exported graphs in onnxruntime: the step graph after each event up to the window
    equals the full-history graph on the events so far."""
    twin, path, _ = exported_step
    export_onnx(twin, tmp_path / "full.onnx")
    full = ort_session(tmp_path / "full.onnx")
    names = ExportableTwin(twin.model).input_names
    sequences = twin_sequences(twin, events_csv)
    batch = sequences.batch(np.arange(len(sequences)), with_targets=False)
    days = torch.full((len(sequences),), 12.0)
    for t, got in enumerate(onnx_step_through(path, step_model(twin), batch, days)):
        prefix = {k: v[:, : t + 1].numpy() for k, v in batch.items() if v.dim() >= 2}
        prefix |= {"length": batch["length"].clamp(max=t + 1).numpy(),
                   "days_since_last_event": days.numpy()}
        values = full.run(list(OUTPUT_NAMES), {name: prefix[name] for name in names})
        expected = {name: torch.from_numpy(v) for name, v in zip(OUTPUT_NAMES, values, strict=True)}
        worst = worst_difference(got, expected, batch["length"] > t)
        assert max(worst.values()) <= TOLERANCE, f"after event {t + 1}: {worst}"


def test_export_that_fails_its_parity_check_leaves_no_file(tmp_path, monkeypatch):
    twin = TrainedTwin(build_module(TINY_ENCODERS["lstm"]), None, {})
    monkeypatch.setattr(step_module, "step_model", lambda _: StepModel(twin.model, WINDOW))
    monkeypatch.setattr(StepModel, "to_onnx", lambda self, path: Path(path).write_bytes(b"graph"))
    monkeypatch.setattr(step_module, "check_step_parity",
                        lambda *_, **__: ParityReport(max_scaled={"churn_prob": 0.5}))
    with pytest.raises(ExportParityError, match=r"tolerance 0.0001\): \{'churn_prob': 0.5\}"):
        export_step_model(twin, tmp_path / "step.onnx")
    assert list(tmp_path.iterdir()) == []
