"""What-if scenarios: inject hypothetical events and compare the simulated futures.

A what-if file (CSV or Parquet) has one row per hypothetical event: ``customer_id`` (or
``*`` for every customer), ``timestamp``, ``event_type`` (a type the model knows) and
``amount`` (>= 0); columns named like the model's numeric features are optional (missing or
empty values take the customer's mean), and so are columns named like its categorical
features (missing or empty values keep the value the customer's previous event had; a value
unknown to the feature's vocabulary is the unknown id, as in training). An event must come strictly after the customer's
last calibration event and on or before the horizon-end day. The file is read as event files
are (``fintwin.data.sources``, ``fintwin.data.schema``): separators, decimal marks, date forms
and column names alike, with errors naming the file's lines.

Semantics (an intervention: the event happens, whatever the model would have done):
- an event before the end of the cut-off day is added to the history (the silence after it
  up to the cut-off is conditioned on, as for real events);
- a later event is forced into every path at its time: generated events before it happen as
  usual, and the path continues from the state after it (a customer the path had made
  dormant acts again). Injected events are inputs, not outcomes: counts and spend are over
  generated events only.

Both futures are simulated with the same seed, chunks and per-path noise (common random
numbers), so a customer without injected events gets exactly the same paths in both and the
per-customer differences are paired: their standard error is that of the mean of the
per-path differences. Totals add customers' differences (paths of different customers are
independent, so their variances add).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fintwin.data.features import PAD_ID, FeaturiserSpec
from fintwin.data.schema import (
    LINE,
    REQUIRED_COLUMNS,
    SHOWN_ROWS,
    EventSchema,
    EventValidationError,
    check_columns,
    match_columns,
    parse_numbers,
    parse_timestamps,
)
from fintwin.data.sequences import SequenceSet, calibration_events
from fintwin.data.sources import read_csv, read_parquet, sniff_csv
from fintwin.errors import FintwinInputError
from fintwin.models.module import TwinModule
from fintwin.twin.rollout import (
    ChunkOutcome,
    ForcedEvents,
    RolloutConfig,
    as_members,
    chunk_customers,
    eval_mode,
    iter_pooled_chunks,
    mean_and_se,
    paths_frame,
    window_bounds,
)

log = logging.getLogger(__name__)

ALL_CUSTOMERS = "*"
OUTCOMES = ("expected_count", "expected_spend", "p_active")


def _offending(index: pd.Index, mask: pd.Series | np.ndarray) -> pd.Index:
    """The first offending rows' labels (file lines or 0-based rows, as the index is named)."""
    return index[np.asarray(mask, dtype=bool)].unique()[:SHOWN_ROWS]


def _read_table(path: Path, spec: FeaturiserSpec) -> pd.DataFrame:
    """The what-if columns of a CSV or Parquet file, read as event files are read."""
    if not path.is_file():
        raise FintwinInputError(f"{path}: what-if file not found")
    if path.suffix == ".parquet":
        return read_parquet(path, [*REQUIRED_COLUMNS, *_feature_columns(spec)])
    if path.suffix == ".csv":
        present = match_columns(sniff_csv(path).header, _feature_columns(spec), str(path))
        return read_csv(path, _schema_of(present.values(), spec))
    raise FintwinInputError(
        f"{path}: unsupported what-if file type '{path.suffix}'; use .csv or .parquet"
    )


def _feature_columns(spec: FeaturiserSpec) -> list[str]:
    """The optional what-if columns: the model's numeric and categorical features."""
    return [*spec.numeric_features, *spec.categorical_features]


def _schema_of(present: Iterable[str], spec: FeaturiserSpec) -> EventSchema:
    """The schema of a what-if table holding the feature columns ``present``."""
    present = set(present)
    return EventSchema(
        numeric_features=[name for name in spec.numeric_features if name in present],
        categorical_features=[name for name in spec.categorical_features if name in present],
    )


def read_what_if(path: str | Path, spec: FeaturiserSpec, source: str | None = None) -> pd.DataFrame:
    """Read and check a what-if file against the model's vocabulary.

    CSV files are read like event files (``fintwin.data.sources.read_csv``: sniffed separator,
    decimal commas, numeric dates, ...) and errors name their lines. Returns ``check_what_if``'s
    table.
    """
    path = Path(path)
    return check_what_if(_read_table(path, spec), spec, source or str(path))


