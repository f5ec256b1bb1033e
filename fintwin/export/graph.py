"""The exportable graph of a twin: the contract's named inputs -> its outputs, and the ONNX
export with the workarounds the exporter needs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from fintwin.data.contract import (
    BATCH_AXIS,
    MODEL_OUTPUTS,
    SEQUENCE_AXIS,
    TensorSpec,
    model_inputs,
    random_inputs,
)
from fintwin.models.module import TwinModule

EXAMPLE_SEED = 0


class ExportableTwin(nn.Module):
    """ONNX-exportable wrapper: the contract's inputs, positionally in ``input_names`` order
    (CONTRACT.md), -> its outputs in ``output_names`` order, at each row's last real event."""

    def __init__(self, twin: TwinModule) -> None:
        super().__init__()
        self.twin = twin
        self.sizes = twin.contract_sizes()
        self.inputs: list[TensorSpec] = model_inputs(self.sizes)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in MODEL_OUTPUTS]

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        outputs = self.twin.predict_last(dict(zip(self.input_names, tensors, strict=True)))
        return tuple(outputs[name] for name in self.output_names)

    def example_inputs(self, batch_size: int = 2, seq_len: int = 8) -> tuple[Tensor, ...]:
        """Random valid inputs in ``input_names`` order, every row full length."""
        arrays = random_inputs(np.random.default_rng(EXAMPLE_SEED), self.sizes, batch_size,
                               seq_len, lengths=[seq_len] * batch_size)
        return tuple(torch.from_numpy(arrays[name]) for name in self.input_names)

    def dynamic_shapes(self) -> dict[str, tuple[dict[int, object], ...]]:
        """``dynamic_shapes`` for ``torch.onnx.export(..., dynamo=True)``: the contract's
        dynamic axes (batch, sequence) of every input, for the variadic ``forward``."""
        dims = {BATCH_AXIS: torch.export.Dim(BATCH_AXIS, min=1),
                SEQUENCE_AXIS: torch.export.Dim(SEQUENCE_AXIS, min=1)}
        return {"tensors": tuple(
            {index: dims[axis] for index, axis in enumerate(spec.axes) if axis in dims}
            for spec in self.inputs
        )}

    def to_onnx(self, path: str | os.PathLike[str] | None = None) -> onnx.ModelProto:
        """Export with ``torch.onnx.export(dynamo=True)``; dynamic batch and sequence axes.

        Writes a single file (no external data) when ``path`` is given. Raises
        ``RuntimeError`` if the graph's inputs or outputs are not the contract's, e.g. when
        the exporter fixed an axis to the example size.
        """
        self.eval()
        _clear_lstm_dispatch_cache()
        program = export_program(self, self.example_inputs(batch_size=3, seq_len=7))
        model = program.model_proto
        _check_graph(model, self.inputs, self.sizes)
        if path is not None:
            program.save(os.fspath(path), external_data=False)
        return model


def export_program(module: torch.nn.Module, example_inputs: tuple):
    """``torch.onnx.export`` (dynamo) of a module that names its inputs, outputs and dynamic
    shapes (``input_names``, ``output_names``, ``dynamic_shapes()``), as one file's program."""
    return torch.onnx.export(
        module,
        example_inputs,
        dynamic_shapes=module.dynamic_shapes(),
        input_names=module.input_names,
        output_names=module.output_names,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _clear_lstm_dispatch_cache() -> None:
    """Let the exporter's dynamic-length LSTM decomposition take effect.

    ``torch.onnx.export`` temporarily registers a ``while_loop`` decomposition of
    ``aten.lstm`` as a Python kernel but does not clear the operator's dispatch cache. Once
    an LSTM has run in the process, the cached unrolled decomposition wins, the sequence
    axis gets specialised and the exporter silently falls back to the example length.
    """
    cache = getattr(torch.ops.aten.lstm.input, "_dispatch_cache", None)
    if cache is not None:
        cache.clear()


def _check_graph(model: onnx.ModelProto, inputs: list[TensorSpec], sizes: dict[str, int]) -> None:
    """The graph's inputs and outputs are the contract's: names, order, dtypes and shapes, the
    batch and sequence axes symbolic (the exporter silently fixes an axis it cannot keep
    dynamic to the example's size)."""
    for kind, values, specs in (
        ("inputs", model.graph.input, inputs),
        ("outputs", model.graph.output, MODEL_OUTPUTS),
    ):
        got = [graph_signature(value) for value in values]
        expected = [
            (spec.name, spec.dtype,
             tuple(axis if axis in (BATCH_AXIS, SEQUENCE_AXIS) else sizes[axis] for axis in spec.axes))
            for spec in specs
        ]
        if got != expected:
            raise RuntimeError(
                f"ONNX export {kind} {got} differ from the contract's {expected}; batch and "
                "sequence axes must stay dynamic"
            )


def graph_signature(value: onnx.ValueInfoProto) -> tuple[str, str, tuple[int | str, ...]]:
    """Name, numpy dtype name and shape (dynamic axes by name) of a graph input or output."""
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return value.name, dtype, tuple(dim.dim_param or dim.dim_value for dim in tensor.shape.dim)
