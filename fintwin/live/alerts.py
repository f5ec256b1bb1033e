"""Early warnings of live twins: churn risk, unusual events and overdue customers.

Computed by ``LiveTwins`` on every event, from the twin's stored record (the step graph's
outputs after the customer's previous event are kept as ``prediction:<output>`` fields, the
predictive distribution's parameters among them) and stored with the new state, each with
its inputs, in the state store (``StateStore.alerts``):

- ``churn_risk``: the churn probability right after the event reaches ``churn_on`` while the
  twin's churn alert is off; the alert then stays on (``alert:churn_risk``, a field of the
  stored record) until the probability falls below ``churn_off``, so a probability hovering
  at the threshold raises one alert, not one per event.
- ``unusual_event``: the event is improbable under the twin's predictive distribution
  BEFORE it. Three tail probabilities: ``type``, the probability of a type no more probable
  than the event's (an unseen or unknown type has a tiny one); ``amount``, two-sided, of the
  amount under the zero-inflated log-normal of the event's type; ``timing``, two-sided, of
  the days since the previous event under the gap mixture given a next event. Under the twin
  the three are independent (type and gap are independent given the history, the amount's
  tail is uniform given the type), so they combine by Fisher's method into the event's tail
  probability (``combined_tail``; chi-squared with 6 degrees of freedom), which is uniform
  for events that follow the twin. The alert fires when it is below ``unusual_tail`` and
  names the unusual parts: those whose own tail is below ``unusual_tail``, else the one with
  the smallest. A customer's first event has nothing to be compared with (NaN, no alert).
- ``overdue``: found by ``sweep`` over the stored states, without an event: the customer's
  silence has passed the ``overdue_level`` quantile of the twin's predicted time to the next
  event (given one comes), i.e. the survival of the gap mixture at the silence is below
  ``1 - overdue_level``. One alert per silence (keyed by the customer's last event).

Thresholds are parameters of the live model's Triton config (``config.pbtxt``:
``alert_churn_on``, ``alert_churn_off``, ``alert_unusual_tail``, ``alert_overdue_level``),
written by ``fintwin export`` with ``AlertConfig``'s defaults; edit them there (and reload the
model) to change them. Records hold no customer id: the live answer names the customer, and
the store keys a record as it keys the customer's state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy.special import expit, ndtr

from fintwin.data.features import MIN_GAP_DAYS, NS_PER_DAY
from fintwin.errors import FintwinInputError
from fintwin.live.store import AlertRecord, StateStore, StoredStates, iso_time

CHURN_RISK, UNUSUAL_EVENT, OVERDUE = "churn_risk", "unusual_event", "overdue"
CHURN_STATE = "alert:churn_risk"  # stored field: 1 while the churn alert is on
ALERT_STATE = {CHURN_STATE: ((1,), "float32")}
PARTS = ("type", "amount", "timing")
PREDICTION = "prediction:{}"
PARAMETER = "alert_{}"  # the live model's config parameter of each AlertConfig field
QUANTILE_ITERATIONS = 60  # bisection on log(gap): the bracket shrinks 2^60 times


@dataclass(frozen=True)
class AlertConfig:
    """Alert thresholds (the live model's config parameters ``alert_<field>``)."""

    churn_on: float = 0.6  # churn_risk fires when churn_prob reaches this ...
    churn_off: float = 0.4  # ... and re-arms once it falls below this
    unusual_tail: float = 0.001  # unusual_event fires when a tail probability is below this
    overdue_level: float = 0.99  # overdue: silence past this quantile of the predicted gap

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not (isinstance(value, float | int) and 0.0 < value < 1.0):
                raise FintwinInputError(
                    f"alert threshold {PARAMETER.format(item.name)}={value!r}: expected a number "
                    "strictly between 0 and 1"
                )
        if not self.churn_off < self.churn_on:
            raise FintwinInputError(
                f"alert thresholds: {PARAMETER.format('churn_off')}={self.churn_off} must be "
                f"below {PARAMETER.format('churn_on')}={self.churn_on} (the hysteresis band)"
            )

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Mapping[str, str]],
                        source: str) -> AlertConfig:
        """The thresholds of a Triton config's ``parameters`` (``{name: {"string_value":
        ...}}``); absent ones keep their defaults, bad ones are refused naming ``source``."""
        values = {}
        for item in fields(cls):
            name = PARAMETER.format(item.name)
            text = parameters.get(name, {}).get("string_value", "")
            if text:
                try:
                    values[item.name] = float(text)
                except ValueError:
                    raise FintwinInputError(
                        f"{source}: parameter {name}={text!r} is not a number"
                    ) from None
        try:
            return cls(**values)
        except FintwinInputError as exc:
            raise FintwinInputError(f"{source}: {exc}") from None

    @classmethod
    def of_model(cls, model_dir: Path) -> AlertConfig:
        """The thresholds in the parameters of a model directory's ``config.pbtxt``."""
        from fintwin.export.triton_repo import CONFIG_NAME, read_model_config

        config = read_model_config(model_dir)
        parameters = {name: {"string_value": value.string_value}
                      for name, value in config.parameters.items()}
        return cls.from_parameters(parameters, str(Path(model_dir) / CONFIG_NAME))

    def parameters(self) -> dict[str, str]:
        """The config parameters holding these thresholds."""
        return {PARAMETER.format(name): repr(value) for name, value in asdict(self).items()}


