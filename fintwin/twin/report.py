"""Forecast report: metrics.json, PNG plots and a self-contained report.html.

Files written to the output directory (each atomically, ``fintwin.files.write_atomic``):
- `metrics.json`: {model name: {metric: value}}, NaN written as null;
- `tracking.png`: cumulative weekly repeat transactions, actual vs each model;
- `calibration.png`: mean actual vs mean predicted per decile of prediction (transactions, spend);
- `spend_deciles.png`: predicted vs actual total spend per decile of predicted spend, per model;
- with distribution scores (`fintwin.twin.scores`, for the models whose forecasts are
  distributions): their values in metrics.json beside each model's metrics, `pit.png` (the
  models' PIT histograms side by side, transactions and spend) and `pit.csv` (its densities);
- `report.html`: split dates, a metrics table (and a table of the distribution scores) and the
  plots embedded as base64 data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fintwin.files import write_atomic
from fintwin.twin.evaluation import align_predictions, decile_table, split_days

PLOT_FILES = ("tracking.png", "calibration.png", "spend_deciles.png")
TRACKING_FILE = "tracking.csv"  # the weekly cumulative curves behind tracking.png
PIT_PLOT = "pit.png"
PIT_FILE = "pit.csv"  # the PIT histograms behind pit.png
PIT_OUTCOMES = {"txn": "holdout transactions", "spend": "holdout spend"}


def _json_value(value: float | None) -> float | None:
    if value is None or (isinstance(value, float | np.floating) and not math.isfinite(value)):
        return None
    return float(value)


def metrics_json(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Serialise {model: {metric: value}} as JSON, NaN and infinities as null."""
    clean = {
        model: {key: _json_value(value) for key, value in values.items()}
        for model, values in metrics.items()
    }
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def tracking_figure(tracking: pd.DataFrame, cutoff: pd.Timestamp) -> Figure:
    """Cumulative repeat transactions per week: the `actual` column and each model column."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(tracking.index, tracking["actual"], color="black", linewidth=2, label="actual")
    for name in tracking.columns.drop("actual"):
        ax.plot(tracking.index, tracking[name], linestyle="--", label=name)
    ax.axvline(cutoff, color="grey", linestyle=":", label="cutoff")
    ax.set(xlabel="week ending", ylabel="cumulative repeat transactions")
    ax.set_title("Cumulative repeat transactions")
    ax.legend()
    return fig


def calibration_figure(predictions: Mapping[str, pd.DataFrame], actual: pd.DataFrame) -> Figure:
    """Mean actual vs mean predicted per decile of prediction, transactions and spend."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, pred_col, actual_col, label in (
        (axes[0], "pred_txn", "txn", "holdout transactions"),
        (axes[1], "pred_spend", "spend", "holdout spend"),
    ):
        top = 0.0
        for name, pred in predictions.items():
            table = decile_table(pred[pred_col], actual[actual_col])
            ax.plot(table["pred_mean"], table["actual_mean"], marker="o", label=name)
            top = max(top, table["pred_mean"].max(), table["actual_mean"].max())
        ax.plot([0, top], [0, top], color="grey", linestyle=":", label="perfect")
        ax.set(xlabel=f"mean predicted {label}", ylabel=f"mean actual {label}")
        ax.set_title(f"Calibration by decile: {label}")
        ax.legend()
    return fig


def spend_decile_figure(predictions: Mapping[str, pd.DataFrame], actual: pd.DataFrame) -> Figure:
    """Predicted vs actual total spend per decile of predicted spend, one panel per model."""
    fig = Figure(figsize=(5 * len(predictions), 4), layout="constrained")
    axes = fig.subplots(1, len(predictions), squeeze=False)[0]
    for ax, (name, pred) in zip(axes, predictions.items(), strict=True):
        table = decile_table(pred["pred_spend"], actual["spend"])
        deciles = table.index.to_numpy()
        ax.bar(deciles - 0.2, table["actual_sum"], width=0.4, label="actual")
        ax.bar(deciles + 0.2, table["pred_sum"], width=0.4, label="predicted")
        ax.set(xlabel="decile of predicted spend (1 = lowest)", ylabel="total holdout spend")
        ax.set_xticks(deciles)
        ax.set_title(name)
        ax.legend()
    return fig


def pit_figure(
    pit: Mapping[str, Mapping[str, np.ndarray]], scores: Mapping[str, Mapping[str, float]]
) -> Figure:
    """Each model's mean-PIT densities side by side, one panel per outcome, with its KS
    distance in the legend; a calibrated model's bars are all at 1."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, len(PIT_OUTCOMES))
    width = 1.0 / len(pit)
    for ax, (outcome, label) in zip(axes, PIT_OUTCOMES.items(), strict=True):
        for i, (name, histograms) in enumerate(pit.items()):
            density = histograms[outcome]
            bins = len(density)
            centres = (np.arange(bins) + (i + 0.5) * width) / bins
            ks = scores[name][f"{outcome}_pit_ks"]
            ax.bar(centres, density, width=width / bins, label=f"{name} (KS {ks:.3f})")
        ax.axhline(1.0, color="grey", linestyle=":", label="calibrated")
        ax.set(xlabel="PIT", ylabel="density", xlim=(0, 1))
        ax.set_title(f"PIT histogram: {label}")
        ax.legend(loc="lower center")
    return fig


def pit_table(pit: Mapping[str, Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """The PIT densities as a table: one row per bin (``bin_start``, ``bin_end``), one column
    per model and outcome (``<model>_<outcome>``)."""
    columns = {
        f"{name}_{outcome}": histograms[outcome]
        for name, histograms in pit.items()
        for outcome in PIT_OUTCOMES
    }
    bins = len(next(iter(columns.values())))
    edges = np.linspace(0.0, 1.0, bins + 1).round(12)  # 0.3, not 0.30000000000000004
    return pd.DataFrame({"bin_start": edges[:-1], "bin_end": edges[1:], **columns})


def _format(value: float | None) -> str:
    value = _json_value(value)
    return "n/a" if value is None else f"{value:.4g}"


def metrics_table_html(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """An HTML table with one row per metric and one column per model."""
    models = list(metrics)
    keys = list(dict.fromkeys(key for values in metrics.values() for key in values))
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = []
    for key in keys:
        cells = "".join(f"<td>{_format(metrics[m].get(key))}</td>" for m in models)
        rows.append(f"<tr><th>{html.escape(key)}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def page_head(title: str, extra_css: str = "") -> str:
    """The start of a self-contained HTML report page (its body follows)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
