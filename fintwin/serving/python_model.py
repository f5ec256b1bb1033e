"""Run an exported fintwin ONNX model with onnxruntime: in Triton's python backend or in process.

This file is copied verbatim into the embedded server's runtime repository as
``<name>/<version>/model.py`` next to the version's ``model.onnx`` and ``fintwin.json``; the
model itself imports nothing from fintwin: the bounds it checks each input against come from
the contract table the export wrote into ``fintwin.json`` (CONTRACT.md). The Triton entry point
records fintwin's metrics (``fintwin.monitor``; the embedded server runs where fintwin is
installed). ``OnnxModel`` holds everything that
is not Triton-specific (onnxruntime options, request validation, batching) and is also what the
in-process runner uses, so both paths validate and compute identically.

Per Triton ``execute`` call, the valid requests are right-padded on the sequence axis to the
longest one and run as one onnxruntime batch, or as few as the memory budget below allows (rows
are independent and the model reads each row at its ``length``, so right-padding is harmless),
then the outputs are split per request.
Invalid requests get their own error response; they never fail the other requests of the call.

Error codes: a request the client got wrong (``InputError``: names, shapes, values, a sequence
longer than the model's ``max_len``, a size over the ``max_batch_elements`` budget) is answered
``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT); anything else is our fault and is answered
``INTERNAL`` (HTTP 500, gRPC INTERNAL).

Memory budget: the config parameter ``max_batch_elements`` (default ``DEFAULT_MAX_BATCH_ELEMENTS``)
bounds rows x sequence positions of one onnxruntime run. A request over it is refused before
anything is padded or run, and requests batched together are split into runs within it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton's python backend (in-process runner, tests)
    pb_utils = None

METADATA_FILENAME = "fintwin.json"
FEATURISER_KEY = "featuriser"  # fintwin.json: the featuriser spec (fintwin.data.features)
MAX_LEN_KEY = "max_len"  # in the spec: the most events per customer the model was trained to read
CONTRACT_KEY = "contract"  # fintwin.json: the model's inputs (with bounds) and outputs
INTRA_OP_THREADS_PARAMETER = "intra_op_threads"
MAX_BATCH_ELEMENTS_PARAMETER = "max_batch_elements"
DEFAULT_MAX_BATCH_ELEMENTS = 1 << 18  # rows x positions per run, e.g. 1024 customers x 256 events

ORT_TO_NUMPY = {
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
}
NUMPY_TO_TRITON = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}


class InputError(ValueError):
    """A request's inputs do not match what the model expects (the client's fault: 400)."""


class MetadataError(ValueError):
    """The version's fintwin.json has no contract, or one that disagrees with its model.onnx."""


