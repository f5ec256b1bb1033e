"""Reference likelihoods of simulated events: the exact oracle and a history-free baseline.

The oracle scores any event table under the process of a ``SimulatorConfig`` (see
``fintwin.data.simulator``) with the segment marginalised by its posterior (forward
filtering). Per event ``i > 1`` of a customer it reports
``log_p_type = log p(type_i | h, return)``, ``log_p_gap = log p(gap_i | h)`` (including the
``log(1 - q)`` factor), ``log_p_amount = log p(amount_i | type_i, h, return)`` and the joint
``log_p_event = log p(type_i, gap_i, amount_i | h)``; at each customer's last event it reports
``log_p_censored = log P(no event before observation_end | h)``. The first event of a customer
is not scored and leaves the posterior at the prior, for any table. The three per-term values
match the model's factorisation term by term; their sum differs from ``log_p_event`` because
an uncertain segment couples type, gap and amount (in expectation the sum is the smaller:
it is the best a factorised model can do, ``log_p_event`` the best any model can do). Gap
densities are per day, amount densities per currency unit (with respect to a point mass at 0
plus Lebesgue measure). Gaps shorter than ``MIN_GAP_DAYS`` (ties in real data) are clamped.

In a world with channels (``categorical_channel``) the table needs a ``channel`` column. The
channel is an observed input, as it is to a model: ``h`` includes the channels of the events
so far (the last one shifts the next event), no term scores a channel, and the segment
posterior also weighs each channel seen, the first event's included, by its probability
given the earlier channels and the segment (the customer's propensities integrated out:
Dirichlet-multinomial).

The marginal baseline ignores history: type frequencies, a gap mixture with dormancy and a
zero-inflated amount mixture, fitted on training customers and scored in the same frame.
Between the two lies a model's ``oracle_skill`` (``fintwin.models.quality``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import log_ndtr

from fintwin.data.features import MIN_GAP_DAYS, NS_PER_DAY
from fintwin.data.simulator import (
    CHANNEL_COLUMN,
    CHANNELS,
    EVENT_TYPES,
    SALARY_ID,
    SEGMENTS,
    ProcessParams,
    SimulatorConfig,
    days_since_epoch,
    next_amount_log_median,
    next_gap_params,
    next_type_logits,
    process_params,
)

LOG_COLUMNS: tuple[str, ...] = (
    "log_p_type",
    "log_p_gap",
    "log_p_amount",
    "log_p_event",
    "log_p_censored",
)

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


# --------------------------------------------------------------------------------------
# Densities of the process's factors
# --------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(x))) along ``axis`` (rows of all -inf give -inf)."""
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - peak), axis=axis)) + np.squeeze(peak, axis=axis)


def _lognormal_logpdf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    log_x = np.log(x)
    return -0.5 * ((log_x - mu) / sigma) ** 2 - np.log(sigma) - _LOG_SQRT_2PI - log_x


def _lognormal_logsf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return log_ndtr((mu - np.log(x)) / sigma)


def _amount_logpdf(
    p: ProcessParams,
    seg: np.ndarray | int,
    event_type: np.ndarray,
    amount: np.ndarray,
    last_channel: np.ndarray | None = None,
) -> np.ndarray:
    """log p(amount | type, segment, last channel) per currency unit, with the point mass at 0."""
    zero = p.zero_prob[event_type]
    positive = amount > 0
    safe = np.where(positive, amount, 1.0)
    with np.errstate(divide="ignore"):
        dens = np.log1p(-zero) + _lognormal_logpdf(
            safe, next_amount_log_median(p, seg, event_type, last_channel),
            p.amount_sigma[event_type],
        )
        return np.where(positive, dens, np.log(zero))


# --------------------------------------------------------------------------------------
# Scoring an event table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """A sorted event table as arrays; gaps and censoring lengths in days."""

    frame: pd.DataFrame  # sorted copy (original index kept)
    t: np.ndarray  # event times, days since epoch
    type_id: np.ndarray
    amount: np.ndarray
    is_first: np.ndarray
    is_last: np.ndarray
    gap: np.ndarray  # gap to the previous event of the customer (clamped), at scored rows
    censored: np.ndarray  # days from each customer's last event to observation end
    channel: np.ndarray | None = None  # channel ids (``CHANNELS``) in a world with channels


