"""Transports that score featurised batches: a Triton server (gRPC/HTTP) or onnxruntime in process.

Both take and return the exported model's own tensors, as CONTRACT.md lists them
(``fintwin.data.contract``): ``{"event_type": int64 [batch, seq], ..., "length": int64 [batch]}``
-> ``{"next_event_probs": [batch, vocab_size], "churn_prob": [batch], ...}``. Triton's config
declares per-row scalars as dims [1] reshaped to []; ``TritonTransport`` hides that, so callers
see the same shapes from either transport. ``TwinClient`` builds those inputs from raw events.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pandas as pd
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from fintwin.data.contract import TensorSpec, model_inputs
from fintwin.data.features import stored_spec
from fintwin.errors import FintwinInputError
from fintwin.export.triton_repo import (
    CONFIG_NAME,
    FEATURISER_PARAMETER,
    MODEL_FILENAME,
    ModelRepositoryError,
    model_versions,
    read_model_config,
)
from fintwin.serving.python_model import (
    DEFAULT_MAX_BATCH_ELEMENTS,
    MAX_BATCH_ELEMENTS_PARAMETER,
    InputError,
    MetadataError,
    OnnxModel,
    config_parameter,
    read_metadata,
)
from fintwin.serving.security import API_KEY_ENV, ClientCredentials

WireProtocol = Literal["grpc", "http"]
_CLIENT_MODULES = {"grpc": grpcclient, "http": httpclient}
# tritonclient's status of a refused request: HTTP 400, gRPC INVALID_ARGUMENT
_INVALID_REQUEST_STATUSES = frozenset({"400", "StatusCode.INVALID_ARGUMENT"})
# what the HTTP client (geventhttpclient) raises when a connection or TLS handshake fails
_CONNECTION_ERRORS = (OSError, HTTPException)


class InferenceError(RuntimeError):
    """A batch could not be scored (bad inputs, unknown model, server error); says why."""


class InvalidRequestError(InferenceError):
    """The model refused the batch as invalid (HTTP 400 / gRPC INVALID_ARGUMENT, or the same
    check in process): the message names the input, row and expected value; retrying the same
    batch fails again."""


class AccessDeniedError(InferenceError, FintwinInputError):
    """The server refused the request for want of the right key (a restricted API)."""


_RESTRICTED = "is restricted"  # tritonserver's refusal of a request without the expected header


def _failure(exc: InferenceServerException, what: str) -> InferenceError:
    """The error to raise for a request the server refused or failed."""
    message = f"{what}: {exc.message()}"
    if _RESTRICTED in (exc.message() or ""):
        return AccessDeniedError(
            f"{message} (the server requires an API key: give --api-key-file or ${API_KEY_ENV})"
        )
    if exc.status() in _INVALID_REQUEST_STATUSES:
        return InvalidRequestError(message)
    return InferenceError(message)


class Transport(Protocol):
    """What the featurising client needs from a scoring backend."""

    max_batch_elements: int  # the most rows x events one batch may hold
    metadata: Mapping  # the featuriser spec (under "featuriser") and the "quantiles" levels

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
    side. ``credentials``: TLS (mutual with a client certificate) and the API key sent with
    every request (``fintwin.serving.security``). A gRPC transport can be shared by threads; an
    HTTP one (gevent underneath) must be used by one thread only: give each thread its own.
    """

    def __init__(
        self,
        url: str,
        protocol: WireProtocol = "grpc",
        model: str = "fintwin",
        version: str = "",
        *,
        timeout_s: float = 60.0,
        credentials: ClientCredentials | None = None,
    ) -> None:
        if protocol not in _CLIENT_MODULES:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        credentials = credentials or ClientCredentials()
        tls = credentials.tls
        if tls is not None:
            tls.check()
        self._module = _CLIENT_MODULES[protocol]
        if protocol == "grpc":
            self._client = grpcclient.InferenceServerClient(
                url, **(tls.grpc_options() if tls is not None else {})
            )
            self._infer_kwargs = {"client_timeout": timeout_s}
        else:
            self._client = httpclient.InferenceServerClient(
                url,
                connection_timeout=timeout_s,
                network_timeout=timeout_s,
                **(tls.http_options() if tls is not None else {}),
            )
            self._infer_kwargs = {}
        self._headers = credentials.headers(protocol)
        self.url, self.protocol = url, protocol
        self.model = model
        self.version = version
        self._layout: _Layout | None = None

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send one batch; raise InvalidRequestError when the server refuses it as invalid,
        InferenceError on any other failure, with the server's message."""
        try:
            layout = self._get_layout()
            result = self._client.infer(
                self.model,
                [self._infer_input(name, array, layout) for name, array in inputs.items()],
                model_version=self.version,
                outputs=[self._module.InferRequestedOutput(name) for name in layout.outputs],
                headers=self._headers,
                **self._infer_kwargs,
            )
        except InferenceServerException as exc:
            raise _failure(exc, f"{self.protocol} inference on {self.model!r} failed") from exc
        except _CONNECTION_ERRORS as exc:
            raise self._unreachable(exc) from exc
        return {
            name: self._model_shape(name, result.as_numpy(name), layout) for name in layout.outputs
        }

    def ready(self) -> bool:
        """Whether the server answers and the model is ready."""
        try:
            return bool(
                self._client.is_model_ready(self.model, self.version, headers=self._headers)
            )
        except (InferenceServerException, *_CONNECTION_ERRORS):
            return False

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def model_config(self) -> dict:
        """The served model's configuration as JSON-like dict."""
        try:
            if self.protocol == "grpc":
                return self._client.get_model_config(
                    self.model, self.version, headers=self._headers, as_json=True
                )["config"]
            return self._client.get_model_config(self.model, self.version, headers=self._headers)
        except InferenceServerException as exc:
            raise _failure(exc, f"cannot read the config of {self.model!r}") from exc
        except _CONNECTION_ERRORS as exc:
            raise self._unreachable(exc) from exc

    @property
    def max_batch_elements(self) -> int:
        """The served model's rows x events budget per batch (its config parameter or default)."""
        return config_parameter(
            self.model_config(), MAX_BATCH_ELEMENTS_PARAMETER, DEFAULT_MAX_BATCH_ELEMENTS
        )

    @property
    def metadata(self) -> dict:
        """What the export stored in the model config's parameters for clients: the
        featuriser spec (``featuriser``) and the ``quantiles`` levels."""
        parameters = self.model_config().get("parameters", {})
        if FEATURISER_PARAMETER not in parameters:
            raise InferenceError(f"model {self.model!r} carries no {FEATURISER_PARAMETER} parameter; "
                                 "export it with `fintwin export`")
        return json.loads(parameters[FEATURISER_PARAMETER]["string_value"])

    def _unreachable(self, exc: Exception) -> InferenceError:
        return InferenceError(
            f"no {self.protocol} answer from {self.url} ({type(exc).__name__}: {exc}): is the "
            "server up, and do its TLS settings (certificate, client certificate) match ours?"
        )

    def _get_layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _layout_from_config(self.model_config())
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

    Uses the version's own ``model.onnx`` and ``fintwin.json`` (``metadata``), the model config's
    ``max_batch_elements`` and the same validation and onnxruntime options as the served model,
    so a batch the server refuses is refused here with the same message.
    ``intra_op_threads=0``: one thread per physical core (batch scoring). ``providers``: e.g.
    ("CUDAExecutionProvider", "CPUExecutionProvider") on a GPU machine.
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
        self.max_batch_elements = _budget_of(model_dir)
        try:
            self._model: OnnxModel | None = OnnxModel(
                version_dir / MODEL_FILENAME,
                self.metadata,
                intra_op_threads,
                providers,
                max_batch_elements=self.max_batch_elements,
            )
        except MetadataError as exc:
            raise ModelRepositoryError(str(exc)) from exc

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and score one batch; raise InvalidRequestError naming the bad input."""
        if self._model is None:
            raise InferenceError("the runner is closed")
        try:
            return self._model.run(inputs)
        except InputError as exc:
            raise InvalidRequestError(str(exc)) from exc

    def ready(self) -> bool:
        """True until closed."""
        return self._model is not None

    def close(self) -> None:
        """Release the loaded onnxruntime model."""
        self._model = None


def _budget_of(model_dir: Path) -> int:
    """``max_batch_elements`` of a model's exported config, or the served default."""
    if not (model_dir / CONFIG_NAME).is_file():
        return DEFAULT_MAX_BATCH_ELEMENTS
    config = MessageToDict(read_model_config(model_dir), preserving_proto_field_name=True)
    return config_parameter(config, MAX_BATCH_ELEMENTS_PARAMETER, DEFAULT_MAX_BATCH_ELEMENTS)


