"""HTML views of explanations: per customer, the event timeline coloured by contribution (an
inline SVG: red raises the output, blue lowers it, the bar's height its size), the ranked
reasons and every event's attribution per field; an index of the customers."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np

from fintwin.explain.attribution import REFERENCE
from fintwin.explain.explainer import ATTRIBUTION_PREFIX, CustomerExplanation

WIDTH, HEIGHT, MARGIN = 900, 220, 40
STYLE = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}.up{color:#b2182b}.down{color:#2166ac}")


def page_name(customer_id: str) -> str:
    """File name of a customer's page (characters outside ``[A-Za-z0-9_.-]`` replaced)."""
    return "customer_" + re.sub(r"[^A-Za-z0-9_.-]", "_", customer_id) + ".html"


def _colour(value: float, scale: float) -> str:
    """Red for positive, blue for negative, stronger for larger ``|value| / scale``."""
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    fade = int(round(255 * (1 - strength)))
    return f"rgb(255,{fade},{fade})" if value > 0 else f"rgb({fade},{fade},255)"


def timeline_svg(explanation: CustomerExplanation) -> str:
    """The events on a time axis: one bar per event, up for a positive contribution (its
    ``attr_total``), down for a negative one, coloured by its size; hover for the fields."""
    events = explanation.events
    total = events[f"{ATTRIBUTION_PREFIX}total"].to_numpy()
    times = events["timestamp"].astype("int64").to_numpy() / 1e9
    span = max(times.max() - times.min(), 1.0)
    scale = max(float(np.abs(total).max()), 1e-12)
    middle, reach = HEIGHT / 2, HEIGHT / 2 - 20
    fields = [c for c in events.columns if c.startswith(ATTRIBUTION_PREFIX) and not c.endswith("total")]
    shapes = [f'<line x1="{MARGIN}" y1="{middle}" x2="{WIDTH - MARGIN}" y2="{middle}" stroke="#888"/>']
    for i, row in enumerate(events.itertuples(index=False)):
        x = MARGIN + (WIDTH - 2 * MARGIN) * (times[i] - times.min()) / span
        size = reach * abs(total[i]) / scale
        top = middle - size if total[i] > 0 else middle
        detail = "; ".join(f"{c[len(ATTRIBUTION_PREFIX):]} {events[c].iloc[i]:+.4g}" for c in fields)
        title = html.escape(f"{row.timestamp:%Y-%m-%d %H:%M} {row.event_type} {row.amount:,.2f}: "
                            f"{total[i]:+.4g} ({detail})")
        shapes.append(f'<rect x="{x - 2:.1f}" y="{top:.1f}" width="4" height="{max(size, 1):.1f}" '
                      f'fill="{_colour(total[i], scale)}" stroke="#555" stroke-width="0.3">'
                      f"<title>{title}</title></rect>")
    first, last = events["timestamp"].iloc[0], events["timestamp"].iloc[-1]
    shapes.append(f'<text x="{MARGIN}" y="{HEIGHT - 4}" font-size="11">{first:%Y-%m-%d}</text>')
    shapes.append(f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - 4}" font-size="11" '
                  f'text-anchor="end">{last:%Y-%m-%d}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'role="img" aria-label="event timeline">{"".join(shapes)}</svg>')


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def customer_page(explanation: CustomerExplanation) -> str:
    """The customer's page: summary, ranked reasons, timeline, history terms, events."""
    e = explanation
    reasons = _table(["#", "reason", "contribution"], [
        (r.rank, html.escape(r.text),
         f'<span class="{"up" if r.contribution > 0 else "down"}">{r.contribution:+.4g}</span>')
        for r in e.reasons])
    history = _table(["term", "contribution"], [
        (html.escape(name), f"{value:+.4g}") for name, value in e.history.items()])
    columns = [c for c in e.events.columns if c != "timestamp"]
    events = _table(["timestamp", *columns], [
        (f"{row['timestamp']:%Y-%m-%d %H:%M}",
         *(html.escape(str(row[c])) if isinstance(row[c], str) else f"{row[c]:.4g}" for c in columns))
        for row in e.events.to_dict(orient="records")])
    title = html.escape(f"{e.output} of customer {e.customer_id}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>prediction {e.prediction:.6g}, reference {e.reference:.6g} ({html.escape(REFERENCE)}); "
        f"the contributions add up to {e.prediction - e.reference:+.6g} (convergence delta "
        f"{e.convergence_delta:.2g}, {e.steps} integration steps).</p>"
        f"<h2>Reasons</h2>{reasons}<h2>Events</h2>{timeline_svg(e)}"
        f"<h2>History terms</h2>{history}<h2>Attributions per event and field</h2>{events}"
        "</body></html>")


def index_page(explanations: Sequence[CustomerExplanation]) -> str:
    """Links to every customer's page with its prediction and first reason."""
    rows = [(f'<a href="{page_name(e.customer_id)}">{html.escape(e.customer_id)}</a>',
             f"{e.prediction:.4g}", html.escape(e.reasons[0].text if e.reasons else ""))
            for e in explanations]
    output = html.escape(explanations[0].output) if explanations else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>explanations</title>"
            f"<style>{STYLE}</style></head><body><h1>Explanations of {output}</h1>"
            f"{_table(['customer', 'prediction', 'first reason'], rows)}</body></html>")
