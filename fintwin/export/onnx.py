"""ONNX export of a trained twin with a parity check against PyTorch, and `fintwin export`.

The graph takes raw featuriser values (scaling constants live inside it) and returns
per-customer outputs, both as the contract says (CONTRACT.md, ``fintwin.data.contract``); the
metadata carries the contract for the served model's request checks. Every export is checked
with onnxruntime on fresh random valid batches of several batch sizes and lengths, including
lengths unlike the export example; the export fails when any output differs by more than the
tolerance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fintwin.data.contract import CONTRACT_KEY, exported_contract, random_inputs
from fintwin.data.features import FEATURISER_KEY
from fintwin.errors import FintwinInputError
from fintwin.export.graph import ExportableTwin
from fintwin.models.checkpoint import TrainedTwin, load_twin
from fintwin.models.module import QUANTILE_LEVELS
from fintwin.monitor.drift import REFERENCE_KEY

log = logging.getLogger(__name__)

PARITY_SHAPES = ((1, 1), (1, 64), (4, 13), (16, 50), (33, 129))  # (batch, sequence length)
PARITY_TOLERANCE = 1e-4


class ExportParityError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance: the export is refused."""


@dataclass
class ParityReport:
    """Largest difference per output over every checked batch.

    ``max_abs`` is the plain difference; ``max_scaled`` divides it by max(1, |torch value|),
    so outputs measured in days or currency are compared at fp32's relative precision.
    """

    max_abs: dict[str, float] = field(default_factory=dict)
    max_scaled: dict[str, float] = field(default_factory=dict)
    shapes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def worst(self) -> float:
        """Largest scaled difference over all outputs."""
        return max(self.max_scaled.values(), default=0.0)


def ort_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """CPU onnxruntime session with full graph optimisation."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextmanager
def quiet_loggers(*loggers: str):
    """Silence the exporter's per-pass INFO chatter."""
    previous = [(name, logging.getLogger(name).level) for name in loggers]
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in previous:
            logging.getLogger(name).setLevel(level)


def check_parity(wrapper: ExportableTwin, onnx_path: Path, seed: int = 0,
                 shapes: tuple[tuple[int, int], ...] = PARITY_SHAPES) -> ParityReport:
    """Compare onnxruntime with the PyTorch wrapper on fresh random batches."""
    session = ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    report = ParityReport(shapes=list(shapes))
    for batch, seq_len in shapes:
        feeds = random_inputs(rng, wrapper.sizes, batch, seq_len)
        with torch.no_grad():
            expected = wrapper(*(torch.from_numpy(feeds[n]) for n in wrapper.input_names))
        got = session.run(wrapper.output_names, {n: feeds[n] for n in wrapper.input_names})
        for name, want, have in zip(wrapper.output_names, expected, got, strict=True):
            diff = np.abs(have - want.numpy())
            scaled = diff / np.maximum(1.0, np.abs(want.numpy()))
            report.max_abs[name] = max(report.max_abs.get(name, 0.0), float(diff.max()))
            report.max_scaled[name] = max(report.max_scaled.get(name, 0.0), float(scaled.max()))
    return report


def export_onnx(twin: TrainedTwin, path: Path, tolerance: float = PARITY_TOLERANCE,
                seed: int = 0) -> ParityReport:
    """Export ``twin`` to ``path`` (single file) after checking parity; raise if it fails."""
    wrapper = ExportableTwin(twin.model.cpu().eval())
    with torch.no_grad():
        wrapper(*wrapper.example_inputs())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        candidate = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
            warnings.simplefilter("ignore")
            wrapper.to_onnx(candidate)
        report = check_parity(wrapper, candidate, seed=seed)
        if report.worst > tolerance:
            bad = {k: v for k, v in report.max_scaled.items() if v > tolerance}
            raise ExportParityError(f"ONNX parity check failed (tolerance {tolerance}): {bad}")
        candidate.replace(path)
    log.info("ONNX parity: worst difference %.2e over batches %s", report.worst, report.shapes)
    return report


def source_commit() -> str:
    """The git commit of the code that exports (empty outside a checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def checkpoint_identity(ckpt: Path) -> dict[str, str]:
    """The checkpoint's file name and SHA-256: identifies it without revealing where it lives."""
    with open(ckpt, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"file": Path(ckpt).name, "sha256": digest}


