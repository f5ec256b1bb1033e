"""Explain a twin's output for the customers of an event file: attributions, ranked reasons,
and the tables, JSON and HTML `fintwin explain` writes.

The twin comes from a checkpoint or from the explanation model ``NAME_explain`` that `fintwin
export` writes next to ``NAME`` (``fintwin.explain.serving``): the same weights, featuriser spec
and code serve both. Events are read and featurised as the twin was trained
(``FeaturiserSpec``), each customer's most recent ``max_len`` events observed to the end of the
as-of day (default: the last day in the events).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fintwin.data.features import FeaturiserSpec, customer_groups
from fintwin.errors import FintwinInputError
from fintwin.explain.attribution import (
    MAX_STEPS,
    REFERENCE,
    START_STEPS,
    SUMMARY_FEATURES,
    Attributions,
    Attributor,
    parse_output,
)
from fintwin.explain.reasons import TOP_REASONS, CustomerAttributions, Reason, rank_reasons
from fintwin.files import atomic_path, write_atomic, write_json_atomic
from fintwin.models.module import TwinModule

ROWS_PER_BATCH = 16  # customers integrated together
SHOWN_IDS = 5  # customer ids named in an error message
ATTRIBUTION_PREFIX = "attr_"  # events table: attr_type, attr_amount, ..., attr_total


@dataclass
class CustomerExplanation:
    """One customer's explanation of ``output``: ``prediction - reference`` split over the
    events' fields (``events``: one row per kept event, a column per field and ``total``) and
    the ``history`` terms (``recency:TYPE``, ``summary:FEATURE``, ``silence``), ranked
    ``reasons``; ``convergence_delta``: attribution sum minus ``prediction - reference``."""

    customer_id: str
    output: str
    prediction: float
    reference: float
    convergence_delta: float
    steps: int
    converged: bool
    events: pd.DataFrame
    history: dict[str, float]
    reasons: list[Reason] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (timestamps as ISO-8601)."""
        events = self.events.assign(timestamp=self.events["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
        return {
            "customer_id": self.customer_id, "output": self.output,
            "prediction": self.prediction, "reference": self.reference,
            "convergence_delta": self.convergence_delta, "steps": self.steps,
            "converged": self.converged, "reasons": [r.to_dict() for r in self.reasons],
            "history": self.history, "events": events.to_dict(orient="records"),
        }


class Explainer:
    """Integrated-gradients explanations of one twin (``fintwin.explain.attribution``)."""

    def __init__(self, model: TwinModule, spec: FeaturiserSpec, *, start_steps: int = START_STEPS,
                 max_steps: int = MAX_STEPS) -> None:
        self.model = model.eval()
        self.spec = spec
        self.attributor = Attributor(model, spec.numeric_features, spec.categorical_features,
                                     start_steps=start_steps, max_steps=max_steps)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options) -> Explainer:
        """The twin of a checkpoint written by ``train.py``."""
        from fintwin.models.checkpoint import load_twin

        twin = load_twin(path)
        return cls(twin.model, twin.spec, **options)

    @classmethod
    def from_repository(cls, repo: str | Path, name: str, version: int | None = None,
                        **options) -> Explainer:
        """The explanation model ``NAME_explain`` of an exported repository."""
        from fintwin.explain.serving import load_explain_version

        model, spec = load_explain_version(repo, name, version)
        return cls(model, spec, **options)

    def read(self, events: pd.DataFrame | str | Path, customers: Sequence[str] | None = None
             ) -> pd.DataFrame:
        """Validated events (of ``customers`` only, when given; each must be there)."""
        source = events if isinstance(events, pd.DataFrame) else str(events)
        table = self.spec.read_events(source)
        if customers:
            known = pd.unique(table["customer_id"])
            missing = [c for c in dict.fromkeys(str(c) for c in customers) if c not in set(known)]
            if missing:
                name = "the events" if isinstance(events, pd.DataFrame) else str(events)
                raise FintwinInputError(
                    f"customer(s) {missing[:SHOWN_IDS]} have no event in {name}; it holds "
                    f"{len(known):,} customers, e.g. {list(known[:SHOWN_IDS])}")
            table = table[table["customer_id"].isin(set(str(c) for c in customers))]
        return table.reset_index(drop=True)

    def explain(self, events: pd.DataFrame | str | Path, output: str = "churn_prob",
                customers: Sequence[str] | None = None, top: int = TOP_REASONS,
                as_of: str | pd.Timestamp | None = None) -> list[CustomerExplanation]:
        """One explanation of ``output`` per customer of ``events`` (or of ``customers``), with
        its ``top`` reasons. ``FintwinInputError`` on a bad output name, an unknown customer
        or bad events."""
        selector = parse_output(output, self.spec)
        if top < 1:
            raise FintwinInputError(f"top must be >= 1 reason, got {top}")
        table = self.read(events, customers)
        sequences = self.spec.inference_sequences(table, as_of)
        starts, counts = customer_groups(table["customer_id"].to_numpy())
        silence = sequences.days_since_last_event().astype(np.float32)
        explanations = []
        for lo in range(0, len(sequences), ROWS_PER_BATCH):
            index = np.arange(lo, min(lo + ROWS_PER_BATCH, len(sequences)))
            batch = sequences.batch(index, with_targets=False)
            batch["days_since_last_event"] = torch.from_numpy(silence[index])
            attributions = self.attributor.attribute(batch, selector)
            for row, customer in enumerate(index):
                length = int(sequences.lengths[customer])
                first = starts[customer] + counts[customer] - length
                kept = table.iloc[first : starts[customer] + counts[customer]]
                gaps = sequences.features["delta_t"][sequences.starts[customer]:][:length]
                explanations.append(self._customer(
                    sequences.customer_ids[customer], selector.label, kept, gaps, attributions,
                    row, sequences.observation_end, top))
        return explanations

    def _customer(self, customer_id: str, output: str, kept: pd.DataFrame, gaps: np.ndarray,
                  attributions: Attributions, row: int, as_of: pd.Timestamp,
                  top: int) -> CustomerExplanation:
        length = len(kept)
        values = attributions.events[row, :length]
        events = pd.DataFrame({
            "timestamp": kept["timestamp"].to_numpy(), "event_type": kept["event_type"].to_numpy(),
            "amount": kept["amount"].to_numpy(np.float64), "gap_days": gaps.astype(np.float64),
            "type_id": self.spec.vocab.encode(kept["event_type"].to_numpy()),
        })
        labels = self.spec.vocab.labels()
        history: dict[str, float] = {}
        if attributions.recency is not None:
            history |= {f"recency:{labels[i]}": float(v)
                        for i, v in enumerate(attributions.recency[row]) if i > 0}
        summary = {}
        if attributions.summary is not None:
            summary = dict(zip(SUMMARY_FEATURES, attributions.summary[row].tolist(), strict=True))
            history |= {f"summary:{k}": v for k, v in summary.items()}
        history["silence"] = float(attributions.silence[row])
        data = CustomerAttributions(
            events=events, fields=attributions.fields, attributions=values, type_labels=labels,
            recency=None if attributions.recency is None else attributions.recency[row],
            summary=summary, silence=float(attributions.silence[row]), as_of=as_of)
        table = events.drop(columns="type_id").assign(
            **{f"{ATTRIBUTION_PREFIX}{name}": values[:, i]
               for i, name in enumerate(attributions.fields)},
            **{f"{ATTRIBUTION_PREFIX}total": values.sum(axis=1)})
        return CustomerExplanation(
            customer_id=str(customer_id), output=output,
            prediction=float(attributions.prediction[row]),
            reference=float(attributions.reference[row]),
            convergence_delta=float(attributions.delta[row]), steps=int(attributions.steps[row]),
            converged=bool(attributions.converged()[row]), events=table, history=history,
            reasons=rank_reasons(data, top))


def reasons_table(explanations: Sequence[CustomerExplanation]) -> pd.DataFrame:
    """One row per customer and reason."""
    rows = [
        {"customer_id": e.customer_id, "output": e.output, "prediction": e.prediction,
         "reference": e.reference, "convergence_delta": e.convergence_delta, "steps": e.steps,
         "converged": e.converged, **reason.to_dict()}
        for e in explanations for reason in e.reasons
    ]
    return pd.DataFrame(rows)


def events_table(explanations: Sequence[CustomerExplanation]) -> pd.DataFrame:
    """One row per customer and kept event: the event, its attribution per field and total."""
    parts = [e.events.assign(customer_id=e.customer_id, output=e.output, position=np.arange(len(e.events)))
             for e in explanations]
    table = pd.concat(parts, ignore_index=True)
    first = ["customer_id", "output", "position"]
    return table[first + [c for c in table.columns if c not in first]]


def write_explanations(explanations: Sequence[CustomerExplanation], out: Path,
                       html_dir: Path | None = None) -> list[Path]:
    """Write ``out`` (``.json``: one document; ``.parquet``: the reasons, and the per-event
    attributions next to it as ``STEM.events.parquet``) and, with ``html_dir``, one HTML page
    per customer and an index; return the paths written."""
    out = Path(out)
    if out.suffix == ".json":
        write_json_atomic(out, {"reference": REFERENCE,
                                "customers": [e.to_dict() for e in explanations]})
        written = [out]
    elif out.suffix == ".parquet":
        events_path = out.with_name(f"{out.stem}.events.parquet")
        for path, table in ((out, reasons_table(explanations)), (events_path, events_table(explanations))):
            with atomic_path(path) as tmp:
                table.to_parquet(tmp, index=False)
        written = [out, events_path]
    else:
        raise FintwinInputError(f"--out {out}: expected a .parquet or .json file")
    if html_dir is not None:
        from fintwin.explain.html import customer_page, index_page, page_name

        for explanation in explanations:
            path = Path(html_dir) / page_name(explanation.customer_id)
            write_atomic(path, customer_page(explanation))
            written.append(path)
        write_atomic(Path(html_dir) / "index.html", index_page(explanations))
        written.append(Path(html_dir) / "index.html")
    return written