@dataclass(frozen=True)
class TensorSpec:
    """A graph tensor: its dtype and shape, each axis a size (static) or a name (dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]

    @classmethod
    def from_node(cls, node: ort.NodeArg) -> TensorSpec:
        """Spec of an onnxruntime input/output.

        Axis 0 is the batch axis of every tensor; other dynamic axes keep their symbolic name
        (inputs sharing one, like ``seq``, must agree) or get a name of their own.
        """
        shape: list[int | str] = []
        for axis, dim in enumerate(node.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append("batch")
            else:
                shape.append(dim or f"{node.name}:{axis}")
        return cls(node.name, ORT_TO_NUMPY[node.type], tuple(shape))

    def describe(self) -> str:
        """Human-readable expectation, e.g. ``INT64 [batch, seq]``."""
        return f"{NUMPY_TO_TRITON[self.dtype]} [{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class Bounds:
    """The values an input may hold, from its contract entry: ``low`` (inclusive) and ``high``,
    a number, the name of an axis whose size in the request bounds it, or a list of numbers
    (one per element of the last axis: each categorical feature's vocabulary size), excluded
    when ``closed`` is "left" and included when it is "both"; ``finite``: no NaN/inf."""

    low: float | None
    high: float | str | list[float] | None
    closed: str
    finite: bool

    @classmethod
    def from_entry(cls, entry: Mapping) -> Bounds:
        return cls(entry.get("low"), entry.get("high"), entry.get("closed", "left"),
                   bool(entry.get("finite")))

    def outside(self, array: np.ndarray, high: float | list[float] | None) -> np.ndarray | None:
        """Mask of the values out of bounds, None when all are inside (cheap when valid)."""
        too_low = self.low is not None and array.min() < self.low
        upper = np.asarray(np.inf if high is None else high)
        peak = array.max() if upper.ndim == 0 else array.reshape(-1, len(upper)).max(axis=0)
        too_high = high is not None and bool(
            np.any(peak > upper if self.closed == "both" else peak >= upper)
        )
        if not (too_low or too_high):
            return None
        low = -np.inf if self.low is None else self.low
        return (array < low) | ((array > upper) if self.closed == "both" else (array >= upper))

    def describe(self, high: float | None) -> str:
        """E.g. ``values in [0, 12)``, ``values in [1, 5] (5 = the size of the 'seq' axis)``,
        ``values >= 0``."""
        if high is None:
            return f"values >= {_number(self.low)}"
        axis = f" ({high} = the size of the {self.high!r} axis)" if isinstance(self.high, str) else ""
        if self.low is None:
            return f"values {'<=' if self.closed == 'both' else '<'} {_number(high)}{axis}"
        right = "]" if self.closed == "both" else ")"
        return f"values in [{_number(self.low)}, {_number(high)}{right}{axis}"


def load_onnx(
    onnx_path: Path,
    intra_op_threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """Load an ONNX file into onnxruntime tuned for serving: all graph optimisations, set threads.

    ``intra_op_threads=0`` lets onnxruntime use one thread per physical core (batch scoring);
    1 is best for batch-1 latency and for several model instances sharing the machine.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=list(providers))


