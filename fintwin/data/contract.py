"""The exported model's inputs and outputs: one table that everything else derives from.

The ONNX export (names, order, dynamic axes), the served model's request validation (it reads
the table from the exported ``fintwin.json``), the clients' batches, the export's random parity
batches and the rollouts' model inputs all come from ``MODEL_INPUTS`` and ``MODEL_OUTPUTS``;
CONTRACT.md shows them (``markdown_tables``, checked by a test).

Axes are named. ``batch`` and ``seq`` are dynamic: any size >= 1, shared by every tensor that
has them. The others are sizes of one model, fixed when it is exported (``SIZE_AXES``). Inputs
with a ``seq`` axis are right-padded: positions at or after a row's ``length`` hold
``PADDING``. An input with a model-size axis of size 0 (``numeric`` of a model without numeric
features) is left out of that model. A bound may name a list of model sizes (``FIELD_SIZES``):
one bound per element of the input's last axis (each categorical feature's vocabulary size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fintwin.data.features import OOV_ID

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "seq"
SIZE_AXES = {
    "vocab_size": "event-type ids, padding (0) and unknown type (1) included",
    "quantiles": "levels of the time quantiles (fintwin.json `quantiles`)",
    "numeric_features": "numeric feature columns (fintwin.json `featuriser.numeric_features`)",
    "categorical_features": "categorical feature columns (fintwin.json `featuriser.categorical_features`)",
}
FIELD_SIZES = {  # list-valued model sizes: one per element of an axis of SIZE_AXES
    "categorical_sizes": ("categorical_features", "ids of each categorical feature, padding (0) "
                          "and unknown value (1) included"),
}
OPTIONAL_SIZES = {"categorical_features": 0, "categorical_sizes": ()}  # absent: no such input
PADDING = 0
LENGTH_INPUT = "length"
CONTRACT_KEY = "contract"  # fintwin.json: the table with this model's sizes filled in
Sizes = Mapping[str, int | Sequence[int]]  # a model's SIZE_AXES and FIELD_SIZES


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``low`` (inclusive) and ``high`` bound the values of real (not padding) elements; ``high``
    is a number, the name of an axis or model size, or the name of a ``FIELD_SIZES`` list (a
    bound per element of the last axis), excluded with ``closed="left"`` and included with
    ``closed="both"``. Floats must be finite. ``example`` is the numpy
    ``Generator`` method and its parameters that random valid floats are drawn with (integers
    are drawn uniformly within their bounds).
    """

    name: str
    dtype: str
    axes: tuple[str, ...]
    meaning: str
    low: float | None = None
    high: int | str | None = None
    closed: Literal["left", "both"] = "left"
    example: tuple[str | float, ...] = ()

    @property
    def finite(self) -> bool:
        """Whether every value must be finite (all float tensors)."""
        return np.dtype(self.dtype).kind == "f"

    @property
    def padded(self) -> bool:
        """Whether the tensor has the sequence axis, right-padded with ``PADDING``."""
        return SEQUENCE_AXIS in self.axes

    @property
    def accepted_low(self) -> float | None:
        """Smallest value anywhere in the tensor: ``low``, or ``PADDING`` below it."""
        if self.low is None or not self.padded:
            return self.low
        return min(self.low, PADDING)