def _sorted_events(events: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Check the ``columns`` and sort by (customer_id, timestamp) unless already sorted."""
    missing = [c for c in columns if c not in events]
    if missing:
        raise ValueError(f"event table is missing required columns: {missing}")
    if events.empty:
        raise ValueError("event table is empty")
    frame = events[columns].copy()
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], format="ISO8601")
    cust = frame["customer_id"].to_numpy()
    same = cust[1:] == cust[:-1]
    ts = frame["timestamp"].to_numpy()
    in_order = frame["customer_id"].is_monotonic_increasing and bool(
        np.all(~same | (ts[1:] >= ts[:-1]))
    )
    if in_order:
        return frame
    return frame.sort_values(["customer_id", "timestamp"], kind="mergesort")


def _codes(frame: pd.DataFrame, column: str, values: tuple[str, ...]) -> np.ndarray:
    """Ids of ``column``'s values in ``values``; ValueError naming the others."""
    codes = pd.Categorical(frame[column].astype(str), categories=list(values)).codes
    if (codes < 0).any():
        unknown = sorted(set(frame[column].astype(str)[codes < 0]))
        raise ValueError(f"{column} values not in the vocabulary {list(values)}: {unknown}")
    return codes.astype(np.int64)


def _encode(
    events: pd.DataFrame,
    event_types: tuple[str, ...],
    observation_end: pd.Timestamp | str,
    with_channel: bool = False,
) -> _Table:
    """Validate and encode an event table against a vocabulary of event types (and the
    ``channel`` column against ``CHANNELS``)."""
    columns = ["customer_id", "timestamp", "event_type", "amount"]
    frame = _sorted_events(events, columns + [CHANNEL_COLUMN] * with_channel)
    codes = _codes(frame, "event_type", event_types)
    amount = frame["amount"].to_numpy(dtype=float)
    bad = ~np.isfinite(amount) | (amount < 0)
    if bad.any():
        raise ValueError(f"amounts must be finite and >= 0; first bad rows:\n{frame[bad].head()}")
    t = frame["timestamp"].to_numpy().astype("datetime64[ns]").view(np.int64) / NS_PER_DAY
    end = days_since_epoch(observation_end)
    if t.max() > end:
        raise ValueError(
            f"events after observation_end {observation_end}; first rows:\n{frame[t > end].head()}"
        )
    cust = frame["customer_id"].to_numpy()
    is_first = np.ones(len(t), dtype=bool)
    is_first[1:] = cust[1:] != cust[:-1]
    is_last = np.roll(is_first, -1)
    gap = np.full(len(t), np.nan)
    gap[1:] = np.maximum(np.diff(t), MIN_GAP_DAYS)
    gap[is_first] = np.nan
    return _Table(
        frame=frame,
        t=t,
        type_id=codes,
        amount=amount,
        is_first=is_first,
        is_last=is_last,
        gap=gap,
        censored=end - t[is_last],
        channel=_codes(frame, CHANNEL_COLUMN, CHANNELS) if with_channel else None,
    )


def _last_index(mask: np.ndarray) -> np.ndarray:
    """For each row, the index of the most recent row (inclusive) where ``mask`` is True."""
    return np.maximum.accumulate(np.where(mask, np.arange(len(mask)), 0))


@dataclass(frozen=True)
class _Filtered:
    """Per-segment terms of every event and the segment posterior before it ([S, n] arrays)."""

    table: _Table
    since_salary: np.ndarray  # [n] days since the last salary (or first event), at each event
    log_type: np.ndarray  # [S, n] log p(type_i | h, s); 0 at first events
    log_gap: np.ndarray  # [S, n] log (1 - q_s) f_s(gap_i | h)
    log_amount: np.ndarray  # [S, n] log p(amount_i | type_i, s)
    log_channel: np.ndarray  # [S, n] log p(channel_i | earlier channels, s); 0 without channels
    log_post: np.ndarray  # [S, n] normalised log posterior given the events before i

    def log_post_after(self, rows: np.ndarray) -> np.ndarray:
        """Normalised log posterior [S, len(rows)] given the events up to and including rows."""
        post = self.log_post[:, rows] + self.log_type[:, rows] + self.log_gap[:, rows]
        post += self.log_amount[:, rows] + self.log_channel[:, rows]
        return post - _logsumexp(post, axis=0)

    def last_channel(self, rows: np.ndarray) -> np.ndarray | None:
        """Channel ids at ``rows`` (None in a world without channels)."""
        return None if self.table.channel is None else self.table.channel[rows]


def _channel_log_probs(table: _Table, alpha: np.ndarray) -> np.ndarray:
    """[S, n] log p(channel_i | the customer's earlier channels, s): the Dirichlet-multinomial
    predictive ``(alpha_sc + n_c) / (sum_c alpha_sc + n)`` over the ``n`` earlier events."""
    seen = np.eye(len(CHANNELS))[table.channel]
    before = np.cumsum(seen, axis=0) - seen
    first = _last_index(table.is_first)
    before -= before[first]
    same = before[np.arange(len(table.t)), table.channel]
    earlier = np.arange(len(table.t)) - first
    return np.log(alpha[:, table.channel] + same) - np.log(alpha.sum(axis=1)[:, None] + earlier)


def _filter(table: _Table, p: ProcessParams) -> _Filtered:
    """Forward filtering over segments: every event at once, one segment at a time."""
    n, n_seg = len(table.t), len(SEGMENTS)
    anchor = _last_index(table.is_first | (table.type_id == SALARY_ID))
    since_salary = table.t - table.t[anchor]
    rows = np.flatnonzero(~table.is_first)
    prev = rows - 1
    last_type, last_since, last_time = table.type_id[prev], since_salary[prev], table.t[prev]
    last_channel = None if table.channel is None else table.channel[prev]
    terms = np.zeros((4, n_seg, n))
    for s in range(n_seg):
        logits = next_type_logits(p, s, last_type, last_since, last_channel)
        chosen = logits[table.type_id[rows], np.arange(len(rows))]
        terms[0, s, rows] = chosen - _logsumexp(logits, axis=0)
        mu, sigma = next_gap_params(p, s, last_type, last_since, last_time, last_channel)
        log_f = _lognormal_logpdf(table.gap[rows], mu, sigma)
        terms[1, s, rows] = np.log1p(-p.dormancy[s]) + log_f
        terms[2, s, rows] = _amount_logpdf(
            p, s, table.type_id[rows], table.amount[rows], last_channel
        )
    impossible = ~np.isfinite(terms[2]).any(axis=0)
    if impossible.any():
        bad = table.frame.iloc[np.flatnonzero(impossible)]
        raise ValueError(f"amounts impossible under the process (zero_amount_prob):\n{bad.head()}")
    if table.channel is not None:
        terms[3] = _channel_log_probs(table, p.channel_alpha)
    joint = terms.sum(axis=0)
    joint -= joint.max(axis=0)  # only differences between segments matter
    before = np.cumsum(joint, axis=1) - joint
    log_post = p.log_prior[:, None] + before - before[:, _last_index(table.is_first)]
    log_post -= _logsumexp(log_post, axis=0)
    return _Filtered(table, since_salary, *terms, log_post)


def _censored_log_prob(
    p: ProcessParams, fil: _Filtered, rows: np.ndarray, elapsed: np.ndarray
) -> np.ndarray:
    """log P(no event within ``elapsed`` days after event ``rows`` | history up to them)."""
    t = fil.table
    terms = fil.log_post_after(rows)
    for s in range(len(SEGMENTS)):
        mu, sigma = next_gap_params(
            p, s, t.type_id[rows], fil.since_salary[rows], t.t[rows], fil.last_channel(rows)
        )
        with np.errstate(divide="ignore"):
            log_q = np.log(p.dormancy[s])
        survive = np.log1p(-p.dormancy[s]) + _lognormal_logsf(elapsed, mu, sigma)
        terms[s] += np.logaddexp(log_q, survive)
    return _logsumexp(terms, axis=0)


def _log_frame(table: _Table, scored: dict[str, np.ndarray], censored: np.ndarray) -> pd.DataFrame:
    """Assemble the documented output columns (NaN where a term does not apply)."""
    out = table.frame[["customer_id", "timestamp", "event_type"]].copy()
    rows = ~table.is_first
    for name, values in scored.items():
        column = np.full(len(table.t), np.nan)
        column[rows] = values
        out[name] = column
    column = np.full(len(table.t), np.nan)
    column[table.is_last] = censored
    out["log_p_censored"] = column
    return out


def oracle_log_likelihood(
    events: pd.DataFrame,
    config: SimulatorConfig,
    observation_end: pd.Timestamp | str | None = None,
) -> pd.DataFrame:
    """Exact per-event log-likelihoods of any event table under the process of ``config``.

    Returns one row per event, sorted by (customer_id, timestamp) with the input's index:
    customer_id, timestamp, event_type and ``LOG_COLUMNS``. ``log_p_type``, ``log_p_gap``,
    ``log_p_amount`` and ``log_p_event`` are NaN at each customer's first event (not scored);
    ``log_p_censored`` is set only at each customer's last event. ``observation_end`` defaults
    to ``config.end``. Per-event columns are defined in the module docstring; summarise them
    with ``nll_per_event``. Raises ValueError for tables the process cannot produce (unknown
    event types or channels, a missing ``channel`` column in a world with channels, negative
    amounts, impossible zero / non-zero amounts, events after the end).
    """
    p = process_params(config)
    end = config.end if observation_end is None else observation_end
    fil = _filter(_encode(events, EVENT_TYPES, end, config.categorical_channel), p)
    rows = np.flatnonzero(~fil.table.is_first)
    w = fil.log_post[:, rows]
    w_type = w + fil.log_type[:, rows]
    w_type_amount = w_type + fil.log_amount[:, rows]
    log_return = np.log1p(-p.dormancy)[:, None]  # type and amount terms are given a return
    log_type_return = _logsumexp(w_type + log_return, axis=0)
    scored = {
        "log_p_type": log_type_return - _logsumexp(w + log_return, axis=0),
        "log_p_gap": _logsumexp(w + fil.log_gap[:, rows], axis=0),
        "log_p_amount": _logsumexp(w_type_amount + log_return, axis=0) - log_type_return,
        "log_p_event": _logsumexp(w_type_amount + fil.log_gap[:, rows], axis=0),
    }
    last = np.flatnonzero(fil.table.is_last)
    censored = _censored_log_prob(p, fil, last, fil.table.censored)
    return _log_frame(fil.table, scored, censored)


def nll_per_event(log_likelihoods: pd.DataFrame) -> dict[str, float]:
    """Mean negative log-likelihoods per scored next event from an oracle / baseline frame.

    Keys: type, gap, amount, censored (each summed and divided by the number of scored
    events, i.e. events 2..n of every customer), event (the joint) and total = event +
    censored, the number to compare between models.
    """
    n = int(log_likelihoods["log_p_event"].notna().sum())
    if n == 0:
        raise ValueError("no scored events: every customer has a single event")
    out = {
        key: -float(log_likelihoods[f"log_p_{key}"].sum()) / n
        for key in ("type", "gap", "amount", "event", "censored")
    }
    out["total"] = out["event"] + out["censored"]
    return out


# --------------------------------------------------------------------------------------
# History-free baseline
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormalMixture:
    """A mixture of log-normals; ``mu`` and ``sigma`` are on the log scale."""

    weights: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        """Log density per unit of ``x`` (x > 0)."""
        comp = _lognormal_logpdf(x, self.mu[:, None], self.sigma[:, None])
        return _logsumexp(np.log(self.weights)[:, None] + comp, axis=0)

    def log_sf(self, x: np.ndarray) -> np.ndarray:
        """log P(X > x)."""
        comp = _lognormal_logsf(x, self.mu[:, None], self.sigma[:, None])
        return _logsumexp(np.log(self.weights)[:, None] + comp, axis=0)


def _normal_logpdf(z: np.ndarray) -> np.ndarray:
    return -0.5 * z**2 - _LOG_SQRT_2PI


def _fit_mixture(
    observed: np.ndarray, censored: np.ndarray, n_components: int, n_iter: int
) -> tuple[LogNormalMixture, float]:
    """EM for a log-normal mixture with a never-happens mass from right-censored data.

    ``observed`` are values (> 0); ``censored`` are lower bounds of values that were not
    observed, where the event may never happen (probability ``q``, returned; 0 when there
    are no censored values). Arrays are [component, value].
    """
    y = np.log(observed)
    y_cens = np.log(np.maximum(censored, 1e-9))
    mu = np.quantile(y, (np.arange(n_components) + 0.5) / n_components)[:, None]
    sigma = np.full((n_components, 1), max(y.std() / n_components, 0.05))
    weights = np.full((n_components, 1), 1.0 / n_components)
    q = 0.5 * len(y_cens) / (len(y) + len(y_cens))
    for _ in range(n_iter):
        log_r = np.log(weights / sigma) + _normal_logpdf((y - mu) / sigma)
        r = np.exp(log_r - _logsumexp(log_r, axis=0))
        a = (y_cens - mu) / sigma
        log_sf = log_ndtr(-a)
        with np.errstate(divide="ignore"):
            log_q = np.log(q)
        log_alive = np.log1p(-q) + np.log(weights) + log_sf
        log_denom = np.logaddexp(log_q, _logsumexp(log_alive, axis=0))
        r_cens = np.exp(log_alive - log_denom)
        hazard = np.exp(_normal_logpdf(a) - log_sf)  # E[y | y > c] = mu + sigma * hazard
        mean_c = mu + sigma * hazard
        var_c = sigma**2 * np.maximum(1 + a * hazard - hazard**2, 0.0)
        total = r.sum(axis=1, keepdims=True) + r_cens.sum(axis=1, keepdims=True)
        mu = (r @ y + (r_cens * mean_c).sum(axis=1))[:, None] / total
        second = (r @ y**2 + (r_cens * (var_c + mean_c**2)).sum(axis=1))[:, None] / total
        sigma = np.sqrt(np.maximum(second - mu**2, 0.05**2))
        weights = total / total.sum()
        q = float(np.exp(log_q - log_denom).sum()) / (len(y) + len(y_cens))
    return LogNormalMixture(weights[:, 0], mu[:, 0], sigma[:, 0]), q


@dataclass(frozen=True)
class MarginalBaseline:
    """History-free model: type frequencies, a gap mixture with dormancy, and a
    zero-inflated amount mixture that ignores the type."""

    event_types: tuple[str, ...]
    type_log_probs: np.ndarray  # [K]
    dormancy_prob: float
    gap: LogNormalMixture
    zero_amount_prob: float
    amount: LogNormalMixture

    def log_likelihood(
        self, events: pd.DataFrame, observation_end: pd.Timestamp | str
    ) -> pd.DataFrame:
        """Per-event log-likelihoods with the same rows and columns as the oracle's."""
        table = _encode(events, self.event_types, observation_end)
        rows = ~table.is_first
        amount = table.amount[rows]
        positive = amount > 0
        with np.errstate(divide="ignore"):
            log_zero = np.log(self.zero_amount_prob)
            log_positive = np.log1p(-self.zero_amount_prob)
            log_q = np.log(self.dormancy_prob)
        log_p_amount = np.full(len(amount), log_zero)
        log_p_amount[positive] = log_positive + self.amount.log_pdf(amount[positive])
        scored = {
            "log_p_type": self.type_log_probs[table.type_id[rows]],
            "log_p_gap": np.log1p(-self.dormancy_prob) + self.gap.log_pdf(table.gap[rows]),
            "log_p_amount": log_p_amount,
        }
        scored["log_p_event"] = sum(scored.values())
        censored = np.logaddexp(
            log_q, np.log1p(-self.dormancy_prob) + self.gap.log_sf(table.censored)
        )
        return _log_frame(table, scored, censored)


def _subsample(values: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    return values if fraction >= 1 else values[rng.random(len(values)) < fraction]


def fit_marginal_baseline(
    events: pd.DataFrame,
    observation_end: pd.Timestamp | str,
    n_components: int = 3,
    n_iter: int = 30,
    max_samples: int = 200_000,
) -> MarginalBaseline:
    """Fit the history-free baseline on events 2..n of every customer and the censored last
    gaps: type frequencies (Laplace smoothed), a gap mixture with dormancy and a zero mass
    plus an amount mixture, by a few EM iterations. The mixtures are fitted on a random
    subset of at most ``max_samples`` values each (fixed seed)."""
    types = tuple(sorted(set(events["event_type"].astype(str))))
    table = _encode(events, types, observation_end)
    rows = ~table.is_first
    if not rows.any():
        raise ValueError("cannot fit the baseline: every customer has a single event")
    amount = table.amount[rows]
    if not (amount > 0).any():
        raise ValueError("cannot fit the baseline: no positive amounts")
    rng = np.random.default_rng(0)
    gaps, censored = table.gap[rows], table.censored
    fraction = max_samples / (len(gaps) + len(censored))  # same for both: keeps q unbiased
    gap, q = _fit_mixture(
        _subsample(gaps, fraction, rng), _subsample(censored, fraction, rng), n_components, n_iter
    )
    positive = amount[amount > 0]
    positive = _subsample(positive, max_samples / len(positive), rng)
    amount_mix, _ = _fit_mixture(positive, np.empty(0), n_components + 1, n_iter)
    counts = np.bincount(table.type_id[rows], minlength=len(types)) + 1.0
    return MarginalBaseline(
        event_types=types,
        type_log_probs=np.log(counts / counts.sum()),
        dormancy_prob=q,
        gap=gap,
        zero_amount_prob=float(np.mean(amount == 0)),
        amount=amount_mix,
    )