class OnnxModel:
    """One exported model version: validates requests and runs them, batched, with onnxruntime."""

    def __init__(
        self,
        onnx_path: Path,
        metadata: Mapping,
        intra_op_threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        max_batch_elements: int = DEFAULT_MAX_BATCH_ELEMENTS,
    ) -> None:
        featuriser = metadata.get(FEATURISER_KEY) or {}
        self.max_len = int(featuriser[MAX_LEN_KEY]) if MAX_LEN_KEY in featuriser else None
        self.max_batch_elements = check_budget(max_batch_elements, self.max_len)
        self.runtime = load_onnx(onnx_path, intra_op_threads, providers)
        self.inputs = [TensorSpec.from_node(node) for node in self.runtime.get_inputs()]
        self.outputs = [TensorSpec.from_node(node) for node in self.runtime.get_outputs()]
        self.output_names = [spec.name for spec in self.outputs]
        # the first [B, T, ...] input: its T is the sequence axis every such input shares
        self.sequence_input = next((s.name for s in self.inputs if len(s.shape) >= 2), None)
        self.bounds = contract_bounds(metadata, self.inputs, self.outputs, Path(onnx_path))
        per_position = [
            spec.name for spec in self.outputs if any(isinstance(d, str) for d in spec.shape[1:])
        ]
        if per_position:
            raise ValueError(
                f"outputs {per_position} have dynamic non-batch axes; only per-row outputs "
                "can be served with sequence padding"
            )

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise InputError naming the input and what was expected if ``inputs`` are unusable.

        Names, dtypes and shapes first, then the size (``max_len``, ``max_batch_elements``),
        and only then the values, so an oversized request is refused before anything is
        allocated for it.
        """
        _check_names(inputs, self.inputs)
        axis_sizes: dict[str, tuple[int, str]] = {}
        for spec in self.inputs:
            _check_tensor(inputs[spec.name], spec, axis_sizes)
        self._check_size(inputs)
        for spec in self.inputs:
            _check_values(inputs[spec.name], spec.name, self.bounds[spec.name], axis_sizes)

    def _check_size(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Sequence axis within ``max_len``; rows x positions within ``max_batch_elements``."""
        sequence = self.sequence_input
        if sequence is None:
            return
        rows, seq_len = inputs[sequence].shape[:2]
        if self.max_len is not None and seq_len > self.max_len:
            raise InputError(
                f"input {sequence!r} has T={seq_len} events per row, more than this model's "
                f"max_len={self.max_len}; send each customer's most recent {self.max_len} events "
                "(truncate from the left, as TwinClient does)"
            )
        if rows * seq_len > self.max_batch_elements:
            raise InputError(
                f"input {sequence!r} has shape [{rows}, {seq_len}] = {rows * seq_len} elements, "
                f"more than this model's budget of {self.max_batch_elements} (rows x events, "
                f"config parameter {MAX_BATCH_ELEMENTS_PARAMETER!r}); send at most "
                f"{max(1, self.max_batch_elements // seq_len)} rows of this length per request"
            )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and run one batch; raises InputError on bad inputs."""
        self.validate(inputs)
        values = self.runtime.run(
            self.output_names, {spec.name: inputs[spec.name] for spec in self.inputs}
        )
        return dict(zip(self.output_names, values, strict=True))

    def run_many(
        self, requests: Sequence[Mapping[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | Exception]:
        """Run several requests as few onnxruntime batches as the budget allows; per request its
        outputs or its error."""
        results: dict[int, dict[str, np.ndarray] | Exception] = {}
        for index, inputs in enumerate(requests):
            try:
                self.validate(inputs)
            except InputError as exc:
                results[index] = exc
        valid = [index for index in range(len(requests)) if index not in results]
        for run in self._split_within_budget(valid, requests):
            results.update(zip(run, self._run_group([requests[i] for i in run]), strict=True))
        return [results[index] for index in range(len(requests))]

    def _split_within_budget(
        self, indices: list[int], requests: Sequence[Mapping[str, np.ndarray]]
    ) -> list[list[int]]:
        """``indices`` cut into consecutive runs whose padded size (total rows x longest T) fits
        the budget; every validated request fits it alone."""
        runs: list[list[int]] = []
        rows = seq_len = 0
        for index in indices:
            shape = self._batch_shape(requests[index])
            grown_rows, grown_len = rows + shape[0], max(seq_len, shape[1])
            if runs and grown_rows * grown_len <= self.max_batch_elements:
                runs[-1].append(index)
                rows, seq_len = grown_rows, grown_len
            else:
                runs.append([index])
                rows, seq_len = shape
        return runs

    def _batch_shape(self, request: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """(rows, T) of a validated request; T = 1 for a model without a sequence axis."""
        if self.sequence_input is None:
            return len(request[self.inputs[0].name]), 1
        rows, seq_len = request[self.sequence_input].shape[:2]
        return rows, seq_len

    def _run_group(
        self, group: list[Mapping[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | Exception]:
        """Run validated requests together; if onnxruntime fails, isolate the failing ones."""
        if not group:
            return []
        try:
            batch = {
                spec.name: _pad_and_stack([r[spec.name] for r in group]) for spec in self.inputs
            }
            values = self.runtime.run(self.output_names, batch)
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            if len(group) == 1:
                return [RuntimeError(f"onnxruntime failed on this request: {exc}")]
            return [result for request in group for result in self._run_group([request])]
        rows = list(accumulate((len(r[self.inputs[0].name]) for r in group), initial=0))
        return [
            {name: value[start:stop] for name, value in zip(self.output_names, values, strict=True)}
            for start, stop in zip(rows[:-1], rows[1:], strict=True)
        ]


def check_budget(max_batch_elements: int, max_len: int | None) -> int:
    """The rows x positions budget, refused when it could not hold one full-length customer."""
    if max_batch_elements < 1:
        raise ValueError(f"{MAX_BATCH_ELEMENTS_PARAMETER}={max_batch_elements}: expected >= 1")
    if max_len is not None and max_batch_elements < max_len:
        raise ValueError(
            f"{MAX_BATCH_ELEMENTS_PARAMETER}={max_batch_elements} is smaller than the model's "
            f"max_len={max_len}: one customer with a full history would be refused"
        )
    return max_batch_elements


def config_parameter(config: Mapping, name: str, default: int) -> int:
    """An integer parameter of a model config in its JSON form, or ``default`` when unset."""
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ValueError(
            f"model config parameter {name!r} is {value!r}; expected an integer"
        ) from None


def contract_bounds(
    metadata: Mapping, inputs: list[TensorSpec], outputs: list[TensorSpec], onnx_path: Path
) -> dict[str, Bounds]:
    """Each input's bounds from the metadata's contract, once its inputs and outputs (names,
    dtypes, shapes) are checked to be those of the graph."""
    source = f"{onnx_path.with_name(METADATA_FILENAME)}"
    contract = metadata.get(CONTRACT_KEY)
    if not isinstance(contract, Mapping) or not {"inputs", "outputs"} <= set(contract):
        raise MetadataError(
            f"{source} has no {CONTRACT_KEY!r} with 'inputs' and 'outputs', which the served "
            "model checks requests against; export the model again with `fintwin export`"
        )
    for kind, specs in (("inputs", inputs), ("outputs", outputs)):
        declared = [_declared(entry) for entry in contract[kind]]
        graph = [f"{spec.name} {spec.describe()}" for spec in specs]
        if declared != graph:
            raise MetadataError(
                f"{source} declares {kind} {declared}, but {onnx_path.name} has {graph}; "
                "both must come from the same export"
            )
    bounds = {entry["name"]: Bounds.from_entry(entry) for entry in contract["inputs"]}
    per_element = {spec.name: (bounds[spec.name].high, spec.shape[-1]) for spec in inputs
                   if isinstance(bounds[spec.name].high, list)}
    misfit = {name: high for name, (high, size) in per_element.items() if len(high) != size}
    if misfit:
        raise MetadataError(
            f"{source} bounds inputs by lists that do not have one bound per element of their "
            f"last axis: {misfit}; export the model again with `fintwin export`"
        )
    axes = {axis for spec in inputs for axis in spec.shape if isinstance(axis, str)}
    unknown = {name: b.high for name, b in bounds.items() if isinstance(b.high, str) and b.high not in axes}
    if unknown:
        raise MetadataError(
            f"{source} bounds inputs by axes the graph does not have: {unknown}; its axes are "
            f"{sorted(axes)}"
        )
    return bounds


def _declared(entry: Mapping) -> str:
    """A contract entry described as the graph's tensors are, e.g. ``length INT64 [batch]``."""
    spec = TensorSpec(entry["name"], np.dtype(entry["dtype"]), tuple(entry["shape"]))
    return f"{spec.name} {spec.describe()}"


