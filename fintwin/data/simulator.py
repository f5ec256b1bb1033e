"""A synthetic world of bank customers with a known generating process and its exact oracle.

Generative story (all times in days, amounts in currency units):

1. Each customer draws a latent segment ``s ~ segment_prior`` and a join time uniform in
   ``[start, end)``, independently of each other. The first event is the account opening:
   an ``app_login`` of amount 0 at the join time. It carries no information about the
   segment, so the segment prior is all that is known after it.
2. After every event the customer goes dormant (never acts again) with probability
   ``q_s = dormancy_prob[s]``. Otherwise the next event is drawn as
   ``p(type | h, s) * p(gap | h, s) * p(amount | type, s)``: type and gap are independent
   given the history ``h`` and the segment. Both depend on the last event's type and on the
   days since the last salary (or since joining, before the first salary); the gap also
   depends on whether the last event fell on a weekend.

   - type: softmax of ``type_logits[s] + transition_logits[last_type]`` plus, on salary,
     ``salary_rhythm[s] * sigmoid((days_since_salary - salary_period_days) / salary_window_days)``,
     which gives salaried segments a monthly rhythm.
   - gap: log-normal with ``sigma = gap_sigma[s]`` and log-median
     ``log(gap_median_days[s]) + gap_log_shift[last_type]
     + payday_gap_shift * exp(-days_since_salary / payday_decay_days)
     + weekend_gap_shift * [last event on Saturday or Sunday]``.
   - amount: 0 with probability ``zero_amount_prob[type]`` (1 for ``app_login``), else
     log-normal with median ``amount_median[s][type]`` and ``sigma = amount_sigma[type]``.
3. Events at or after ``end`` are not emitted: each customer's last gap is censored there.

The oracle scores any event table under this process with the segment marginalised by its
posterior (forward filtering). Per event ``i > 1`` of a customer it reports
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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import expit, log_ndtr

from fintwin.data.features import MIN_GAP_DAYS

EVENT_TYPES: tuple[str, ...] = (
    "salary",
    "card_payment",
    "transfer",
    "cash_withdrawal",
    "loan_payment",
    "app_login",
)
SEGMENTS: tuple[str, ...] = ("student", "salaried", "high_net_worth", "small_business")
LOG_COLUMNS: tuple[str, ...] = (
    "log_p_type",
    "log_p_gap",
    "log_p_amount",
    "log_p_event",
    "log_p_censored",
)

_SALARY = EVENT_TYPES.index("salary")
_LOGIN = EVENT_TYPES.index("app_login")
_NS_PER_DAY = 86_400 * 10**9
_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


@dataclass
class SimulatorConfig:
    """Parameters of the synthetic world. Rows follow ``SEGMENTS``, columns ``EVENT_TYPES``.

    ``end`` is the instant observation stops (exclusive). The ``app_login`` column of
    ``amount_median`` is unused (its amount is always 0).
    """

    n_customers: int = 5000
    start: str = "2022-01-01"
    end: str = "2024-01-01"
    seed: int = 0
    segment_prior: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.1, 0.2])
    dormancy_prob: list[float] = field(default_factory=lambda: [0.04, 0.012, 0.01, 0.015])
    type_logits: list[list[float]] = field(
        default_factory=lambda: [
            # salary, card, transfer, cash, loan, login
            [-4.5, 1.2, 0.2, 0.6, -2.5, 0.3],  # student
            [-6.0, 1.0, 0.0, 0.0, -1.0, -0.7],  # salaried
            [-6.0, 0.6, 1.2, -1.0, 0.0, -0.4],  # high_net_worth
            [-4.0, 0.8, 1.5, 0.3, 0.3, -1.5],  # small_business
        ]
    )
    transition_logits: list[list[float]] = field(
        default_factory=lambda: [
            # next: salary, card, transfer, cash, loan, login      (rows: last type)
            [0.0, 0.0, 0.8, 0.3, 2.0, 0.5],  # salary
            [0.0, 1.2, -0.3, 0.0, 0.0, -0.3],  # card_payment
            [0.0, -0.3, 0.6, 0.0, 0.0, 0.8],  # transfer
            [0.0, -0.3, 0.0, -1.5, 0.0, 0.0],  # cash_withdrawal
            [0.0, 0.0, 0.0, 0.0, -2.0, 1.0],  # loan_payment
            [0.0, 0.3, 1.2, 0.0, 0.0, -1.0],  # app_login
        ]
    )
    salary_rhythm: list[float] = field(default_factory=lambda: [3.0, 9.0, 9.0, 4.0])
    salary_period_days: float = 25.0
    salary_window_days: float = 1.0
    gap_median_days: list[float] = field(default_factory=lambda: [3.0, 1.6, 1.0, 0.5])
    gap_sigma: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 1.1])
    gap_log_shift: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.3, 0.6, 0.3, -0.7])
    payday_gap_shift: float = -0.8
    payday_decay_days: float = 4.0
    weekend_gap_shift: float = 0.4
    amount_median: list[list[float]] = field(
        default_factory=lambda: [
            [600.0, 20.0, 40.0, 40.0, 150.0, 1.0],  # student
            [2800.0, 45.0, 150.0, 80.0, 600.0, 1.0],  # salaried
            [12000.0, 150.0, 1500.0, 300.0, 2500.0, 1.0],  # high_net_worth
            [4000.0, 80.0, 600.0, 150.0, 1200.0, 1.0],  # small_business
        ]
    )
    amount_sigma: list[float] = field(default_factory=lambda: [0.3, 1.2, 1.4, 0.8, 0.35, 1.0])
    zero_amount_prob: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.01, 0.0, 0.0, 1.0])


@dataclass(frozen=True)
class _Params:
    """The configuration as validated numpy arrays (times in days since the Unix epoch)."""

    start: float
    end: float
    log_prior: np.ndarray  # [S]
    dormancy: np.ndarray  # [S]
    type_logits: np.ndarray  # [K, S]
    transition_logits: np.ndarray  # [K next, K last]
    salary_rhythm: np.ndarray  # [S]
    salary_period: float
    salary_window: float
    gap_log_median: np.ndarray  # [S]
    gap_sigma: np.ndarray  # [S]
    gap_log_shift: np.ndarray  # [K]
    payday_shift: float
    payday_decay: float
    weekend_shift: float
    amount_log_median: np.ndarray  # [S, K]
    amount_sigma: np.ndarray  # [K]
    zero_prob: np.ndarray  # [K]


def _array(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    """Convert a (nested) list, also an OmegaConf one, to a float array of ``shape``."""
    out = np.asarray(value, dtype=float)
    if out.shape != shape:
        raise ValueError(f"SimulatorConfig.{name} must have shape {shape}, got {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"SimulatorConfig.{name} must be finite")
    return out


def _days(ts: pd.Timestamp | str) -> float:
    """Days since the Unix epoch of a timestamp."""
    return pd.Timestamp(ts).value / _NS_PER_DAY


def _params(config: SimulatorConfig) -> _Params:
    """Validate ``config`` and return it as arrays."""
    n_seg, n_types = len(SEGMENTS), len(EVENT_TYPES)
    start, end = _days(config.start), _days(config.end)
    if not end > start:
        raise ValueError(f"SimulatorConfig.end ({config.end}) must be after start ({config.start})")
    if config.n_customers < 1:
        raise ValueError(f"SimulatorConfig.n_customers must be >= 1, got {config.n_customers}")
    prior = _array("segment_prior", config.segment_prior, (n_seg,))
    if (prior < 0).any() or not np.isclose(prior.sum(), 1.0):
        raise ValueError("SimulatorConfig.segment_prior must be non-negative and sum to 1")
    dormancy = _array("dormancy_prob", config.dormancy_prob, (n_seg,))
    zero_prob = _array("zero_amount_prob", config.zero_amount_prob, (n_types,))
    for name, probs in (("dormancy_prob", dormancy), ("zero_amount_prob", zero_prob)):
        if ((probs < 0) | (probs > 1)).any():
            raise ValueError(f"SimulatorConfig.{name} must lie in [0, 1]")
    if dormancy.max() >= 1:
        raise ValueError("SimulatorConfig.dormancy_prob must be < 1")
    if zero_prob[_LOGIN] != 1.0:
        raise ValueError("SimulatorConfig.zero_amount_prob for app_login must be 1")
    positive = {
        "gap_median_days": _array("gap_median_days", config.gap_median_days, (n_seg,)),
        "gap_sigma": _array("gap_sigma", config.gap_sigma, (n_seg,)),
        "amount_median": _array("amount_median", config.amount_median, (n_seg, n_types)),
        "amount_sigma": _array("amount_sigma", config.amount_sigma, (n_types,)),
        "salary_window_days": np.asarray(config.salary_window_days, dtype=float),
        "payday_decay_days": np.asarray(config.payday_decay_days, dtype=float),
    }
    for name, value in positive.items():
        if not (value > 0).all():
            raise ValueError(f"SimulatorConfig.{name} must be > 0")
    with np.errstate(divide="ignore"):
        log_prior = np.log(prior)
    return _Params(
        start=start,
        end=end,
        log_prior=log_prior,
        dormancy=dormancy,
        type_logits=_array("type_logits", config.type_logits, (n_seg, n_types)).T.copy(),
        transition_logits=_array(
            "transition_logits", config.transition_logits, (n_types, n_types)
        ).T.copy(),
        salary_rhythm=_array("salary_rhythm", config.salary_rhythm, (n_seg,)),
        salary_period=float(config.salary_period_days),
        salary_window=float(config.salary_window_days),
        gap_log_median=np.log(positive["gap_median_days"]),
        gap_sigma=positive["gap_sigma"],
        gap_log_shift=_array("gap_log_shift", config.gap_log_shift, (n_types,)),
        payday_shift=float(config.payday_gap_shift),
        payday_decay=float(config.payday_decay_days),
        weekend_shift=float(config.weekend_gap_shift),
        amount_log_median=np.log(positive["amount_median"]),
        amount_sigma=positive["amount_sigma"],
        zero_prob=zero_prob,
    )


# --------------------------------------------------------------------------------------
# The process: one function per factor, shared by the sampler and the oracle. ``seg`` is a
# per-row int array (sampling) or one segment id broadcast over all rows (oracle).
# --------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(x))) along ``axis`` (rows of all -inf give -inf)."""
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - peak), axis=axis)) + np.squeeze(peak, axis=axis)