img {{ max-width: 100%; }}{extra_css}
</style></head><body>
"""


_BODY = """<h1>Forecast report</h1>
<p>Calibration: transactions up to and including {cutoff}; holdout: {holdout_start} to
{holdout_end} inclusive. Cohort: {n_customers} customers. Same-day events are merged into one
transaction. Total errors are in percent; decile MAPE is a fraction.</p>
<h2>Metrics</h2>
{table}
{distributions}
<h2>Plots</h2>
{images}
</body></html>
"""


_DISTRIBUTIONS = """<h2>Predictive distributions</h2>
<p>Each model's distribution of every customer's holdout transactions and spend, scored at the
actual outcome (<code>fintwin.twin.scores</code>). Log score: mean log probability of the actual
count (higher is better; probabilities floored at 1e-12, share floored in
<code>txn_log_floored</code>). RPS: ranked probability score (lower is better). PIT: the
non-randomised PIT of Czado, Gneiting and Held (2009); KS: its largest distance from uniform.
<code>cover50</code> / <code>cover80</code>: share of actuals inside the central 50% / 80%
interval between the model's quantiles; a count interval holds more than its level, so
<code>cover*_expected</code> is what a calibrated model would cover; <code>pit_cover*</code>:
PIT mass in the central 50% / 80%, the level itself when calibrated.</p>
{table}
"""


def report_html(
    metrics: Mapping[str, Mapping[str, float]],
    images: Mapping[str, bytes],
    cutoff: pd.Timestamp,
    holdout_end: pd.Timestamp,
    n_customers: int,
    scores: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """The report page; `images` maps a file name to PNG bytes, embedded as data URIs;
    `scores`: the distribution scores of the models that have them."""
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></figure>'
        for name, png in images.items()
    )
    return page_head("fintwin forecast report") + _BODY.format(
        cutoff=cutoff.date(),
        holdout_start=(cutoff + pd.Timedelta(days=1)).date(),
        holdout_end=holdout_end.date(),
        n_customers=n_customers,
        table=metrics_table_html(metrics),
        distributions=_DISTRIBUTIONS.format(table=metrics_table_html(scores)) if scores else "",
        images=figures,
    )


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Mapping[str, float]],
    tracking: pd.DataFrame,
    predictions: Mapping[str, pd.DataFrame],
    actual: pd.DataFrame,
    *,
    cutoff: str | pd.Timestamp,
    holdout_end: str | pd.Timestamp,
    scores: Mapping[str, Mapping[str, float]] | None = None,
    pit: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write metrics.json, the PNG plots, `TRACKING_FILE` and report.html to `out_dir`; return
    report.html's path.

    `metrics`: {model: forecast_metrics(...)}; `tracking`: `weekly_tracking` output;
    `predictions`: {model: DataFrame with `pred_txn`, `pred_spend`} indexed like `actual`
    (`holdout_actuals` output); `cutoff` / `holdout_end`: the split days. `scores`:
    {model: HoldoutDistribution.scores()} and `pit`: {model: its pit_histograms()}, for the
    models (among `metrics`') whose forecasts are distributions; both or neither.
    """
    cut, end = split_days(cutoff, holdout_end)
    if not predictions:
        raise ValueError("write_report needs the predictions of at least one model")
    scores, pit = scores or {}, pit or {}
    if set(scores) != set(pit) or not set(scores) <= set(metrics):
        raise ValueError(
            f"distribution scores of {sorted(scores)} and PIT histograms of {sorted(pit)}: "
            f"expected the same models, among those with metrics ({sorted(metrics)})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aligned = {name: align_predictions(pred, actual) for name, pred in predictions.items()}
    figures = (
        tracking_figure(tracking, cut),
        calibration_figure(aligned, actual),
        spend_decile_figure(aligned, actual),
    )
    images = {name: png_bytes(fig) for name, fig in zip(PLOT_FILES, figures, strict=True)}
    if pit:
        images[PIT_PLOT] = png_bytes(pit_figure(pit, scores))
        write_atomic(out / PIT_FILE, pit_table(pit).to_csv(index=False))
    merged = {name: {**values, **scores.get(name, {})} for name, values in metrics.items()}
    write_atomic(out / "metrics.json", metrics_json(merged))
    write_atomic(out / TRACKING_FILE, tracking.to_csv(index_label="week_end"))
    for name, png in images.items():
        write_atomic(out / name, png)
    page = report_html(metrics, images, cut, end, len(actual), scores)
    write_atomic(out / "report.html", page)
    return out / "report.html"