def _padded_width(length: int, max_len: int) -> int:
    """Next power of two (capped at max_len): few distinct shapes, so Triton can batch them."""
    return min(max_len, 1 << max(0, int(length - 1).bit_length()))


def model_batch(
    arrays: Mapping[str, np.ndarray], inputs: list[TensorSpec], width: int
) -> dict[str, np.ndarray]:
    """The model's ``inputs`` taken from featurised ``arrays``, the sequence inputs right-padded
    to ``width`` events."""
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise ValueError(f"the featurised batch lacks the model inputs {missing}")
    batch = {}
    for spec in inputs:
        array = arrays[spec.name]
        if spec.padded and array.shape[1] < width:
            array = np.pad(array, [(0, 0), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2))
        batch[spec.name] = array
    return batch


class TwinClient:
    """Featurise raw events exactly as in training and score them on Triton or in process.

    ``TwinClient(url="127.0.0.1:8001", protocol="grpc", model="fintwin")`` talks to a server;
    ``TwinClient(repo="model_repository", model="fintwin")`` runs onnxruntime in process;
    ``credentials`` (TLS, API key) are those of the server connection.
    ``predict(events)`` returns one row per customer. Each customer keeps its most recent
    ``max_len`` events (the model refuses longer sequences); a call holds at most ``batch_size``
    customers, fewer when the model's ``max_batch_elements`` budget needs it.
    """

    def __init__(self, url: str | None = None, protocol: WireProtocol = "grpc", model: str = "fintwin",
                 version: str = "", *, repo: Path | None = None, batch_size: int = 256,
                 top_k: int = 3, credentials: ClientCredentials | None = None) -> None:
        if (url is None) == (repo is None):
            raise ValueError("give exactly one of url (a Triton server) or repo (in-process)")
        self.transport: Transport = (
            InProcessRunner(Path(repo), model, int(version) if version else None)
            if repo is not None
            else TritonTransport(url, protocol, model, version, credentials=credentials))
        metadata = self.transport.metadata
        self.spec = stored_spec(metadata, f"model {model!r}")
        self.quantiles = list(metadata["quantiles"])
        self.inputs = model_inputs(self.spec.input_sizes())
        self.batch_size, self.top_k = batch_size, top_k

    def featurise(self, events: pd.DataFrame | str | Path, as_of: str | pd.Timestamp | None = None):
        """Sequences of every customer in ``events`` (a table or a file), read and featurised
        as in training (the model's ``FeaturiserSpec``), observed to the end of the day
        ``as_of`` (default: the last day in ``events``)."""
        source = events if isinstance(events, pd.DataFrame) else str(events)
        return self.spec.inference_sequences(self.spec.read_events(source), as_of)

    def _rows(self, customer_ids: np.ndarray, outputs: dict[str, np.ndarray]) -> pd.DataFrame:
        probs = outputs["next_event_probs"]
        names = self.spec.vocab.labels()
        ranked = np.where(np.arange(probs.shape[1]) == 0, -1.0, probs)  # padding is never a type
        top = np.argsort(-ranked, axis=1)[:, : min(self.top_k, probs.shape[1] - 1)]
        frame = {"customer_id": customer_ids}
        for k in range(top.shape[1]):
            frame[f"top{k + 1}_type"] = names[top[:, k]]
            frame[f"top{k + 1}_prob"] = np.take_along_axis(probs, top[:, k : k + 1], 1)[:, 0]
        frame["next_time_mean_days"] = outputs["next_time_mean"]
        for i, level in enumerate(self.quantiles):
            frame[f"next_time_q{round(level * 100):02d}_days"] = outputs["next_time_quantiles"][:, i]
        for name in ("dormant_prob", "next_amount_mean", "churn_prob", "horizon_count", "horizon_spend"):
            frame[name] = outputs[name]
        return pd.DataFrame(frame)

    def predict(self, events: pd.DataFrame | str | Path, progress: bool = False,
                as_of: str | pd.Timestamp | None = None) -> pd.DataFrame:
        """One row per customer: top-k next types, time to next event, amount, churn, and the
        horizon count and spend forecast from the end of the day ``as_of`` (default: the last
        day in ``events``), i.e. after each customer's silence since their last event."""
        from tqdm.auto import tqdm

        sequences = self.featurise(events, as_of)
        silence = sequences.days_since_last_event().astype(np.float32)
        max_len = self.spec.max_len
        rows = max(1, min(self.batch_size, self.transport.max_batch_elements // max_len))
        parts = []
        starts = range(0, len(sequences), rows)
        for lo in tqdm(starts, disable=not progress, unit="batch", desc="scoring"):
            index = np.arange(lo, min(lo + rows, len(sequences)))
            arrays = {k: v.numpy() for k, v in sequences.batch(index, with_targets=False).items()}
            arrays["days_since_last_event"] = silence[index]
            width = _padded_width(int(arrays["length"].max()), max_len)
            batch = model_batch(arrays, self.inputs, width)
            parts.append(self._rows(sequences.customer_ids[index], self.transport.infer(batch)))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def close(self) -> None:
        """Release the transport."""
        self.transport.close()