def _weekday(t: np.ndarray) -> np.ndarray:
    """Day of week (Monday = 0) of times in days since the epoch (a Thursday)."""
    return (np.floor(t).astype(np.int64) + 3) % 7


def _type_logits(
    p: _Params, seg: np.ndarray | int, last_type: np.ndarray, since_salary: np.ndarray
) -> np.ndarray:
    """Unnormalised log-probabilities [K, n] of the next event's type."""
    base = p.type_logits[:, seg].reshape(len(EVENT_TYPES), -1)
    logits = base + p.transition_logits[:, last_type]
    rhythm = expit((since_salary - p.salary_period) / p.salary_window)
    logits[_SALARY] += p.salary_rhythm[seg] * rhythm
    return logits


def _gap_params(
    p: _Params,
    seg: np.ndarray | int,
    last_type: np.ndarray,
    since_salary: np.ndarray,
    last_time: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal (mu, sigma) of the next gap in days, each [n]."""
    mu = (
        p.gap_log_median[seg]
        + p.gap_log_shift[last_type]
        + p.payday_shift * np.exp(-since_salary / p.payday_decay)
        + p.weekend_shift * (_weekday(last_time) >= 5)
    )
    return mu, np.broadcast_to(p.gap_sigma[seg], mu.shape)


def _lognormal_logpdf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    log_x = np.log(x)
    return -0.5 * ((log_x - mu) / sigma) ** 2 - np.log(sigma) - _LOG_SQRT_2PI - log_x


def _lognormal_logsf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return log_ndtr((mu - np.log(x)) / sigma)


def _amount_logpdf(
    p: _Params, seg: np.ndarray | int, event_type: np.ndarray, amount: np.ndarray
) -> np.ndarray:
    """log p(amount | type, segment) per currency unit, with the point mass at 0."""
    zero = p.zero_prob[event_type]
    positive = amount > 0
    safe = np.where(positive, amount, 1.0)
    with np.errstate(divide="ignore"):
        dens = np.log1p(-zero) + _lognormal_logpdf(
            safe, p.amount_log_median[seg, event_type], p.amount_sigma[event_type]
        )
        return np.where(positive, dens, np.log(zero))


@dataclass(frozen=True)
class _Draw:
    """One sampled step per row: dormancy, then the would-be next event."""

    dormant: np.ndarray
    gap: np.ndarray
    event_type: np.ndarray
    amount: np.ndarray


def _draw_next(
    p: _Params,
    seg: np.ndarray,
    last_type: np.ndarray,
    since_salary: np.ndarray,
    last_time: np.ndarray,
    rng: np.random.Generator,
) -> _Draw:
    """Sample dormancy, then the next (type, gap, amount) for every row."""
    n = seg.shape[0]
    u = rng.random((3, n))
    z = rng.standard_normal((2, n))
    logits = _type_logits(p, seg, last_type, since_salary)
    cdf = np.cumsum(np.exp(logits - logits.max(axis=0)), axis=0)
    event_type = (u[1] * cdf[-1] > cdf[:-1]).sum(axis=0)
    mu, sigma = _gap_params(p, seg, last_type, since_salary, last_time)
    amount_mu = p.amount_log_median[seg, event_type]
    amount = np.exp(amount_mu + p.amount_sigma[event_type] * z[1])
    return _Draw(
        dormant=u[0] < p.dormancy[seg],
        gap=np.exp(mu + sigma * z[0]),
        event_type=event_type,
        amount=np.where(u[2] < p.zero_prob[event_type], 0.0, amount),
    )


# --------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for the customers (segment, join) and for their events."""
    customers, events = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(customers), np.random.default_rng(events)


def _draw_customers(p: _Params, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and join times (days since epoch) of ``n`` customers."""
    cdf = np.cumsum(np.exp(p.log_prior))
    seg = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n), side="right"), len(cdf) - 1)
    join = p.start + (p.end - p.start) * rng.random(n)
    return seg, join


def _customer_ids(n: int) -> np.ndarray:
    width = len(str(n - 1))
    return np.array([f"C{i:0{width}d}" for i in range(n)], dtype=object)


def customer_segments(config: SimulatorConfig) -> pd.Series:
    """True segment name of every simulated customer, indexed by customer_id."""
    p = _params(config)
    seg, _ = _draw_customers(p, config.n_customers, _rngs(config.seed)[0])
    names = np.array(SEGMENTS, dtype=object)[seg]
    return pd.Series(
        names, index=pd.Index(_customer_ids(config.n_customers), name="customer_id"), name="segment"
    )


def simulate(config: SimulatorConfig) -> pd.DataFrame:
    """Simulate the world: the event table (customer_id, timestamp, event_type, amount).

    Sorted by customer then time; deterministic given ``config.seed``. All active customers
    advance one event per step, so the cost is a few numpy calls per step.
    """
    p = _params(config)
    customer_rng, rng = _rngs(config.seed)
    seg, join = _draw_customers(p, config.n_customers, customer_rng)
    cust = np.arange(config.n_customers)
    t, anchor = join, join
    last = np.full(cust.shape, _LOGIN)
    chunks = [(cust, t, last, np.zeros(cust.shape))]
    while cust.size:
        draw = _draw_next(p, seg, last, t - anchor, t, rng)
        t_next = t + draw.gap
        keep = ~draw.dormant & (t_next < p.end)
        cust, seg, anchor = cust[keep], seg[keep], anchor[keep]
        t, last = t_next[keep], draw.event_type[keep]
        anchor = np.where(last == _SALARY, t, anchor)
        chunks.append((cust, t, last, draw.amount[keep]))
    cust, t, types, amount = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
    order = np.argsort(cust, kind="stable")  # each customer's events were emitted in time order
    ns = np.round(t[order] * _NS_PER_DAY).astype(np.int64)
    return pd.DataFrame(
        {
            "customer_id": _customer_ids(config.n_customers)[cust[order]],
            "timestamp": ns.view("datetime64[ns]"),
            "event_type": np.array(EVENT_TYPES, dtype=object)[types[order]],
            "amount": amount[order],
        }
    )


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


def _sorted_events(events: pd.DataFrame) -> pd.DataFrame:
    """Check required columns and sort by (customer_id, timestamp) unless already sorted."""
    missing = [c for c in ("customer_id", "timestamp", "event_type", "amount") if c not in events]
    if missing:
        raise ValueError(f"event table is missing required columns: {missing}")
    if events.empty:
        raise ValueError("event table is empty")
    frame = events[["customer_id", "timestamp", "event_type", "amount"]].copy()
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


def _encode(
    events: pd.DataFrame, event_types: tuple[str, ...], observation_end: pd.Timestamp | str
) -> _Table:
    """Validate and encode an event table against a vocabulary of event types."""
    frame = _sorted_events(events)
    codes = pd.Categorical(frame["event_type"].astype(str), categories=list(event_types)).codes
    if (codes < 0).any():
        unknown = sorted(set(frame["event_type"].astype(str)[codes < 0]))
        raise ValueError(f"event types not in the vocabulary {list(event_types)}: {unknown}")
    amount = frame["amount"].to_numpy(dtype=float)
    bad = ~np.isfinite(amount) | (amount < 0)
    if bad.any():
        raise ValueError(f"amounts must be finite and >= 0; first bad rows:\n{frame[bad].head()}")
    t = frame["timestamp"].to_numpy().astype("datetime64[ns]").view(np.int64) / _NS_PER_DAY
    end = _days(observation_end)
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
        type_id=codes.astype(np.int64),
        amount=amount,
        is_first=is_first,
        is_last=is_last,
        gap=gap,
        censored=end - t[is_last],
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
    log_post: np.ndarray  # [S, n] normalised log posterior given the events before i

    def log_post_after(self, rows: np.ndarray) -> np.ndarray:
        """Normalised log posterior [S, len(rows)] given the events up to and including rows."""
        post = self.log_post[:, rows] + self.log_type[:, rows] + self.log_gap[:, rows]
        post += self.log_amount[:, rows]
        return post - _logsumexp(post, axis=0)


def _filter(table: _Table, p: _Params) -> _Filtered:
    """Forward filtering over segments: every event at once, one segment at a time."""
    n, n_seg = len(table.t), len(SEGMENTS)
    anchor = _last_index(table.is_first | (table.type_id == _SALARY))
    since_salary = table.t - table.t[anchor]
    rows = np.flatnonzero(~table.is_first)
    prev = rows - 1
    last_type, last_since, last_time = table.type_id[prev], since_salary[prev], table.t[prev]
    terms = np.zeros((3, n_seg, n))
    for s in range(n_seg):
        logits = _type_logits(p, s, last_type, last_since)
        chosen = logits[table.type_id[rows], np.arange(len(rows))]
        terms[0, s, rows] = chosen - _logsumexp(logits, axis=0)
        mu, sigma = _gap_params(p, s, last_type, last_since, last_time)
        log_f = _lognormal_logpdf(table.gap[rows], mu, sigma)
        terms[1, s, rows] = np.log1p(-p.dormancy[s]) + log_f
        terms[2, s, rows] = _amount_logpdf(p, s, table.type_id[rows], table.amount[rows])
    impossible = ~np.isfinite(terms[2]).any(axis=0)
    if impossible.any():
        bad = table.frame.iloc[np.flatnonzero(impossible)]
        raise ValueError(f"amounts impossible under the process (zero_amount_prob):\n{bad.head()}")
    joint = terms.sum(axis=0)
    joint -= joint.max(axis=0)  # only differences between segments matter
    before = np.cumsum(joint, axis=1) - joint
    log_post = p.log_prior[:, None] + before - before[:, _last_index(table.is_first)]
    log_post -= _logsumexp(log_post, axis=0)
    return _Filtered(table, since_salary, terms[0], terms[1], terms[2], log_post)


def _censored_log_prob(
    p: _Params, fil: _Filtered, rows: np.ndarray, elapsed: np.ndarray
) -> np.ndarray:
    """log P(no event within ``elapsed`` days after event ``rows`` | history up to them)."""
    t = fil.table
    terms = fil.log_post_after(rows)
    for s in range(len(SEGMENTS)):
        mu, sigma = _gap_params(p, s, t.type_id[rows], fil.since_salary[rows], t.t[rows])
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
    event types, negative amounts, impossible zero / non-zero amounts, events after the end).
    """
    p = _params(config)
    end = config.end if observation_end is None else observation_end
    fil = _filter(_encode(events, EVENT_TYPES, end), p)
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
# The true next-event distribution
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NextEventDistribution:
    """True distribution of each customer's next event right after their last event.

    Arrays are per customer (C), segment (S, order ``SEGMENTS``) and type (K, order
    ``EVENT_TYPES``). The posterior conditions on the events only, not on the quiet time
    after the last one. Gaps are log-normal in days given the segment and a return.
    """

    customer_id: np.ndarray  # [C]
    last_timestamp: np.ndarray  # [C] datetime64[ns]
    last_type: np.ndarray  # [C] type id of the last event
    since_salary_days: np.ndarray  # [C] days from the last salary (or first event) to the last
    segment_posterior: np.ndarray  # [C, S]
    type_probs_by_segment: np.ndarray  # [C, S, K]
    dormant_prob_by_segment: np.ndarray  # [C, S]
    gap_mu: np.ndarray  # [C, S] log-normal location, log days
    gap_sigma: np.ndarray  # [C, S]
    amount_zero_prob: np.ndarray  # [C, S, K]
    amount_mu: np.ndarray  # [C, S, K] log-normal location of a non-zero amount
    amount_sigma: np.ndarray  # [C, S, K]

    def _return_posterior(self) -> np.ndarray:
        """Segment posterior given that the customer returns [C, S]."""
        w = self.segment_posterior * (1 - self.dormant_prob_by_segment)
        return w / w.sum(axis=1, keepdims=True)

    def type_probs(self) -> np.ndarray:
        """P(next type = k | history, return) [C, K]."""
        return np.einsum("cs,csk->ck", self._return_posterior(), self.type_probs_by_segment)

    def dormant_prob(self) -> np.ndarray:
        """P(never returns | history) [C]."""
        return np.sum(self.segment_posterior * self.dormant_prob_by_segment, axis=1)

    def gap_log_density(self, gap_days: np.ndarray | float) -> np.ndarray:
        """log of the density of returning after ``gap_days`` (includes 1 - dormancy) [C]."""
        gap = np.broadcast_to(np.asarray(gap_days, dtype=float), self.customer_id.shape)
        log_f = _lognormal_logpdf(gap[:, None], self.gap_mu, self.gap_sigma)
        log_f = log_f + np.log1p(-self.dormant_prob_by_segment)
        with np.errstate(divide="ignore"):
            return _logsumexp(np.log(self.segment_posterior) + log_f, axis=1)

    def survival(self, days: np.ndarray | float) -> np.ndarray:
        """P(no event within ``days`` after the last event), dormancy included [C]."""
        elapsed = np.broadcast_to(np.asarray(days, dtype=float), self.customer_id.shape)
        surv = np.exp(_lognormal_logsf(elapsed[:, None], self.gap_mu, self.gap_sigma))
        q = self.dormant_prob_by_segment
        return np.sum(self.segment_posterior * (q + (1 - q) * surv), axis=1)

    def amount_mean(self) -> np.ndarray:
        """Expected amount of the next event, marginal over its type, given a return [C]."""
        mean = (1 - self.amount_zero_prob) * np.exp(self.amount_mu + 0.5 * self.amount_sigma**2)
        w = self._return_posterior()
        return np.einsum("cs,csk,csk->c", w, self.type_probs_by_segment, mean)


def next_event_distribution(
    history: pd.DataFrame, config: SimulatorConfig
) -> NextEventDistribution:
    """The true next-event distribution after each customer's last event in ``history``."""
    p = _params(config)
    table = _encode(history, EVENT_TYPES, pd.Timestamp.max)
    fil = _filter(table, p)
    last = np.flatnonzero(table.is_last)
    n_seg, n_types = len(SEGMENTS), len(EVENT_TYPES)
    type_probs = np.empty((len(last), n_seg, n_types))
    gap_mu = np.empty((len(last), n_seg))
    for s in range(n_seg):
        logits = _type_logits(p, s, table.type_id[last], fil.since_salary[last])
        type_probs[:, s] = np.exp(logits - _logsumexp(logits, axis=0)).T
        gap_mu[:, s], _ = _gap_params(
            p, s, table.type_id[last], fil.since_salary[last], table.t[last]
        )
    per_customer = (len(last), n_seg, n_types)
    return NextEventDistribution(
        customer_id=table.frame["customer_id"].to_numpy()[last],
        last_timestamp=table.frame["timestamp"].to_numpy()[last],
        last_type=table.type_id[last],
        since_salary_days=fil.since_salary[last],
        segment_posterior=np.exp(fil.log_post_after(last)).T,
        type_probs_by_segment=type_probs,
        dormant_prob_by_segment=np.broadcast_to(p.dormancy, gap_mu.shape),
        gap_mu=gap_mu,
        gap_sigma=np.broadcast_to(p.gap_sigma, gap_mu.shape),
        amount_zero_prob=np.broadcast_to(p.zero_prob, per_customer),
        amount_mu=np.broadcast_to(p.amount_log_median, per_customer),
        amount_sigma=np.broadcast_to(p.amount_sigma, per_customer),
    )


def sample_next_event(
    history: pd.DataFrame, config: SimulatorConfig, n_samples: int, seed: int = 0
) -> pd.DataFrame:
    """Draw the next event of each customer ``n_samples`` times from the true process.

    The segment is drawn from its posterior, then the simulator's own step is applied.
    Columns: customer_id, sample, dormant, gap_days, event_type, amount (the last three are
    NaN / None where the draw is dormant).
    """
    p = _params(config)
    dist = next_event_distribution(history, config)
    rng = np.random.default_rng(seed)
    n = len(dist.customer_id)
    rep = np.repeat(np.arange(n), n_samples)
    cdf = np.cumsum(dist.segment_posterior[rep], axis=1)
    seg = (rng.random(len(rep))[:, None] * cdf[:, -1:] > cdf[:, :-1]).sum(axis=1)
    last_time = dist.last_timestamp.astype("datetime64[ns]").view(np.int64) / _NS_PER_DAY
    draw = _draw_next(p, seg, dist.last_type[rep], dist.since_salary_days[rep], last_time[rep], rng)
    event_type = np.array(EVENT_TYPES, dtype=object)[draw.event_type]
    event_type[draw.dormant] = None
    return pd.DataFrame(
        {
            "customer_id": dist.customer_id[rep],
            "sample": np.tile(np.arange(n_samples), n),
            "dormant": draw.dormant,
            "gap_days": np.where(draw.dormant, np.nan, draw.gap),
            "event_type": event_type,
            "amount": np.where(draw.dormant, np.nan, draw.amount),
        }
    )


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
