"""Attributions grouped into human-readable reasons, ranked by the size of their contribution.

Groups of one customer's attributions (``CustomerAttributions``), each a signed contribution
to ``prediction - reference``; together they add up to it:

- ``events``: the events of one type in one window before the as-of instant (the last 30 days,
  31-90 days, earlier), their type, amount, calendar and extra fields:
  "4 cash withdrawals in the last 30 days (320.00 in total)";
- ``pace``: the gaps before the events of one window: "a gap of 45 days before 2024-05-02"
  when one gap carries most of it, else "12 events 31-90 days ago, a median gap of 2.5 days";
- ``recency``: the days since the last event of one type, at every position, against never
  having seen one: "no salary since 2024-03-01 (62 days before the last event)";
- ``history``: the running summary: number of events, age, rate, typical gap and amount;
- ``silence``: the days from the last event to the as-of instant (horizon outputs only):
  "silence of 45 days since 2024-05-16".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from fintwin.data.features import OOV_ID

WINDOWS = ((30.0, "in the last 30 days"), (90.0, "31-90 days ago"), (np.inf, "more than 90 days ago"))
TOP_REASONS = 4
DOMINANT_SHARE = 0.5  # one gap holding this share of its window's contribution is named alone
SUMMARY_TEXT = {
    "count": "{count} events in the history",
    "age": "a customer for {age:.0f} days (since {first})",
    "rate": "{rate:.1f} events per 30 days",
    "mean_gap": "a typical gap of {mean_gap:.1f} days between events",
    "mean_amount": "a typical amount of {mean_amount:,.2f}",
}


@dataclass(frozen=True)
class Reason:
    """One ranked reason: ``kind`` (module doc), ``text`` and signed ``contribution``."""

    rank: int
    kind: str
    text: str
    contribution: float

    @property
    def direction(self) -> str:
        return "raises" if self.contribution > 0 else "lowers"

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"direction": self.direction}


@dataclass
class CustomerAttributions:
    """One customer's kept events and their attributions (``fields`` per event), the history
    terms (``recency`` per event-type id, ``summary`` per summary feature) and the silence.

    ``events``: ``timestamp``, ``event_type``, ``amount``, ``gap_days`` (0 for the first),
    one row per event in time order; ``attributions`` ``[n, len(fields)]``.
    """

    events: pd.DataFrame
    fields: list[str]
    attributions: np.ndarray
    type_labels: np.ndarray
    recency: np.ndarray | None
    summary: dict[str, float]
    silence: float
    as_of: pd.Timestamp


def noun(event_type: str, count: int) -> str:
    """``cash_withdrawal`` -> "cash withdrawal" / "cash withdrawals"."""
    text = str(event_type).replace("_", " ")
    if count == 1 or text.endswith("s"):
        return text
    if text.endswith("y") and text[-2:-1] not in ("a", "e", "i", "o", "u"):
        return text[:-1] + "ies"
    return text + "s"


def _day(value) -> str:
    return str(pd.Timestamp(value).date())


def days_text(days: float) -> str:
    """``0.4 days``, ``1 day``, ``45 days``."""
    if round(days, 1) == 1:
        return "1 day"
    return f"{days:.1f} days" if days < 10 else f"{days:.0f} days"


def _window_of(days_before: np.ndarray) -> np.ndarray:
    """Index into ``WINDOWS`` of each event's days before the as-of instant."""
    return np.searchsorted([limit for limit, _ in WINDOWS[:-1]], days_before, side="left")