def _customer_ids(col: pd.Series, source: str) -> pd.Series:
    ids = col.astype("string").str.strip()
    missing = ids.isna().to_numpy() | (ids == "").fillna(False).to_numpy(dtype=bool)
    if missing.any():
        raise EventValidationError(
            source, "customer_id",
            f"missing customer id; expected an id, or '{ALL_CUSTOMERS}' for every customer",
            _offending(col.index, missing),
        )
    return ids.astype(str)


def _event_types(col: pd.Series, spec: FeaturiserSpec, source: str) -> pd.Series:
    known = set(spec.vocab.tokens)
    types = col.astype("string").str.strip()
    unknown = ~types.isin(known).fillna(False).to_numpy(dtype=bool)
    if unknown.any():
        raise EventValidationError(
            source, "event_type",
            f"unknown event_type {col[unknown].iloc[0]!r}; the model knows {sorted(known)}",
            _offending(col.index, unknown),
        )
    return types.astype(str)


def _amounts(col: pd.Series, source: str) -> pd.Series:
    amount = parse_numbers(col, "amount", source)
    bad = ~np.isfinite(amount.to_numpy()) | (amount < 0).to_numpy()
    if bad.any():
        raise EventValidationError(
            source, "amount",
            f"missing, infinite or negative amount {col[bad].iloc[0]!r}; expected a number >= 0",
            _offending(col.index, bad),
        )
    return amount


def _numeric_feature(col: pd.Series, name: str, source: str) -> pd.Series:
    values = parse_numbers(col, name, source)
    infinite = np.isinf(values.to_numpy())
    if infinite.any():
        raise EventValidationError(
            source, name,
            f"infinite value {col[infinite].iloc[0]!r}; expected a number, or nothing for the "
            "customer's mean", _offending(col.index, infinite),
        )
    return values


def check_what_if(frame: pd.DataFrame, spec: FeaturiserSpec, source: str = "what-if") -> pd.DataFrame:
    """Check a what-if table; raise ``EventValidationError`` naming the column and rows.

    Column names match ignoring case and surrounding whitespace; timestamps and numbers are
    parsed as in event tables (``fintwin.data.schema``). Returns columns ``row`` (where the
    event is in the input: its file line when the index is named ``line``, as ``read_csv``
    names it, else its 0-based row; also the index), ``customer_id`` (str, may be ``*``),
    ``timestamp`` (naive UTC), ``event_type``, ``amount``, the numeric features (NaN where
    missing) and the categorical features (text, NA where missing).
    """
    present = match_columns(list(frame.columns), _feature_columns(spec), source)
    schema = _schema_of(present.values(), spec)
    positions = check_columns(list(frame.columns), schema, source)
    frame = frame.iloc[:, list(positions)].set_axis(list(positions.values()), axis=1)
    if frame.index.name != LINE:
        frame = frame.reset_index(drop=True)
    ids = _customer_ids(frame["customer_id"], source)
    types = _event_types(frame["event_type"], spec, source)
    out = pd.DataFrame(
        {
            "row": frame.index,
            "customer_id": ids,
            "timestamp": parse_timestamps(frame["timestamp"], source),
            "event_type": types,
            "amount": _amounts(frame["amount"], source),
        },
        index=frame.index,
    )
    for name in spec.numeric_features:
        out[name] = _numeric_feature(frame[name], name, source) if name in frame else np.nan
    for name in spec.categorical_features:
        values = frame[name].astype("string").str.strip() if name in frame else pd.NA
        out[name] = pd.Series(values, index=out.index, dtype="string").replace("", pd.NA)
    return out


def _expand_all_customers(rows: pd.DataFrame, customer_ids: np.ndarray) -> pd.DataFrame:
    """Each ``*`` row once per customer, in customer order (keeping its index label)."""
    every = (rows["customer_id"] == ALL_CUSTOMERS).to_numpy()
    star = rows[every]
    expanded = star.iloc[np.repeat(np.arange(len(star)), len(customer_ids))].assign(
        customer_id=np.tile(customer_ids, len(star))
    )
    return pd.concat([rows[~every], expanded])


