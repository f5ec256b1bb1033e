"""`fintwin simulate` and `fintwin report` as functions (the CLI parses arguments and calls them).

Both load a checkpoint (`load_twin`), read the events with its featuriser spec (schema
options, same-day merging, numeric and categorical features) and featurise the calibration
events (before the end of the `cutoff` day) with it. Dates are whole days:
`cutoff` is the last calibration day, `horizon_end` / `holdout_end` the last simulated day.
Bad input raises `FintwinInputError` (the CLI exits 2).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from lifetimes.utils import ConvergenceError

from fintwin.data.sequences import observation_end
from fintwin.data.simulator import SimulatorConfig
from fintwin.errors import FintwinInputError
from fintwin.files import atomic_path, write_json_atomic
from fintwin.models.checkpoint import TrainedTwin, load_twin
from fintwin.twin import whatif
from fintwin.twin.baselines import BGNBDGammaGamma
from fintwin.twin.evaluation import as_day, forecast_metrics, holdout_actuals, weekly_tracking
from fintwin.twin.forecast import (
    heads_cumulative,
    heads_forecast,
    holdout_week_ends,
    rollout_cumulative,
    rollout_distribution,
    rollout_forecast,
)
from fintwin.twin.report import write_report
from fintwin.twin.rollout import RolloutConfig, RolloutResult, rollout

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 100
DEFAULT_MAX_STEPS = 1000
FORECASTS_FILE = "forecasts.parquet"


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` (without its index) to ``path`` atomically; create the directory."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def parse_day(value: str | pd.Timestamp, name: str) -> pd.Timestamp:
    """A whole day (naive, midnight), or ``FintwinInputError`` naming the argument."""
    try:
        return as_day(value, name)
    except ValueError as err:  # includes unparseable dates
        raise FintwinInputError(f"--{name.replace('_', '-')} {value!r}: {err}") from err


def parse_window(
    cutoff: str | pd.Timestamp, end: str | pd.Timestamp, end_name: str
) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The cut-off and the last simulated day, which must come after it."""
    cut, last = parse_day(cutoff, "cutoff"), parse_day(end, end_name)
    if last <= cut:
        raise FintwinInputError(
            f"--{end_name.replace('_', '-')} {last.date()} is not after --cutoff {cut.date()}; "
            "the simulated period starts the day after the cut-off"
        )
    return cut, last


def check_inside_data(events: pd.DataFrame, source: str, *days: pd.Timestamp) -> None:
    """Every day in ``days`` must lie between the first and the last event day of the data."""
    first = events["timestamp"].min().normalize()
    last = events["timestamp"].max().normalize()
    for day in days:
        if not first <= day <= last:
            raise FintwinInputError(
                f"{source}: {day.date()} is outside the data, which spans {first.date()} to "
                f"{last.date()}"
            )


def load_model(ckpt: str | Path, device: str | None = None) -> TrainedTwin:
    """The twin (on ``device``, default GPU when present) with its featuriser spec."""
    twin = load_twin(ckpt)
    twin.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return twin


def event_settings(twin: TrainedTwin) -> dict[str, object]:
    """The settings that decide the event table read from a source, by their config keys."""
    schema = dataclasses.asdict(twin.spec.schema())
    return {
        **{f"data.schema.{key}": value for key, value in schema.items()},
        "data.same_day_merge": twin.spec.same_day_merge,
        "data.simulator": twin.split["simulator"],
    }


def read_events(twin: TrainedTwin, data_source: str) -> pd.DataFrame:
    """The events of ``data_source``, read with the checkpoint's spec (and, for the
    ``synthetic`` source, its simulator config)."""
    simulator = twin.split["simulator"]
    use_simulator = simulator and data_source == "synthetic"
    return twin.spec.read_events(
        data_source, SimulatorConfig(**simulator) if use_simulator else None
    )


def load_members(
    ckpt: str | Path | Sequence[str | Path], device: str | None = None
) -> list[tuple[Path, TrainedTwin]]:
    """One checkpoint, or an ensemble's several (``load_model`` each), reading events alike."""
    paths = [Path(ckpt)] if isinstance(ckpt, (str, Path)) else [Path(c) for c in ckpt]
    if not paths:
        raise FintwinInputError("--ckpt: expected at least one checkpoint")
    members = [(path, load_model(path, device)) for path in paths]
    check_same_events(members)
    return members


def check_same_featurisation(members: list[tuple[Path, TrainedTwin]]) -> None:
    """Twins that simulate together share one featurisation of the histories."""
    first_path, first = members[0]
    for path, twin in members[1:]:
        for field in ("vocab", "max_len", "numeric_features", "categorical_features",
                      "categorical_vocabs"):
            if getattr(twin.spec, field) != getattr(first.spec, field):
                raise FintwinInputError(
                    f"{path}: its {field} differs from {first_path}'s; the twins of a "
                    "simulated ensemble must featurise histories the same way (e.g. seeds of "
                    "one config on the same data)"
                )


