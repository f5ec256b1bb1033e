"""What-if scenarios: inject hypothetical events and compare the simulated futures.

A what-if file (CSV or Parquet) has one row per hypothetical event: ``customer_id`` (or
``*`` for every customer), ``timestamp``, ``event_type`` (a type the model knows) and
``amount`` (>= 0); columns named like the model's numeric features are optional (missing or
empty values take the customer's mean). An event must come strictly after the customer's
last calibration event and on or before the horizon-end day.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fintwin.data.sequences import SequenceSet, calibration_events
from fintwin.errors import FintwinInputError
from fintwin.models.module import TwinModule
from fintwin.twin.rollout import (
    ChunkOutcome,
    ForcedEvents,
    HistorySpec,
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

REQUIRED_COLUMNS = ("customer_id", "timestamp", "event_type", "amount")
ALL_CUSTOMERS = "*"
SHOWN = 5
OUTCOMES = ("expected_count", "expected_spend", "p_active")


def _rows(frame: pd.DataFrame, mask: pd.Series | np.ndarray) -> str:
    """The first offending rows' numbers (0-based, data rows)."""
    return ", ".join(str(r) for r in frame.loc[np.asarray(mask), "row"].head(SHOWN))


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FintwinInputError(f"{path}: what-if file not found")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"customer_id": str, "event_type": str})
    raise FintwinInputError(
        f"{path}: unsupported what-if file type '{path.suffix}'; use .csv or .parquet"
    )


def _parse_timestamps(frame: pd.DataFrame, source: str) -> pd.Series:
    """Datetimes or ISO-8601 strings as naive UTC (like the event contract)."""
    parsed = frame["timestamp"]
    if not pd.api.types.is_datetime64_any_dtype(parsed):
        parsed = pd.to_datetime(parsed, errors="coerce", format="ISO8601", utc=True)
    if parsed.dt.tz is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    parsed = parsed.astype("datetime64[ns]")
    bad = parsed.isna()
    if bad.any():
        raise FintwinInputError(
            f"{source}, column 'timestamp': unparseable timestamps in rows {_rows(frame, bad)} "
            "(0-based data rows); expected ISO-8601 dates or datetimes"
        )
    return parsed


def _parse_amounts(frame: pd.DataFrame, source: str) -> pd.Series:
    amount = pd.to_numeric(frame["amount"], errors="coerce").astype(float)
    bad = ~np.isfinite(amount) | (amount < 0)
    if bad.any():
        raise FintwinInputError(
            f"{source}, column 'amount': missing, non-numeric, infinite or negative amounts in "
            f"rows {_rows(frame, bad)} (0-based data rows); expected numbers >= 0"
        )
    return amount


def read_what_if(path: str | Path, spec: HistorySpec, source: str | None = None) -> pd.DataFrame:
    """Read and check a what-if file against the model's vocabulary.

    Returns columns ``row`` (0-based data row in the file), ``customer_id`` (str, may be
    ``*``), ``timestamp`` (naive UTC), ``event_type``, ``amount`` and the numeric features.
    """
    path = Path(path)
    source = source or str(path)
    frame = _read_table(path).reset_index(drop=True)
    return check_what_if(frame, spec, source)