MODEL_INPUTS = (
    TensorSpec("event_type", "int64", (BATCH_AXIS, SEQUENCE_AXIS),
               "event-type id (1: a type unknown to the vocabulary)",
               low=OOV_ID, high="vocab_size"),
    TensorSpec("amount", "float32", (BATCH_AXIS, SEQUENCE_AXIS), "raw amount of the event",
               example=("lognormal", 3.0, 1.5)),
    TensorSpec("delta_t", "float32", (BATCH_AXIS, SEQUENCE_AXIS),
               "days since the customer's previous event (0 for the first)",
               low=0.0, example=("exponential", 10.0)),
    TensorSpec("day_of_week", "int64", (BATCH_AXIS, SEQUENCE_AXIS), "Monday = 0",
               low=0, high=7),
    TensorSpec("day_of_month", "int64", (BATCH_AXIS, SEQUENCE_AXIS), "first day = 1",
               low=1, high=32),
    TensorSpec("hour", "int64", (BATCH_AXIS, SEQUENCE_AXIS),
               "hour of the day (0 when timestamps are dates)", low=0, high=24),
    TensorSpec(LENGTH_INPUT, "int64", (BATCH_AXIS,), "real events of the row",
               low=1, high=SEQUENCE_AXIS, closed="both"),
    TensorSpec("days_since_last_event", "float32", (BATCH_AXIS,),
               "silence since the row's last event when asked (0: right after it)",
               low=0.0, example=("exponential", 60.0)),
    TensorSpec("numeric", "float32", (BATCH_AXIS, SEQUENCE_AXIS, "numeric_features"),
               "raw numeric features, in fintwin.json `featuriser.numeric_features` order",
               example=("normal", 0.0, 3.0)),
    TensorSpec("categorical", "int64", (BATCH_AXIS, SEQUENCE_AXIS, "categorical_features"),
               "categorical feature ids, in fintwin.json `featuriser.categorical_features` order (1: a value "
               "unknown to the feature's vocabulary)", low=OOV_ID, high="categorical_sizes"),
)

MODEL_OUTPUTS = (
    TensorSpec("next_event_probs", "float32", (BATCH_AXIS, "vocab_size"),
               "probability of each event-type id being the next event's"),
    TensorSpec("next_time_mean", "float32", (BATCH_AXIS,),
               "mean days to the next event, if there is one"),
    TensorSpec("next_time_quantiles", "float32", (BATCH_AXIS, "quantiles"),
               "days to the next event at the `quantiles` levels, if there is one"),
    TensorSpec("dormant_prob", "float32", (BATCH_AXIS,), "probability of no next event"),
    TensorSpec("next_amount_mean", "float32", (BATCH_AXIS,), "expected amount of the next event"),
    TensorSpec("churn_prob", "float32", (BATCH_AXIS,),
               "probability of no event within `horizon_days` after the last one"),
    TensorSpec("horizon_count", "float32", (BATCH_AXIS,),
               "expected events in the `horizon_days` after `days_since_last_event`"),
    TensorSpec("horizon_spend", "float32", (BATCH_AXIS,),
               "expected spend in the `horizon_days` after `days_since_last_event`"),
)
OUTPUT_NAMES = tuple(spec.name for spec in MODEL_OUTPUTS)


def _size(axis: str, sizes: Sizes) -> int:
    if axis not in sizes and axis not in OPTIONAL_SIZES:
        raise KeyError(f"model size {axis!r} is not given; expected sizes of {sorted(SIZE_AXES)}")
    return int(sizes.get(axis, OPTIONAL_SIZES.get(axis)))


def _field_sizes(name: str, sizes: Sizes) -> list[int]:
    """The list-valued model size ``name``, one value per element of its axis."""
    axis, _ = FIELD_SIZES[name]
    values = [int(value) for value in sizes.get(name, OPTIONAL_SIZES.get(name, ()))]
    if len(values) != _size(axis, sizes):
        raise ValueError(f"model size {name!r} has {len(values)} values; expected one per "
                         f"{axis!r} ({_size(axis, sizes)})")
    return values


def model_inputs(sizes: Sizes) -> list[TensorSpec]:
    """The inputs of a model with these ``SIZE_AXES`` sizes, in graph order."""
    return [
        spec for spec in MODEL_INPUTS
        if all(_size(axis, sizes) > 0 for axis in spec.axes if axis in SIZE_AXES)
    ]


def sequence_inputs(sizes: Sizes) -> list[TensorSpec]:
    """The model's per-event inputs (those with the sequence axis)."""
    return [spec for spec in model_inputs(sizes) if spec.padded]


def _resolve(value: int | str | None, sizes: Sizes) -> int | list[int] | str | None:
    """A model size (or list of sizes) replaced by its value; numbers and dynamic axes are
    kept."""
    if isinstance(value, str) and value in FIELD_SIZES:
        return _field_sizes(value, sizes)
    return _size(value, sizes) if isinstance(value, str) and value in SIZE_AXES else value