@dataclass
class EventAlerts:
    """Alerts of a batch of events: per event, its alerts (dicts) and its tail probabilities
    ``[n, 3]`` (``PARTS`` order), and the new ``CHURN_STATE`` values ``[n, 1]``."""

    alerts: list[list[dict]]
    tails: np.ndarray
    churn_state: np.ndarray


def event_alerts(config: AlertConfig, before: Mapping[str, np.ndarray], seq: np.ndarray,
                 after: Mapping[str, np.ndarray], event: Mapping[str, np.ndarray],
                 labels: np.ndarray, horizon_days: float) -> EventAlerts:
    """The alerts of events stepped from the stored records ``before`` (fields by name, one
    row per event; ``seq``: the events applied before each) to ``after``.

    ``event``: ``event_type`` ids, ``amount``, ``gap_days`` (days since the previous
    event) and ``timestamp_ns``; ``labels``: type names by id.
    """
    n = len(seq)
    tails = np.full((n, len(PARTS)), np.nan)
    known = seq > 0
    if known.any():
        tails[known] = event_tails(before, event, known)
    churn = after[PREDICTION.format("churn_prob")].reshape(n).astype(np.float64)
    was_on = before[CHURN_STATE].reshape(n) > 0
    fires = ~was_on & (churn >= config.churn_on)
    now_on = np.where(was_on, churn >= config.churn_off, fires)
    alerts: list[list[dict]] = [[] for _ in range(n)]
    for row in np.flatnonzero(fires):
        alerts[row].append(churn_alert(config, row, seq, churn, event, horizon_days))
    combined = combined_tail(np.where(known[:, None], tails, 1.0))
    unusual = np.flatnonzero(combined < config.unusual_tail)
    medians = gap_quantile(  # one bisection for all of the batch's alerts
        before[PREDICTION.format("gap_mixture")][unusual].astype(np.float64), 0.5
    ) if len(unusual) else []
    for row, median in zip(unusual, medians, strict=True):
        alerts[row].append(unusual_alert(config, row, seq, before, tails[row], combined[row],
                                         event, labels, float(median)))
    return EventAlerts(alerts, tails, now_on.astype(np.float32)[:, None])


def event_tails(before: Mapping[str, np.ndarray], event: Mapping[str, np.ndarray],
                rows: np.ndarray) -> np.ndarray:
    """``[n, 3]`` tail probabilities (``PARTS``) of the events ``rows`` under the predictive
    distribution stored before them."""
    probs = before[PREDICTION.format("next_event_probs")][rows].astype(np.float64)
    amount = before[PREDICTION.format("amount_params")][rows].astype(np.float64)
    gap = before[PREDICTION.format("gap_mixture")][rows].astype(np.float64)
    types = event["event_type"][rows]
    return np.stack([
        type_tail(probs, types),
        amount_tail(amount, types, event["amount"][rows].astype(np.float64)),
        timing_tail(gap, event["gap_days"][rows].astype(np.float64)),
    ], axis=1)