def resolve_what_if(
    rows: pd.DataFrame,
    sequences: SequenceSet,
    horizon_end: str | pd.Timestamp,
    source: str = "what-if",
) -> pd.DataFrame:
    """Expand ``*`` rows to every customer and check customers and timestamps.

    ``rows``: ``check_what_if`` output, whose index names the rows in errors. Adds
    ``customer`` (index into ``sequences``); sorted by customer, time and row.
    """
    _, end = window_bounds(sequences, horizon_end)
    rows = _expand_all_customers(rows, sequences.customer_ids)
    customer = pd.Index(sequences.customer_ids).get_indexer(rows["customer_id"])
    unknown = customer < 0
    if unknown.any():
        ids = list(dict.fromkeys(rows.loc[unknown, "customer_id"]))[:SHOWN_ROWS]
        raise EventValidationError(
            source, "customer_id",
            f"unknown customer_id(s) {ids}; what-if customers need calibration events before "
            "the cut-off", _offending(rows.index, unknown),
        )
    rows = rows.assign(customer=customer)
    last = pd.to_datetime(sequences.last_event_time[customer])
    early = (rows["timestamp"] <= last).to_numpy()
    if early.any():
        first = rows[early].iloc[0]
        raise EventValidationError(
            source, "timestamp",
            f"timestamp {first['timestamp']} is not after customer {first['customer_id']}'s last "
            f"event ({last[np.flatnonzero(early)[0]]}); injected events must follow the history"
            + (f" ({int(early.sum())} customer-events in all)" if early.sum() > 1 else ""),
            _offending(rows.index, early),
        )
    late = (rows["timestamp"] >= end).to_numpy()
    if late.any():
        first = rows[late].iloc[0]
        raise EventValidationError(
            source, "timestamp",
            f"timestamp {first['timestamp']} is after the horizon end "
            f"({(end - pd.Timedelta(days=1)).date()}, inclusive)", _offending(rows.index, late),
        )
    return rows.sort_values(["customer", "timestamp", "row"], kind="stable", ignore_index=True)


def inject_history(
    events: pd.DataFrame, rows: pd.DataFrame, spec: FeaturiserSpec, cutoff: str | pd.Timestamp
) -> pd.DataFrame:
    """``events`` with the injected ``rows`` added, sorted by customer then time.

    Missing numeric values take the customer's mean over their calibration events; missing
    categorical values the customer's previous event's.
    """
    numeric, categorical = list(spec.numeric_features), list(spec.categorical_features)
    added = rows[["customer_id", "timestamp", "event_type", "amount", *numeric, *categorical]].copy()
    if numeric:
        means = calibration_events(events, cutoff).groupby("customer_id")[numeric].mean()
        fill = means.reindex(added["customer_id"]).set_axis(added.index)
        added[numeric] = added[numeric].fillna(fill)
    merged = pd.concat([events, added], ignore_index=True)
    merged = merged.sort_values(["customer_id", "timestamp"], kind="stable", ignore_index=True)
    if categorical:
        merged[categorical] = merged.groupby("customer_id")[categorical].ffill().astype(str)
    return merged


def forced_events(
    rows: pd.DataFrame, n_customers: int, start: pd.Timestamp, spec: FeaturiserSpec
) -> ForcedEvents:
    """Injected events at or after ``start`` as padded per-customer arrays (a missing
    categorical value is ``PAD_ID``: the path keeps its held value)."""
    n_numeric, n_categorical = len(spec.numeric_features), len(spec.categorical_features)
    if rows.empty:
        return ForcedEvents.none(n_customers, n_numeric, n_categorical)
    slot = rows.groupby("customer").cumcount().to_numpy()
    customer = rows["customer"].to_numpy()
    forced = ForcedEvents.empty(n_customers, int(slot.max()) + 1, n_numeric, n_categorical)
    forced.time[customer, slot] = (rows["timestamp"] - start) / pd.Timedelta(days=1)
    forced.event_type[customer, slot] = spec.vocab.encode(rows["event_type"].to_numpy())
    forced.amount[customer, slot] = rows["amount"].to_numpy(np.float32)
    if n_numeric:
        forced.numeric[customer, slot] = rows[list(spec.numeric_features)].to_numpy(np.float32)
    for field, (name, vocab) in enumerate(spec.categorical):
        values = rows[name]
        ids = vocab.encode(values.fillna("").to_numpy(dtype=object))
        forced.categorical[customer, slot, field] = np.where(values.isna(), PAD_ID, ids)
    return forced


@dataclass
class WhatIfResult:
    """Per-customer and total effects of the injected events.

    ``per_customer`` (index ``customer_id``): ``injected_events`` and, for ``expected_count``,
    ``expected_spend`` and ``p_active``, the ``base_*`` and ``whatif_*`` Monte Carlo means
    and the paired ``diff_*`` with its standard error ``diff_*_se``. ``overall``: totals over
    customers (``diff_expected_count``, ``diff_expected_spend``, ``diff_active_customers``:
    the change in the expected number of customers with an event, each with ``_se``), plus
    ``customers``, ``customers_with_injections``, ``injected_events`` and ``capped_paths``.
    ``paths``: the what-if scenario's sampled events when kept.
    """

    per_customer: pd.DataFrame
    overall: dict[str, float]
    paths: pd.DataFrame | None = None