def export_metadata(twin: TrainedTwin, ckpt: Path, report: ParityReport) -> dict:
    """What a client needs besides the graph: the featuriser spec (the checkpoint's, unchanged,
    under ``FEATURISER_KEY``), the quantile levels, the input/output contract with this model's
    sizes (the served model checks requests against it), metrics, provenance.

    Served to clients as is, so it holds no path of the machine that exported it. A twin
    trained with ``privacy=dp`` adds ``privacy``: the checkpoint's spent budget (epsilon,
    delta, noise multiplier, clipping norm, steps, unit).
    """
    metrics_file = ckpt.parent.parent / "metrics.json"
    metrics = {}
    if metrics_file.is_file():
        metrics = {k: v for k, v in json.loads(metrics_file.read_text()).items()
                   if isinstance(v, (int, float))}
    privacy = {"privacy": twin.privacy} if twin.privacy is not None else {}
    return {
        FEATURISER_KEY: twin.spec.to_dict(), "observation_end": twin.split["observation_end"],
        "quantiles": list(QUANTILE_LEVELS), "encoder": twin.model.hparams.encoder["name"],
        "metrics": metrics, CONTRACT_KEY: exported_contract(twin.model.contract_sizes()),
        "parity_max_abs": report.max_abs, "source_commit": source_commit(),
        "checkpoint": checkpoint_identity(ckpt), **privacy,
    }


@dataclass(frozen=True)
class Exported:
    """Versions written by ``export_to_repository`` and their parity reports (``live_version``
    and ``step_report`` None without the live model, ``explain_version`` without the
    explanation model)."""

    version: int
    report: ParityReport
    live_version: int | None = None
    step_report: ParityReport | None = None
    explain_version: int | None = None


def export_to_repository(ckpt: Path, repo: Path, name: str = "fintwin", device: str = "cpu",
                         live: bool = True, explain: bool = True,
                         reference_data: str | None = None, **triton_options) -> Exported:
    """Checkpoint -> parity-checked ONNX -> new version of ``<repo>/<name>`` and, with
    ``live``, of its live model ``<repo>/<name>_live`` (the parity-checked step graph run by a
    python-backend model, ``fintwin.live.repository``) and, with ``explain``, of its
    explanation model ``<repo>/<name>_explain`` (``fintwin.explain.serving``).

    Both graphs are exported and checked, and the explanation model's weights saved, before
    the repository is touched. A write that fails
    (full disk, read-only file system) raises FintwinInputError naming the path and the cause;
    the model it was writing is then left as it was.

    Both models' metadata carry the drift reference of the calibration events of
    ``reference_data`` (default: the training data; ``fintwin.monitor.reference``).
    """
    from fintwin.explain.serving import explain_files, write_explain_model
    from fintwin.export.triton_repo import MODEL_FILENAME, write_model_version
    from fintwin.live.repository import export_step_graph, live_metadata, write_live_model

    twin = load_twin(ckpt)
    with tempfile.TemporaryDirectory(prefix="fintwin-export-") as scratch:
        onnx_path = Path(scratch) / MODEL_FILENAME
        try:
            report = export_onnx(twin, onnx_path)
            step_graph, step_report, step = (
                export_step_graph(twin, Path(scratch)) if live else (None, None, None)
            )
            staged = explain_files(twin.model, Path(scratch)) if explain else None
        except OSError as exc:
            raise FintwinInputError(
                f"cannot write the ONNX export to {exc.filename or scratch}: {exc.strerror or exc}"
                " (it is written there, in TMPDIR, before it is copied into the repository)"
            ) from exc
        metadata = export_metadata(twin, ckpt, report)
        reference = drift_reference(twin, reference_data, metadata, step, Path(scratch))
        if reference is not None:
            metadata[REFERENCE_KEY] = reference
        version = write_model_version(repo, name, onnx_path, metadata, device=device,
                                      **triton_options)
        explain_version = None if staged is None else write_explain_model(
            repo, name, twin.spec, metadata, staged, instances=triton_options.get("instances", 1))
        if not live:
            return Exported(version, report, explain_version=explain_version)
        batching = {k: v for k, v in triton_options.items()
                    if k in ("max_batch_size", "max_queue_delay_us", "instances")}
        live_version = write_live_model(repo, name, twin.spec, step_graph,
                                        live_metadata(metadata, step), Path(scratch), **batching)
    return Exported(version, report, live_version, step_report, explain_version)


def drift_reference(twin: TrainedTwin, source: str | None, metadata: dict, step: dict | None,
                    scratch: Path) -> dict | None:
    """The drift reference of the twin's calibration events; outputs from the step graph in
    ``scratch`` (written there by ``export_step_graph``) when there is one."""
    from fintwin.files import write_json_atomic
    from fintwin.live.repository import live_metadata
    from fintwin.monitor.reference import calibration_reference

    if step is not None:
        write_json_atomic(scratch / "fintwin.json", live_metadata(metadata, step))
    return calibration_reference(twin, source, scratch if step is not None else None)