def combined_tail(tails: np.ndarray) -> np.ndarray:
    """Fisher's combination of ``[n, 3]`` independent tail probabilities: P(chi2_6 >= -2 sum
    log p) = exp(-s) (1 + s + s^2 / 2) with s = -sum log p."""
    s = -np.log(np.clip(tails, 1e-300, 1.0)).sum(axis=1)
    return np.exp(-s) * (1.0 + s + 0.5 * s * s)


def type_tail(probs: np.ndarray, types: np.ndarray) -> np.ndarray:
    """P(the next type is no more probable than ``types``) under ``probs`` ``[n, V]``."""
    observed = probs[np.arange(len(types)), types]
    return np.minimum((probs * (probs <= observed[:, None] * (1 + 1e-6))).sum(axis=1), 1.0)


def amount_tail(params: np.ndarray, types: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Two-sided tail ``2 min(P(A <= a), P(A >= a))`` of ``amount`` under the zero-inflated
    log-normal of each row's type (``params`` ``[n, 3, V]``: zero logit, loc, log scale)."""
    zero_logit, loc, log_scale = params[np.arange(len(types)), :, types].T
    zero = expit(zero_logit)
    positive = amount > 0
    z = (np.log(np.where(positive, amount, 1.0)) - loc) * np.exp(-log_scale)
    below = np.where(positive, zero + (1 - zero) * ndtr(z), zero)
    above = np.where(positive, (1 - zero) * ndtr(-z), 1.0)
    return np.minimum(2 * np.minimum(below, above), 1.0)


def gap_cdf(mixture: np.ndarray, gap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(F, S)``: P(gap' <= gap) and P(gap' > gap) given a next event, under the log-normal
    mixture ``[n, 3, M]`` (log weights, loc, log scale of log(gap))."""
    log_weights, loc, log_scale = mixture[:, 0], mixture[:, 1], mixture[:, 2]
    log_gap = np.log(np.maximum(gap, MIN_GAP_DAYS))[:, None]
    z = (log_gap - loc) * np.exp(-log_scale)
    weights = np.exp(log_weights)
    return (weights * ndtr(z)).sum(axis=1), (weights * ndtr(-z)).sum(axis=1)


def timing_tail(mixture: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Two-sided tail ``2 min(F, S)`` of the days since the previous event."""
    below, above = gap_cdf(mixture, gap)
    return np.minimum(2 * np.minimum(below, above), 1.0)


def gap_quantile(mixture: np.ndarray, level: float) -> np.ndarray:
    """The ``level`` quantile (days) of the gap given a next event, by bisection on log(gap)."""
    loc, scale = mixture[:, 1], np.exp(mixture[:, 2])
    low, high = (loc - 9 * scale).min(axis=1), (loc + 9 * scale).max(axis=1)
    for _ in range(QUANTILE_ITERATIONS):
        middle = 0.5 * (low + high)
        below, _ = gap_cdf(mixture, np.exp(middle))
        low, high = np.where(below < level, middle, low), np.where(below < level, high, middle)
    return np.exp(0.5 * (low + high))


def churn_alert(config: AlertConfig, row: int, seq: np.ndarray, churn: np.ndarray,
                event: Mapping[str, np.ndarray], horizon_days: float) -> dict:
    return {
        "kind": CHURN_RISK,
        "seq": int(seq[row]) + 1,
        "event_time": iso_time(int(event["timestamp_ns"][row])),
        "churn_prob": float(churn[row]),
        "inputs": {"churn_prob": float(churn[row]), "horizon_days": horizon_days,
                   "alert_was_on": False, "churn_on": config.churn_on,
                   "churn_off": config.churn_off},
    }


def unusual_alert(config: AlertConfig, row: int, seq: np.ndarray,
                  before: Mapping[str, np.ndarray], tails: np.ndarray, combined: float,
                  event: Mapping[str, np.ndarray], labels: np.ndarray,
                  gap_median_days: float) -> dict:
    type_id = int(event["event_type"][row])
    zero_logit, loc, log_scale = before[PREDICTION.format("amount_params")][row][:, type_id]
    return {
        "kind": UNUSUAL_EVENT,
        "seq": int(seq[row]) + 1,
        "event_time": iso_time(int(event["timestamp_ns"][row])),
        "tail_probability": float(combined),
        "unusual": [part for part, tail in zip(PARTS, tails, strict=True)
                    if tail < config.unusual_tail] or [PARTS[int(np.argmin(tails))]],
        "tails": dict(zip(PARTS, map(float, tails), strict=True)),
        "inputs": {
            "event_type": str(labels[type_id]),
            "amount": float(event["amount"][row]),
            "gap_days": float(event["gap_days"][row]),
            "type_prob": float(before[PREDICTION.format("next_event_probs")][row][type_id]),
            "amount_zero_prob": float(expit(zero_logit)),
            "amount_median": float(math.exp(loc)),
            "amount_log_sigma": float(math.exp(log_scale)),
            "gap_median_days": gap_median_days,
            "unusual_tail": config.unusual_tail,
        },
    }


@dataclass(frozen=True)
class Overdue:
    """An overdue customer found by ``sweep``: its key in the store and the alert."""

    customer_key: str
    alert: dict


OVERDUE_FIELDS = (PREDICTION.format("gap_mixture"), PREDICTION.format("dormant_prob"))


def overdue_alerts(config: AlertConfig, states: StoredStates, now_ns: int) -> list[Overdue]:
    """The customers of ``states`` (with ``OVERDUE_FIELDS``) whose silence at ``now_ns`` is
    past the ``overdue_level`` quantile of their predicted gap."""
    silence = (now_ns - states.timestamp_ns) / NS_PER_DAY
    mixture = states.arrays[OVERDUE_FIELDS[0]].astype(np.float64)
    dormant = states.arrays[OVERDUE_FIELDS[1]].reshape(len(states)).astype(np.float64)
    _, survival = gap_cdf(mixture, np.maximum(silence, 0.0))
    rows = np.flatnonzero((silence > 0) & (survival < 1.0 - config.overdue_level))
    quantiles = gap_quantile(mixture[rows], config.overdue_level)
    posterior = dormant / (dormant + (1 - dormant) * survival)
    return [
        Overdue(states.keys[row], {
            "kind": OVERDUE,
            "seq": int(states.seq[row]),
            "last_event_time": iso_time(int(states.timestamp_ns[row])),
            "as_of": iso_time(now_ns),
            "silence_days": float(silence[row]),
            "quantile_days": float(quantile),
            "dormant_prob_after_silence": float(posterior[row]),
            "inputs": {"overdue_level": config.overdue_level, "survival": float(survival[row]),
                       "dormant_prob": float(dormant[row])},
        })
        for row, quantile in zip(rows, quantiles, strict=True)
    ]


def sweep(store: StateStore, model: str, version: int, config: AlertConfig,
          now_ns: int) -> Iterator[Overdue]:
    """Overdue customers of ``model`` version ``version`` at ``now_ns``, over every stored
    state; each is stored (``StateStore.record_alerts``) and yielded once per silence (a
    customer still overdue at the next sweep is not yielded again)."""
    for batch in store.states(model, version, OVERDUE_FIELDS):
        found = overdue_alerts(config, batch, now_ns)
        records = [AlertRecord(o.customer_key, o.alert["seq"], OVERDUE, json.dumps(o.alert))
                   for o in found]
        new = store.record_alerts(model, version, records) if records else []
        yield from (o for o, is_new in zip(found, new, strict=True) if is_new)


def stored_alerts(store: StateStore, model: str, version: int,
                  customer_ids: list[str] | None = None) -> list[dict]:
    """The stored alerts (their records) of ``customer_ids`` (all when None)."""
    return [json.loads(a.record) | {"customer_key": a.customer_key}
            for a in store.alerts(model, version, customer_ids)]