def has_dates_only(events: pd.DataFrame) -> bool:
    """True when every timestamp is at midnight (the source records dates only)."""
    stamps = events["timestamp"]
    return bool((stamps == stamps.dt.normalize()).all())


def rollout_config(
    events: pd.DataFrame,
    samples: int,
    seed: int,
    max_steps: int,
    keep_paths: bool = False,
    keep_outcomes: bool = False,
) -> RolloutConfig:
    """Rollout settings for a CLI run (progress bar on, hours off for date-only data)."""
    return RolloutConfig(
        samples=samples,
        seed=seed,
        max_steps=max_steps,
        dates_only=has_dates_only(events),
        keep_paths=keep_paths,
        keep_outcomes=keep_outcomes,
        progress=True,
    )


def simulate(
    ckpt: str | Path | Sequence[str | Path],
    data_source: str,
    cutoff: str,
    horizon_end: str,
    samples: int,
    out: str | Path,
    what_if: str | Path | None = None,
    seed: int = 0,
    paths_out: str | Path | None = None,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    device: str | None = None,
) -> pd.DataFrame:
    """Roll every customer forward from ``cutoff`` to ``horizon_end``; write Parquet to ``out``.

    Without ``what_if``: one row per customer (``RolloutResult.summary`` columns). With a
    what-if file: the per-customer comparison (``WhatIfResult.per_customer``), and the totals
    in ``<out stem>.overall.json`` and in the returned frame's ``attrs["overall"]``.
    ``paths_out``: also write the sampled events (of the what-if scenario, if any). Several
    checkpoints (e.g. seeds of one config) simulate as an ensemble: each twin ``samples``
    paths per customer (rollout seed ``seed + i``), pooled (``sample`` numbers continue from
    one twin to the next), so the summaries and quantiles are those of their mixture.
    """
    cut, last = parse_window(cutoff, horizon_end, "horizon_end")
    members = load_members(ckpt, device)
    check_same_featurisation(members)
    _, first = members[0]
    spec = first.spec
    events = read_events(first, data_source)
    check_inside_data(events, data_source, cut)
    for path, twin in members:
        if twin.observation_end > observation_end(cut):
            log.warning(
                "%s was trained on data up to %s, after the cut-off %s",
                path,
                twin.observation_end,
                cut.date(),
            )
    models = [twin.model for _, twin in members]
    config = rollout_config(events, samples, seed, max_steps, keep_paths=paths_out is not None)
    if what_if is None:
        result = rollout(models, spec.sequences(events, cut), spec.vocab, last, config)
        table, paths = result.summary, result.paths
    else:
        injections = whatif.read_what_if(what_if, spec)
        comparison = whatif.what_if(
            models, events, spec, cut, last, injections, config, source=str(what_if)
        )
        table, paths = comparison.per_customer, comparison.paths
        write_json_atomic(Path(out).with_suffix(".overall.json"), comparison.overall)
        table.attrs["overall"] = comparison.overall
    write_parquet(table.reset_index(), out)
    if paths_out is not None:
        write_parquet(paths, paths_out)
    log.info("wrote %d customers to %s", len(table), out)
    return table


def refuse_leaky_checkpoint(twin: TrainedTwin, ckpt: str | Path, cut: pd.Timestamp) -> None:
    """A report needs a model that saw nothing after the cut-off."""
    if twin.observation_end > observation_end(cut):
        raise FintwinInputError(
            f"{ckpt}: the checkpoint was trained on data up to {twin.observation_end} "
            f"(data.cutoff={twin.split['cutoff']}), after the report's cut-off {cut.date()}; "
            "its forecasts would have seen the holdout. Use a checkpoint trained with "
            f"data.cutoff <= {cut.date()}"
        )


def fit_baseline(events: pd.DataFrame, cut: pd.Timestamp) -> BGNBDGammaGamma:
    """BG/NBD + Gamma-Gamma on the calibration data, or ``FintwinInputError`` if it diverges."""
    try:
        return BGNBDGammaGamma().fit(events, cut)
    except ConvergenceError as err:
        raise FintwinInputError(
            f"BG/NBD + Gamma-Gamma did not converge on the calibration data up to {cut.date()} "
            "(typical when no customer appears to drop out); the report needs the baseline"
        ) from err


def forecasts_table(predictions: dict[str, pd.DataFrame], actual: pd.DataFrame) -> pd.DataFrame:
    """Per-customer actuals and every model's forecast columns (``<model>_<column>``)."""
    parts = [actual] + [
        pred.loc[actual.index].add_prefix(f"{name}_") for name, pred in predictions.items()
    ]
    return pd.concat(parts, axis=1).rename_axis("customer_id").reset_index()