def _columns(events: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """Timestamps (datetime64[ns]), types, amounts, gaps and type ids as numpy arrays."""
    return (events["timestamp"].to_numpy("datetime64[ns]"), events["event_type"].to_numpy(object),
            events["amount"].to_numpy(np.float64), events["gap_days"].to_numpy(np.float64),
            events["type_id"].to_numpy())


def _days(later: np.datetime64, earlier: np.ndarray | np.datetime64) -> np.ndarray:
    return (later - earlier) / np.timedelta64(1, "D")


def event_groups(data: CustomerAttributions) -> list[tuple[str, str, float]]:
    """``events`` and ``pace`` groups: (kind, text, contribution)."""
    times, types, amounts, gaps, _ = _columns(data.events)
    window = _window_of(_days(data.as_of.to_datetime64(), times))
    content = [i for i, name in enumerate(data.fields) if name != "gap"]
    own = data.attributions[:, content].sum(axis=1)
    gap = data.attributions[:, data.fields.index("gap")]
    groups = []
    for w, (_, label) in enumerate(WINDOWS):
        inside = window == w
        if not inside.any():
            continue
        for event_type in pd.unique(types[inside]):
            rows = inside & (types == event_type)
            count, total = int(rows.sum()), float(amounts[rows].sum())
            text = f"{count} {noun(event_type, count)} {label}"
            if total > 0:
                text += f" ({total:,.2f} in total)"
            groups.append(("events", text, float(own[rows].sum())))
        groups.append(("pace", _pace_text(times, gaps, inside, gap, label), float(gap[inside].sum())))
    return groups


def _pace_text(times: np.ndarray, gaps: np.ndarray, inside: np.ndarray, gap: np.ndarray,
               label: str) -> str:
    """Names the one gap holding most of the window's gap contribution, else the window's pace."""
    index = np.flatnonzero(inside)
    largest = index[np.argmax(np.abs(gap[index]))]
    if abs(gap[largest]) >= DOMINANT_SHARE * np.abs(gap[index]).sum() and largest > 0:
        return f"a gap of {days_text(gaps[largest])} before {_day(times[largest])}"
    between = gaps[index[index > 0]]
    median = f", a median gap of {days_text(np.median(between))}" if len(between) else ""
    return f"{len(index)} events {label}{median}"


def recency_groups(data: CustomerAttributions) -> list[tuple[str, str, float]]:
    """``recency`` groups: one per event type of the history (types never seen contribute
    nothing, as in the reference)."""
    if data.recency is None:
        return []
    times, _, _, _, type_ids = _columns(data.events)
    last_time = times[-1]
    groups = []
    for type_id in pd.unique(type_ids):
        label = "event of an unknown type" if type_id == OOV_ID else noun(data.type_labels[type_id], 1)
        seen = times[type_ids == type_id][-1]
        if seen == last_time:
            text = f"a {label} as the latest event ({_day(last_time)})"
        else:
            text = (f"no {label} since {_day(seen)} ({days_text(_days(last_time, seen))} before "
                    "the last event)")
        groups.append(("recency", text, float(data.recency[type_id])))
    return groups


def history_values(events: pd.DataFrame) -> dict[str, object]:
    """The running summary's values at the last event, as ``HistorySummary`` computes them."""
    gaps = events["gap_days"].to_numpy(np.float64)[1:]
    age = float(gaps.sum())
    amounts = np.maximum(events["amount"].to_numpy(np.float64), 0.0)
    return {
        "count": len(events),
        "age": age,
        "first": _day(events["timestamp"].iloc[0]),
        "rate": 30.0 * float((gaps > 0).sum()) / max(age, 1.0),
        "mean_gap": float(np.expm1(np.log1p(gaps).mean())) if len(gaps) else 0.0,
        "mean_amount": float(np.expm1(np.log1p(amounts).mean())),
    }


def rank_reasons(data: CustomerAttributions, top: int = TOP_REASONS) -> list[Reason]:
    """Every group of ``data``, ranked by the size of its contribution; the first ``top``."""
    groups = event_groups(data) + recency_groups(data)
    values = history_values(data.events)
    groups += [("history", SUMMARY_TEXT[name].format(**values), value)
               for name, value in data.summary.items()]
    if data.silence != 0.0:
        last = data.events["timestamp"].iloc[-1]
        silent = (data.as_of - last).total_seconds() / 86_400
        groups.append(("silence", f"silence of {days_text(silent)} since {_day(last)}",
                       data.silence))
    order = sorted(range(len(groups)), key=lambda i: -abs(groups[i][2]))[:top]
    return [Reason(rank, *groups[i]) for rank, i in enumerate(order, start=1)]

