"""`fintwin monitor`: the drift of an event file against an exported model's reference, offline.

The figures are those of the served models (``fintwin.monitor.drift``: same bins, same PSI),
over the whole file and per calendar window (``--window``, a pandas period alias: ``M``
months, ``W`` weeks, ``D`` days). Outputs after each event come from the model's live step
graph (``NAME_live``), stepped over every customer's history in the file from an empty twin;
without a live model only the inputs are compared.

Written to the output directory (each file atomically):
- ``drift.json``: the reference's period, the thresholds, and per quantity the PSI of the
  whole file and its level; per window the PSI of every quantity and its event count;
- ``psi_windows.csv``: the per-window table;
- ``psi_over_time.png``: PSI per quantity per window, with the thresholds;
- ``histograms.png``: reference vs current shares per bin, per quantity;
- ``index.html``: the tables and both plots, self-contained.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fintwin.data.features import stored_spec
from fintwin.errors import FintwinInputError
from fintwin.export.triton_repo import METADATA_NAME, ModelRepositoryError, model_versions
from fintwin.files import write_atomic
from fintwin.monitor.drift import REFERENCE_KEY, Reference, Thresholds, windowed_psi
from fintwin.monitor.reference import history_values, open_scratch_twins
from fintwin.twin.report import page_head, png_bytes

PLOTS = ("psi_over_time.png", "histograms.png")


@dataclass
class DriftReport:
    """PSI of a whole file per quantity (``overall``) and per window (``windows``)."""

    reference: Reference
    thresholds: Thresholds
    overall: dict[str, float]
    counts: dict[str, np.ndarray]
    windows: pd.DataFrame
    values: dict[str, np.ndarray]  # watched values per event
    timestamps: np.ndarray

    def period_psi(self, start: str | pd.Timestamp, end: str | pd.Timestamp) -> dict[str, float]:
        """PSI per quantity of the events from ``start`` (inclusive) to ``end`` (exclusive)."""
        inside = ((self.timestamps >= pd.Timestamp(start).to_datetime64())
                  & (self.timestamps < pd.Timestamp(end).to_datetime64()))
        return self.reference.psi(self.reference.counts(
            {name: value[inside] for name, value in self.values.items()}))

    def levels(self) -> dict[str, str]:
        return {name: self.thresholds.level(value) for name, value in self.overall.items()}

    def drifted(self) -> list[str]:
        """Quantities at or above the watch level, worst first."""
        flagged = [n for n, v in self.overall.items() if np.isfinite(v) and v >= self.thresholds.watch]
        return sorted(flagged, key=lambda name: -self.overall[name])


def version_metadata(repo: Path, model: str) -> tuple[int, dict]:
    """The latest version of ``model`` in ``repo`` and its ``fintwin.json``."""
    versions = model_versions(Path(repo) / model)
    if not versions:
        raise ModelRepositoryError(f"no version of model {model!r} in {repo}")
    path = Path(repo) / model / str(versions[-1]) / METADATA_NAME
    return versions[-1], json.loads(path.read_text())


def drift_report(reference: Reference, values: dict[str, np.ndarray], timestamps: np.ndarray,
                 window: str, thresholds: Thresholds) -> DriftReport:
    """PSI of ``values`` (watched quantities per event) overall and per ``window``."""
    values = {name: v for name, v in values.items() if name in reference.binnings}
    counts = reference.counts(values)
    try:
        windows = windowed_psi(reference, values, timestamps, window)
    except ValueError as exc:
        raise FintwinInputError(f"--window {window!r}: not a pandas period alias ({exc})") from None
    return DriftReport(reference, thresholds, reference.psi(counts), counts, windows, values,
                       timestamps)


def monitor(repo: Path, model: str, events: str, out: Path, window: str = "M",
            thresholds: Thresholds | None = None) -> DriftReport:
    """``fintwin monitor``: the drift of ``events`` against ``model``'s reference, written to
    ``out``."""
    from fintwin.live.twins import live_model_name

    thresholds = thresholds or Thresholds()
    version, metadata = version_metadata(repo, model)
    source = f"{repo}/{model}/{version}/{METADATA_NAME}"
    if REFERENCE_KEY not in metadata:
        raise FintwinInputError(
            f"{source} holds no drift reference; export the model again with `fintwin export "
            "--reference-data EVENTS` (its calibration period becomes the reference)")
    reference = Reference.from_json(metadata[REFERENCE_KEY], source)
    spec = stored_spec(metadata, source)
    table = spec.read_events(events)
    live = Path(repo) / live_model_name(model)
    with tempfile.TemporaryDirectory(prefix="fintwin-monitor-") as scratch:
        twins = None
        if model_versions(live):
            twins = open_scratch_twins(live / str(model_versions(live)[-1]), Path(scratch))
        try:
            values = history_values(table, spec, twins)
        finally:
            if twins is not None:
                twins.store.close()
    timestamps = table["timestamp"].to_numpy("datetime64[ns]")
    report = drift_report(reference, values, timestamps, window, thresholds)
    write_report(report, Path(out), f"{model} version {version}", str(events),
                 {"event_type": [str(label) for label in spec.vocab.labels()]})
    return report


def psi_figure(report: DriftReport) -> Figure:
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    psi = report.windows.drop(columns="events")
    for name in psi.columns:
        ax.plot(psi.index, psi[name], marker="o", markersize=3, label=name)
    for level, style in ((report.thresholds.watch, ":"), (report.thresholds.act, "--")):
        ax.axhline(level, color="grey", linestyle=style)
    ax.set_ylabel("PSI vs reference")
    ax.set_title("Population stability index per window (dotted: watch, dashed: act)")
    ax.legend(fontsize=7, ncols=2)
    return fig


def histogram_figure(report: DriftReport, labels: dict[str, list[str]]) -> Figure:
    """Reference vs current shares per bin; ``labels``: bin names of categorical quantities
    (e.g. the event types) instead of their ids."""
    names = list(report.counts)
    columns = 3
    rows = max(1, math.ceil(len(names) / columns))
    fig = Figure(figsize=(4 * columns, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    for ax, name in zip(axes, names, strict=False):
        binning = report.reference.binnings[name]
        counts = report.counts[name]
        current = counts / max(counts.sum(), 1)
        x = np.arange(binning.size)
        ax.bar(x - 0.2, binning.shares, width=0.4, label="reference")
        ax.bar(x + 0.2, current, width=0.4, label="current")
        ax.set_title(f"{name}: PSI {report.overall[name]:.3f}", fontsize=9)
        ax.set_xticks(x, labels.get(name, binning.labels()), rotation=60, fontsize=6)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7)
    return fig


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def report_json(report: DriftReport) -> dict:
    windows = report.windows
    return {
        "reference": {"period": report.reference.period, "events": report.reference.events,
                      "customers": report.reference.customers},
        "thresholds": {"watch": report.thresholds.watch, "act": report.thresholds.act},
        "overall": {name: {"psi": _number(value), "level": report.thresholds.level(value)}
                    for name, value in report.overall.items()},
        "drifted": report.drifted(),
        "windows": [
            {"start": str(start.date()), "events": int(row["events"]),
             "psi": {name: _number(row[name]) for name in windows.columns if name != "events"}}
            for start, row in windows.iterrows()
        ],
    }


_CSS = "\ntd.act { background: #f4b6b6; } td.watch { background: #f9e3a3; }"
_BODY = """<h1>Drift of {events} against {model}</h1>
<p>Reference: the model's calibration events, {first} to {last} ({ref_events} events of
{ref_customers} customers). PSI levels: watch at {watch}, act at {act}. Drifted (at or above
watch): {drifted}.</p>
<h2>Whole file</h2>
{overall}
<h2>Per window</h2>
{windows}
<h2>Plots</h2>
{images}
</body></html>
"""


def _cell(value: float, thresholds: Thresholds) -> str:
    level = thresholds.level(value)
    text = f"{value:.3f}" if np.isfinite(value) else "n/a"
    return f'<td class="{level}">{text}</td>'


def report_html(report: DriftReport, model: str, events: str, images: dict[str, bytes]) -> str:
    t = report.thresholds
    overall = "<table><tr><th>quantity</th><th>PSI</th><th>level</th></tr>" + "".join(
        f"<tr><th>{html.escape(name)}</th>{_cell(value, t)}<td>{t.level(value)}</td></tr>"
        for name, value in report.overall.items()) + "</table>"
    names = [c for c in report.windows.columns if c != "events"]
    windows = ("<table><tr><th>window</th><th>events</th>"
               + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
               + "".join(f"<tr><th>{start.date()}</th><td>{int(row['events'])}</td>"
                         + "".join(_cell(row[n], t) for n in names) + "</tr>"
                         for start, row in report.windows.iterrows()) + "</table>")
    figures = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"></figure>' for name, png in images.items())
    ref = report.reference
    return page_head("fintwin drift report", _CSS) + _BODY.format(events=html.escape(events), model=html.escape(model),
                        first=ref.period.get("first", "?"), last=ref.period.get("last", "?"),
                        ref_events=ref.events, ref_customers=ref.customers, watch=t.watch,
                        act=t.act, drifted=html.escape(", ".join(report.drifted()) or "none"),
                        overall=overall, windows=windows, images=figures)


def write_report(report: DriftReport, out: Path, model: str, events: str,
                 labels: dict[str, list[str]] | None = None) -> Path:
    """Write the files of the module docstring to ``out``; return index.html's path."""
    figures = (psi_figure(report), histogram_figure(report, labels or {}))
    images = {name: png_bytes(figure) for name, figure in zip(PLOTS, figures, strict=True)}
    write_atomic(out / "drift.json", json.dumps(report_json(report), indent=2) + "\n")
    write_atomic(out / "psi_windows.csv", report.windows.to_csv(index_label="window"))
    for name, png in images.items():
        write_atomic(out / name, png)
    write_atomic(out / "index.html", report_html(report, model, events, images))
    return out / "index.html"