def _check_names(inputs: Mapping[str, np.ndarray], specs: list[TensorSpec]) -> None:
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in inputs]
    unexpected = [name for name in inputs if name not in expected]
    if missing or unexpected:
        raise InputError(f"inputs missing {missing}, unexpected {unexpected}; expected {expected}")


def _check_tensor(
    array: np.ndarray, spec: TensorSpec, axis_sizes: dict[str, tuple[int, str]]
) -> None:
    """dtype, rank, static dims, and dynamic axes agreeing across inputs (batch, seq)."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"input {spec.name!r} is a {type(array).__name__}, expected a numpy array")
    if array.dtype != spec.dtype:
        got = f"{array.dtype} ({NUMPY_TO_TRITON.get(array.dtype, '?')})"
        raise InputError(f"input {spec.name!r} has dtype {got}, expected {spec.describe()}")
    if array.ndim != len(spec.shape):
        raise InputError(
            f"input {spec.name!r} has shape {list(array.shape)}, expected rank {len(spec.shape)}: "
            f"{spec.describe()}"
        )
    for size, dim in zip(array.shape, spec.shape, strict=True):
        if isinstance(dim, int) and size != dim:
            raise InputError(
                f"input {spec.name!r} has shape {list(array.shape)}, expected {spec.describe()}"
            )
        if isinstance(dim, str):
            first_size, first_name = axis_sizes.setdefault(dim, (size, spec.name))
            if size != first_size:
                raise InputError(
                    f"input {spec.name!r} has {dim} size {size} but {first_name!r} has "
                    f"{first_size}; all inputs must share the {dim} axis"
                )
    if array.size == 0:
        raise InputError(
            f"input {spec.name!r} has shape {list(array.shape)}; expected no empty axis "
            "(at least one row, one event per row)"
        )


def _check_values(
    array: np.ndarray, name: str, bounds: Bounds, axis_sizes: Mapping[str, tuple[int, str]]
) -> None:
    """Finite where the contract says so, and inside its bounds (cheap when valid); a bound
    named after an axis is that axis' size in this request."""
    if bounds.finite and not np.isfinite(array).all():
        first = tuple(np.argwhere(~np.isfinite(array))[0])
        raise InputError(
            f"input {name!r} holds {array[first]} at row {first[0]}{_position(first[1:])}; "
            "expected finite values (no NaN/inf)"
        )
    high = axis_sizes[bounds.high][0] if isinstance(bounds.high, str) else bounds.high
    outside = bounds.outside(array, high)
    if outside is not None:
        first = tuple(np.argwhere(outside)[0])
        if isinstance(high, list):  # one bound per element of the last axis
            expected = (f"{bounds.describe(high[first[-1]])} at index {first[-1]} of the last "
                        f"axis (one bound per index: {high})")
        else:
            expected = bounds.describe(high)
        raise InputError(
            f"input {name!r} holds {array[first]} at row {first[0]}{_position(first[1:])}; "
            f"expected {expected}"
        )


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _position(position: tuple) -> str:
    return f", position {', '.join(str(p) for p in position)}" if position else ""