def check_same_events(members: list[tuple[Path, TrainedTwin]]) -> None:
    """An ensemble's members must read the events alike (the actuals and BG/NBD are shared)."""
    first_path, first = members[0]
    expected = event_settings(first)
    for path, twin in members[1:]:
        for key, value in event_settings(twin).items():
            if value != expected[key]:
                raise FintwinInputError(
                    f"{path}: {key}={value!r} differs from {first_path}'s "
                    f"{expected[key]!r}; an ensemble's checkpoints must read the events the "
                    "same way"
                )


def twin_forecasts(
    twin: TrainedTwin,
    events: pd.DataFrame,
    window: tuple[pd.Timestamp, pd.Timestamp],
    config: RolloutConfig,
    days: pd.DatetimeIndex,
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.Series], RolloutResult]:
    """One twin's holdout forecasts (``twin``: rollouts, ``twin_heads``: direct heads), their
    expected cumulative transactions through ``days`` and the rollouts themselves."""
    cut, last = window
    sequences = twin.spec.sequences(events, cut)
    result = rollout(twin.model, sequences, twin.spec.vocab, last, config)
    heads = heads_forecast(twin.model, sequences, last, twin.spec.horizon_days)
    predictions = {"twin": rollout_forecast(result), "twin_heads": heads}
    cumulative = {
        "twin": rollout_cumulative(result, days),
        "twin_heads": heads_cumulative(heads, cut, last, days),
    }
    return predictions, cumulative, result


def mean_of(
    parts: list[dict[str, pd.DataFrame | pd.Series]],
) -> dict[str, pd.DataFrame | pd.Series]:
    """Per key, the average of the members' frames (an equal-weight mixture of the twins)."""
    return {key: sum(part[key] for part in parts) / len(parts) for key in parts[0]}


def report(
    ckpt: str | Path | Sequence[str | Path],
    data_source: str,
    cutoff: str,
    holdout_end: str,
    out_dir: str | Path,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Forecast the holdout with rollouts, the direct heads and BG/NBD; write the report.

    Writes ``write_report``'s files (metrics.json with ``twin``, ``twin_heads`` and
    ``bgnbd``, the plots, report.html) and ``forecasts.parquet`` (per-customer forecasts and
    actuals) to ``out_dir``; returns the metrics: `forecast_metrics` of every model, and for
    the rollouts and BG/NBD, whose forecasts are distributions, the `fintwin.twin.scores` of
    their distributions of holdout transactions and spend. Refuses a checkpoint trained on
    data after the cut-off. Several checkpoints (e.g. seeds) form an ensemble: each simulates
    ``samples`` paths per customer (rollout seed ``seed + i``) and the twin's forecasts are
    the members' averages, the forecasts of their equal-weight mixture (whose distribution
    pools the members' paths).
    """
    cut, last = parse_window(cutoff, holdout_end, "holdout_end")
    members = load_members(ckpt, device)
    for path, twin in members:
        refuse_leaky_checkpoint(twin, path, cut)
    events = read_events(members[0][1], data_source)
    check_inside_data(events, data_source, cut, last)
    baseline = fit_baseline(events, cut)
    days = holdout_week_ends(events, cut, last)
    config = rollout_config(events, samples, seed, max_steps, keep_outcomes=True)
    forecasts, curves, results = [], [], []
    for i, (_, twin) in enumerate(members):
        member_config = replace(config, seed=seed + i)
        predictions, cumulative, result = twin_forecasts(
            twin, events, (cut, last), member_config, days
        )
        forecasts.append(predictions)
        curves.append(cumulative)
        results.append(result)
    predictions = mean_of(forecasts) | {"bgnbd": baseline.predict(last)}
    actual = holdout_actuals(events, cut, last)
    metrics = {name: forecast_metrics(pred, actual) for name, pred in predictions.items()}
    distributions = {
        "twin": rollout_distribution(results, actual),
        "bgnbd": baseline.holdout_distribution(last, actual),
    }
    scores = {name: d.scores() for name, d in distributions.items()}
    pit = {name: d.pit_histograms() for name, d in distributions.items()}
    tracking = weekly_tracking(
        events,
        cut,
        last,
        holdout_cumulative=mean_of(curves) | {"bgnbd": baseline.expected_cumulative_holdout(days)},
    )
    write_report(
        out_dir, metrics, tracking, predictions, actual, cutoff=cut, holdout_end=last,
        scores=scores, pit=pit,
    )  # fmt: skip
    write_parquet(forecasts_table(predictions, actual), Path(out_dir) / FORECASTS_FILE)
    log.info(
        "report in %s (%d customers, %d twin(s) x %d samples, %d capped paths)",
        out_dir,
        len(actual),
        len(members),
        samples,
        sum(result.n_capped for result in results),
    )
    return {name: values | scores.get(name, {}) for name, values in metrics.items()}
