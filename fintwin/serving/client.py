"""Transports that score featurised batches: a Triton server (gRPC/HTTP) or onnxruntime in process.

Both take and return the exported model's own tensors (CONTRACT.md, "Exported ONNX model"):
``{"event_type": int64 [B,T], ..., "length": int64 [B]}`` -> ``{"next_event_probs": [B,V],
"churn_prob": [B], ...}``. Triton's config declares per-row scalars as dims [1] reshaped to [];
``TritonTransport`` hides that, so callers see the same shapes from either transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from fintwin.export.triton_repo import MODEL_FILENAME, ModelRepositoryError, model_versions
from fintwin.serving.python_model import InputError, OnnxModel, read_metadata

WireProtocol = Literal["grpc", "http"]
_CLIENT_MODULES = {"grpc": grpcclient, "http": httpclient}


class InferenceError(RuntimeError):
    """A batch could not be scored (bad inputs, unknown model, server error); says why."""


class Transport(Protocol):
    """What the featurising client needs from a scoring backend."""

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score one batch of model inputs; return every model output."""
        ...

    def ready(self) -> bool:
        """Whether the model can be scored now."""
        ...

    def close(self) -> None:
        """Release connections and loaded models."""
        ...


@dataclass(frozen=True)
class _Layout:
    """Output names and the Triton-side shapes of reshaped tensors (per row, without batch)."""

    outputs: tuple[str, ...]
    input_dims: dict[str, tuple[int, ...]]  # reshaped inputs: the dims Triton expects per row
    output_shapes: dict[str, tuple[int, ...]]  # reshaped outputs: the model's shape per row


class TritonTransport:
    """Score batches on a Triton server with tritonclient.

    ``url`` is ``host:port`` of the gRPC or HTTP endpoint; ``version=""`` lets the server pick
    (its version policy: the latest by default); ``timeout_s`` bounds each call on the client
    side. A gRPC transport can be shared by threads; an HTTP one (gevent underneath) must be
    used by one thread only: give each thread its own.
    """

    def __init__(
        self,
        url: str,
        protocol: WireProtocol = "grpc",
        model: str = "fintwin",
        version: str = "",
        *,
        timeout_s: float = 60.0,
    ) -> None:
        if protocol not in _CLIENT_MODULES:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self._module = _CLIENT_MODULES[protocol]
        if protocol == "grpc":
            self._client = grpcclient.InferenceServerClient(url)
            self._infer_kwargs = {"client_timeout": timeout_s}
        else:
            self._client = httpclient.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
            self._infer_kwargs = {}
        self.protocol = protocol
        self.model = model
        self.version = version
        self._layout: _Layout | None = None

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send one batch; raise InferenceError with the server's message on failure."""
        try:
            layout = self._get_layout()
            result = self._client.infer(
                self.model,
                [self._infer_input(name, array, layout) for name, array in inputs.items()],
                model_version=self.version,
                outputs=[self._module.InferRequestedOutput(name) for name in layout.outputs],
                **self._infer_kwargs,
            )
        except InferenceServerException as exc:
            raise InferenceError(
                f"{self.protocol} inference on {self.model!r} failed: {exc.message()}"
            ) from exc
        return {
            name: self._model_shape(name, result.as_numpy(name), layout) for name in layout.outputs
        }

    def ready(self) -> bool:
        """Whether the server answers and the model is ready."""
        try:
            return bool(self._client.is_model_ready(self.model, self.version))
        except (InferenceServerException, OSError):
            return False

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def _get_layout(self) -> _Layout:
        if self._layout is None:
            if self.protocol == "grpc":
                config = self._client.get_model_config(self.model, self.version, as_json=True)[
                    "config"
                ]
            else:
                config = self._client.get_model_config(self.model, self.version)
            self._layout = _layout_from_config(config)
        return self._layout

    def _infer_input(
        self, name: str, array: np.ndarray, layout: _Layout
    ) -> grpcclient.InferInput | httpclient.InferInput:
        array = np.ascontiguousarray(array)
        dims = layout.input_dims.get(name)
        if dims is not None and array.ndim == 1:  # model shape [B] -> Triton shape [B, 1]
            array = array.reshape((array.shape[0], *dims))
        infer_input = self._module.InferInput(
            name, list(array.shape), np_to_triton_dtype(array.dtype)
        )
        infer_input.set_data_from_numpy(array)
        return infer_input

    @staticmethod
    def _model_shape(name: str, array: np.ndarray, layout: _Layout) -> np.ndarray:
        shape = layout.output_shapes.get(name)
        return array if shape is None else array.reshape((array.shape[0], *shape))


def _layout_from_config(config: Mapping) -> _Layout:
    """Read output names and reshapes from a model config in its JSON form (HTTP or gRPC)."""

    def dims(values) -> tuple[int, ...]:
        return tuple(int(v) for v in values)

    return _Layout(
        outputs=tuple(out["name"] for out in config.get("output", [])),
        input_dims={t["name"]: dims(t["dims"]) for t in config.get("input", []) if "reshape" in t},
        output_shapes={
            t["name"]: dims(t["reshape"].get("shape", []))
            for t in config.get("output", [])
            if "reshape" in t
        },
    )


class InProcessRunner:
    """Score batches with onnxruntime in this process, from an exported model repository.

    Uses the version's own ``model.onnx`` and ``fintwin.json`` (``metadata``) and the same
    validation and onnxruntime options as the served model. ``intra_op_threads=0``: one thread per
    physical core (batch scoring). ``providers``: e.g. ("CUDAExecutionProvider",
    "CPUExecutionProvider") on a GPU machine.
    """

    def __init__(
        self,
        repo: Path,
        model: str,
        version: int | None = None,
        *,
        intra_op_threads: int = 0,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> None:
        model_dir = Path(repo) / model
        versions = model_versions(model_dir)
        if not versions:
            raise ModelRepositoryError(f"no version of model {model!r} in {repo}")
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise ModelRepositoryError(f"model {model!r} has versions {versions}, not {version}")
        self.version = version
        version_dir = model_dir / str(version)
        self.metadata = read_metadata(version_dir)
        self._model: OnnxModel | None = OnnxModel(
            version_dir / MODEL_FILENAME, self.metadata, intra_op_threads, providers
        )

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and score one batch; raise InferenceError naming the bad input."""
        if self._model is None:
            raise InferenceError("the runner is closed")
        try:
            return self._model.run(inputs)
        except InputError as exc:
            raise InferenceError(str(exc)) from exc

    def ready(self) -> bool:
        """True until closed."""
        return self._model is not None

    def close(self) -> None:
        """Release the loaded onnxruntime model."""
        self._model = None