def _pad_and_stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis, right-padding every other axis with zeros to the max."""
    if len(arrays) == 1:
        return arrays[0]
    target = np.max([a.shape[1:] for a in arrays], axis=0)
    return np.concatenate([_right_pad(a, target) for a in arrays], axis=0)


def _right_pad(array: np.ndarray, target: np.ndarray) -> np.ndarray:
    widths = [(0, 0)] + [(0, int(t) - s) for s, t in zip(array.shape[1:], target, strict=True)]
    return np.pad(array, widths) if any(after for _, after in widths) else array


def read_metadata(version_dir: Path) -> dict:
    """The version's fintwin.json, or {} when there is none."""
    path = Path(version_dir) / METADATA_FILENAME
    return json.loads(path.read_text()) if path.exists() else {}


class TritonPythonModel:
    """Triton python-backend entry point: one instance per model instance (stub process)."""

    def initialize(self, args: dict) -> None:
        """Load this version's ``model.onnx``; ``intra_op_threads`` and ``max_batch_elements``
        are config parameters."""
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = config_parameter(config, INTRA_OP_THREADS_PARAMETER, 1)
        budget = config_parameter(config, MAX_BATCH_ELEMENTS_PARAMETER, DEFAULT_MAX_BATCH_ELEMENTS)
        self.model = OnnxModel(
            version_dir / "model.onnx",
            read_metadata(version_dir),
            threads,
            max_batch_elements=budget,
        )
        pb_utils.Logger.log_info(
            f"loaded {version_dir / 'model.onnx'} with onnxruntime {ort.__version__}, "
            f"{threads} intra-op thread(s), max_len {self.model.max_len}, at most {budget} "
            f"rows x events per run, inputs checked against {METADATA_FILENAME}'s contract"
        )
        from fintwin.monitor.served import triton_metrics

        self.metrics = triton_metrics(pb_utils, args)

    def execute(self, requests: list) -> list:
        """One response per request, in order; a bad request gets a TritonError, never a raise."""
        try:
            inputs = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
            results = self.model.run_many(inputs)
        # never let an exception out of execute: Triton would fail every request of the call
        except Exception as exc:
            results = [RuntimeError(f"internal error: {exc}")] * len(requests)
        self.metrics.requests(_outcome(result) for result in results)
        self.metrics.rejected("contract" for result in results if isinstance(result, InputError))
        self.metrics.customers(sum(len(next(iter(result.values()))) for result in results
                                   if isinstance(result, dict)))
        return [self._response(result) for result in results]

    @staticmethod
    def _response(result: dict[str, np.ndarray] | Exception) -> pb_utils.InferenceResponse:
        """An error response for an exception (INVALID_ARG for an InputError, else INTERNAL),
        else one holding the request's outputs."""
        if isinstance(result, Exception):
            error = pb_utils.TritonError
            code = error.INVALID_ARG if isinstance(result, InputError) else error.INTERNAL
            return pb_utils.InferenceResponse(output_tensors=[], error=error(str(result), code))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in result.items()
            ]
        )


def _outcome(result: dict[str, np.ndarray] | Exception) -> str:
    """A request's outcome for the metrics: ok, invalid (the client's fault) or error."""
    if isinstance(result, InputError):
        return "invalid"
    return "error" if isinstance(result, Exception) else "ok"