def _paired(base: ChunkOutcome, scenario: ChunkOutcome, customer_ids: np.ndarray) -> pd.DataFrame:
    columns: dict[str, np.ndarray] = {}
    for name, before, after in (
        ("expected_count", base.count, scenario.count),
        ("expected_spend", base.spend, scenario.spend),
        ("p_active", (base.count > 0).double(), (scenario.count > 0).double()),
    ):
        columns[f"base_{name}"] = before.mean(dim=1).numpy()
        columns[f"whatif_{name}"] = after.mean(dim=1).numpy()
        columns[f"diff_{name}"], columns[f"diff_{name}_se"] = mean_and_se(after - before)
    columns["capped_paths"] = (base.capped.sum(dim=1) + scenario.capped.sum(dim=1)).numpy()
    index = pd.Index(customer_ids[base.customers], name="customer_id")
    return pd.DataFrame(columns, index=index)


def overall_effect(per_customer: pd.DataFrame) -> dict[str, float]:
    """Totals over customers of the paired differences, with standard errors."""
    overall: dict[str, float] = {
        "customers": float(len(per_customer)),
        "customers_with_injections": float((per_customer["injected_events"] > 0).sum()),
        "injected_events": float(per_customer["injected_events"].sum()),
        "capped_paths": float(per_customer["capped_paths"].sum()),
    }
    for name, total in (
        ("expected_count", "expected_count"),
        ("expected_spend", "expected_spend"),
        ("p_active", "active_customers"),
    ):
        overall[f"base_{total}"] = float(per_customer[f"base_{name}"].sum())
        overall[f"whatif_{total}"] = float(per_customer[f"whatif_{name}"].sum())
        overall[f"diff_{total}"] = float(per_customer[f"diff_{name}"].sum())
        overall[f"diff_{total}_se"] = float(
            np.sqrt((per_customer[f"diff_{name}_se"] ** 2).sum(min_count=1))
        )
    return overall


def what_if(
    model: TwinModule | Sequence[TwinModule],
    events: pd.DataFrame,
    spec: FeaturiserSpec,
    cutoff: str | pd.Timestamp,
    horizon_end: str | pd.Timestamp,
    injections: pd.DataFrame,
    config: RolloutConfig | None = None,
    source: str = "what-if",
) -> WhatIfResult:
    """Simulate the futures with and without ``injections`` (``check_what_if`` output).

    ``events`` is the validated event table (later events are ignored), ``cutoff`` the last
    calibration day and ``horizon_end`` the last simulated day. Several models (an ensemble
    featurising alike) pool their paths in both futures, as in ``rollout``.
    """
    models = as_members(model)
    config = config or RolloutConfig()
    base = spec.sequences(events, cutoff)
    start, _ = window_bounds(base, horizon_end)
    rows = resolve_what_if(injections, base, horizon_end, source)
    history = rows[rows["timestamp"] < start]
    scenario = (
        spec.sequences(inject_history(events, history, spec, cutoff), cutoff)
        if len(history)
        else base
    )
    forced = forced_events(rows[rows["timestamp"] >= start], len(base), start, spec)
    history_len = int(max(base.lengths.max(), scenario.lengths.max()))
    size = config.chunk_customers or chunk_customers(
        models, config.samples, history_len, config.memory_mb
    )
    config = dataclasses.replace(config, chunk_customers=size)
    base_config = dataclasses.replace(config, keep_paths=False, progress=False)
    tables, paths = [], []
    with eval_mode(*models), torch.inference_mode():
        chunks = zip(
            iter_pooled_chunks(models, base, horizon_end, base_config),
            iter_pooled_chunks(models, scenario, horizon_end, config, forced),
            strict=True,
        )
        for before, after in chunks:
            tables.append(_paired(before, after, base.customer_ids))
            if after.paths is not None:
                paths.append(paths_frame(after.paths, scenario, spec.vocab, start))
    per_customer = pd.concat(tables)
    counts = rows.groupby("customer_id").size()
    per_customer.insert(0, "injected_events", counts.reindex(per_customer.index, fill_value=0))
    overall = overall_effect(per_customer)
    log.info("what-if effect: %s", {k: round(v, 4) for k, v in overall.items()})
    return WhatIfResult(
        per_customer=per_customer,
        overall=overall,
        paths=pd.concat(paths, ignore_index=True) if config.keep_paths else None,
    )