def _output_entry(spec: TensorSpec, sizes: Sizes) -> dict:
    return {"name": spec.name, "dtype": spec.dtype,
            "shape": [_resolve(axis, sizes) for axis in spec.axes]}


def _input_entry(spec: TensorSpec, sizes: Sizes) -> dict:
    return _output_entry(spec, sizes) | {
        "low": spec.accepted_low, "high": _resolve(spec.high, sizes), "closed": spec.closed,
        "finite": spec.finite,
    }


def exported_contract(sizes: Sizes) -> dict[str, list[dict]]:
    """The table as plain JSON for fintwin.json: this model's inputs and outputs, model sizes
    filled in, each input with the bounds of any of its values (padding included)."""
    return {
        "inputs": [_input_entry(spec, sizes) for spec in model_inputs(sizes)],
        "outputs": [_output_entry(spec, sizes) for spec in MODEL_OUTPUTS],
    }


def random_inputs(rng: np.random.Generator, sizes: Sizes, batch: int, seq_len: int,
                  lengths: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Random valid inputs: ``lengths`` (default random in [1, seq_len], the first row full),
    real values within bounds, ``PADDING`` after each row's length."""
    if lengths is None:
        lengths = rng.integers(1, seq_len + 1, size=batch)
        lengths[0] = seq_len
    lengths = np.asarray(lengths, dtype=np.int64)
    real = np.arange(seq_len)[None, :] < lengths[:, None]
    inputs = {LENGTH_INPUT: lengths}
    for spec in model_inputs(sizes):
        if spec.name == LENGTH_INPUT:
            continue
        shape = tuple(batch if axis == BATCH_AXIS else seq_len if axis == SEQUENCE_AXIS
                      else _size(axis, sizes) for axis in spec.axes)
        values = _draw(spec, rng, shape, sizes)
        if spec.padded:
            mask = real.reshape(real.shape + (1,) * (values.ndim - 2))
            values = np.where(mask, values, PADDING).astype(values.dtype)
        inputs[spec.name] = values
    return {spec.name: inputs[spec.name] for spec in model_inputs(sizes)}


def _draw(spec: TensorSpec, rng: np.random.Generator, shape: tuple[int, ...],
          sizes: Sizes) -> np.ndarray:
    if spec.finite:
        method, *parameters = spec.example
        return getattr(rng, method)(*parameters, shape).astype(spec.dtype)
    high = _resolve(spec.high, sizes)
    if isinstance(high, list):  # one bound per element of the last axis
        high = np.asarray(high)
    return rng.integers(spec.low, high + (spec.closed == "both"), shape, dtype=spec.dtype)


def _bounds_text(spec: TensorSpec) -> str:
    if spec.low is None:
        return "finite" if spec.finite else ""
    if spec.high is None:
        return f">= {spec.low:g}" + (", finite" if spec.finite else "")
    right = "]" if spec.closed == "both" else ")"
    return f"[{spec.low:g}, {spec.high}{right}"


def markdown_tables() -> str:
    """The inputs and outputs as the Markdown tables of CONTRACT.md."""
    lines = ["| input | dtype | shape | values | padding | meaning |", "|---|---|---|---|---|---|"]
    for spec in MODEL_INPUTS:
        padding = str(PADDING) if spec.padded else ""
        lines.append(f"| `{spec.name}` | {spec.dtype} | [{', '.join(spec.axes)}] | "
                     f"{_bounds_text(spec)} | {padding} | {spec.meaning} |")
    lines += ["", "| output | dtype | shape | meaning |", "|---|---|---|---|"]
    lines += [f"| `{spec.name}` | {spec.dtype} | [{', '.join(spec.axes)}] | {spec.meaning} |"
              for spec in MODEL_OUTPUTS]
    lines += ["", "| axis | size |", "|---|---|",
              f"| `{BATCH_AXIS}` | dynamic: rows (customers) of the request |",
              f"| `{SEQUENCE_AXIS}` | dynamic: events per row, padding included |"]
    lines += [f"| `{axis}` | fixed at export: {text} |" for axis, text in SIZE_AXES.items()]
    lines += [f"| `{name}` | fixed at export, one per `{axis}`: {text} |"
              for name, (axis, text) in FIELD_SIZES.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_tables(), end="")