def check_what_if(frame: pd.DataFrame, spec: HistorySpec, source: str = "what-if") -> pd.DataFrame:
    """Check a what-if table (see ``read_what_if``); raise ``FintwinInputError`` naming rows."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise FintwinInputError(
            f"{source}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)}, "
            f"found {list(frame.columns)}"
        )
    frame = frame.reset_index(drop=True).assign(row=np.arange(len(frame)))
    no_id = frame["customer_id"].isna()
    if no_id.any():
        raise FintwinInputError(
            f"{source}, column 'customer_id': empty in rows {_rows(frame, no_id)} "
            f"(0-based data rows); use '{ALL_CUSTOMERS}' for every customer"
        )
    known = set(spec.vocab.tokens)
    unknown = ~frame["event_type"].astype(str).isin(known) | frame["event_type"].isna()
    if unknown.any():
        first = frame.loc[unknown].iloc[0]
        raise FintwinInputError(
            f"{source}, row {first['row']} (0-based data row): unknown event_type "
            f"{first['event_type']!r}; the model knows {sorted(known)}"
        )
    out = pd.DataFrame(
        {
            "row": frame["row"],
            "customer_id": frame["customer_id"].astype(str),
            "timestamp": _parse_timestamps(frame, source),
            "event_type": frame["event_type"].astype(str),
            "amount": _parse_amounts(frame, source),
        }
    )
    for name in spec.numeric_features:
        values = frame[name] if name in frame.columns else np.nan
        out[name] = pd.to_numeric(pd.Series(values, index=frame.index), errors="coerce")
    return out


def _expand_all_customers(rows: pd.DataFrame, customer_ids: np.ndarray) -> pd.DataFrame:
    every = rows["customer_id"] == ALL_CUSTOMERS
    expanded = (
        rows[every]
        .drop(columns="customer_id")
        .merge(pd.DataFrame({"customer_id": customer_ids}), how="cross")
    )
    return pd.concat([rows[~every], expanded[rows.columns]], ignore_index=True)


def resolve_what_if(
    rows: pd.DataFrame,
    sequences: SequenceSet,
    horizon_end: str | pd.Timestamp,
    source: str = "what-if",
) -> pd.DataFrame:
    """Expand ``*`` rows to every customer and check customers and timestamps.

    Adds ``customer`` (index into ``sequences``); sorted by customer, time and row.
    """
    _, end = window_bounds(sequences, horizon_end)
    rows = _expand_all_customers(rows, sequences.customer_ids)
    customer = pd.Index(sequences.customer_ids).get_indexer(rows["customer_id"])
    unknown = customer < 0
    if unknown.any():
        ids = list(dict.fromkeys(rows.loc[unknown, "customer_id"]))[:SHOWN]
        raise FintwinInputError(
            f"{source}: unknown customer_id(s) {ids} in rows {_rows(rows, unknown)} (0-based "
            "data rows); what-if customers need calibration events before the cut-off"
        )
    rows = rows.assign(customer=customer)
    last = pd.to_datetime(sequences.last_event_time[customer])
    early = (rows["timestamp"] <= last).to_numpy()
    if early.any():
        first = rows[early].iloc[0]
        raise FintwinInputError(
            f"{source}, row {first['row']} (0-based data row): timestamp {first['timestamp']} is "
            f"not after customer {first['customer_id']}'s last event "
            f"({last[np.flatnonzero(early)[0]]}); injected events must follow the history"
            + (f" ({int(early.sum())} customer-events in all)" if early.sum() > 1 else "")
        )
    late = (rows["timestamp"] >= end).to_numpy()
    if late.any():
        first = rows[late].iloc[0]
        raise FintwinInputError(
            f"{source}, row {first['row']} (0-based data row): timestamp {first['timestamp']} is "
            f"after the horizon end ({(end - pd.Timedelta(days=1)).date()}, inclusive)"
        )
    return rows.sort_values(["customer", "timestamp", "row"], kind="stable", ignore_index=True)


def inject_history(
    events: pd.DataFrame, rows: pd.DataFrame, spec: HistorySpec, cutoff: str | pd.Timestamp
) -> pd.DataFrame:
    """``events`` with the injected ``rows`` added, sorted by customer then time.

    Missing numeric values take the customer's mean over their calibration events.
    """
    numeric = list(spec.numeric_features)
    added = rows[["customer_id", "timestamp", "event_type", "amount", *numeric]].copy()
    if numeric:
        means = calibration_events(events, cutoff).groupby("customer_id")[numeric].mean()
        fill = means.reindex(added["customer_id"]).set_axis(added.index)
        added[numeric] = added[numeric].fillna(fill)
    merged = pd.concat([events, added], ignore_index=True)
    return merged.sort_values(["customer_id", "timestamp"], kind="stable", ignore_index=True)


def forced_events(
    rows: pd.DataFrame, n_customers: int, start: pd.Timestamp, spec: HistorySpec
) -> ForcedEvents:
    """Injected events at or after ``start`` as padded per-customer arrays."""
    n_numeric = len(spec.numeric_features)
    if rows.empty:
        return ForcedEvents.none(n_customers, n_numeric)
    slot = rows.groupby("customer").cumcount().to_numpy()
    customer = rows["customer"].to_numpy()
    width = int(slot.max()) + 1
    forced = ForcedEvents(
        time=np.full((n_customers, width), np.inf),
        event_type=np.zeros((n_customers, width), np.int64),
        amount=np.zeros((n_customers, width), np.float32),
        numeric=np.full((n_customers, width, n_numeric), np.nan, np.float32),
    )
    forced.time[customer, slot] = (rows["timestamp"] - start) / pd.Timedelta(days=1)
    forced.event_type[customer, slot] = spec.vocab.encode(rows["event_type"].to_numpy())
    forced.amount[customer, slot] = rows["amount"].to_numpy(np.float32)
    if n_numeric:
        forced.numeric[customer, slot] = rows[list(spec.numeric_features)].to_numpy(np.float32)
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
    spec: HistorySpec,
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
