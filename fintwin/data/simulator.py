"""A synthetic world of bank customers with a known generating process.

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
4. With ``categorical_channel``, every event also has a ``channel`` (``CHANNELS``: card,
   online, branch), an observed input rather than a predicted target. Each customer draws
   channel propensities ``theta ~ Dirichlet(channel_concentration * channel_probs[s])`` and
   every event's channel ``~ theta``. The channel of the last event shifts the next event:
   ``channel_type_logits[channel]`` adds to the type logits, ``channel_gap_shift[channel]``
   to the gap's log-median and ``channel_amount_shift[channel]`` to the amount's. Channels
   are drawn from a random stream of their own: with every channel effect 0 the other
   columns are those of the world without channels. With the flag off (the default) no
   channel is drawn and the world is unchanged.
5. Labelled anomalies (``anomaly_rate`` > 0): into each gap between two of a customer's
   events, with probability ``anomaly_rate``, one foreign event is inserted at a uniform
   time inside the gap, drawn from the behaviour of another segment (uniform among the
   others): type ~ softmax(``type_logits[other]``), amount as that segment's for the type
   (a stolen card, a shared account, a life change). The customer's own process ignores it
   (its next event was drawn from its own history), and the table gains a boolean
   ``anomaly`` column (``ANOMALY_COLUMN``) that no model reads: the event contract keeps
   only the required and declared columns. Anomalies come from a random stream of their own,
   so the customers' own events are those of the world without anomalies.

``simulate_world`` also returns the truth per customer: the segment and the dormancy onset
(the time of the event after which the customer went dormant; NaT when the customer was
still active when observation stopped).

Events are scored under this process by the oracle in ``fintwin.data.oracle``, which
uses the same factor functions (``next_type_logits``, ``next_gap_params``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import expit

from fintwin.data.features import NS_PER_DAY

EVENT_TYPES: tuple[str, ...] = (
    "salary",
    "card_payment",
    "transfer",
    "cash_withdrawal",
    "loan_payment",
    "app_login",
)
SEGMENTS: tuple[str, ...] = ("student", "salaried", "high_net_worth", "small_business")
SALARY_ID = EVENT_TYPES.index("salary")
_LOGIN = EVENT_TYPES.index("app_login")
CHANNELS: tuple[str, ...] = ("card", "online", "branch")
CHANNEL_COLUMN = "channel"
ANOMALY_COLUMN = "anomaly"


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
    categorical_channel: bool = False  # emit a `channel` column (step 4 of the module doc)
    channel_probs: list[list[float]] = field(
        default_factory=lambda: [
            # card, online, branch: a segment's mean propensities
            [0.55, 0.4, 0.05],  # student
            [0.45, 0.35, 0.2],  # salaried
            [0.2, 0.5, 0.3],  # high_net_worth
            [0.25, 0.3, 0.45],  # small_business
        ]
    )
    channel_concentration: float = 3.0  # customers' propensities spread around the segment's
    channel_type_logits: list[list[float]] = field(
        default_factory=lambda: [
            # next: salary, card, transfer, cash, loan, login      (rows: last channel)
            [0.0, 1.0, -0.5, 0.0, 0.0, -0.5],  # card
            [0.0, -0.8, 1.0, -1.0, 0.3, 1.0],  # online
            [0.0, -1.0, 0.3, 1.5, 1.2, -1.0],  # branch
        ]
    )
    channel_gap_shift: list[float] = field(default_factory=lambda: [0.0, -0.5, 0.6])
    channel_amount_shift: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.8])
    anomaly_rate: float = 0.0  # foreign events per gap between events (step 5 of the module doc)


@dataclass(frozen=True)
class ProcessParams:
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
    channel_alpha: np.ndarray | None = None  # [S, C] Dirichlet parameters; None: no channel
    channel_type_logits: np.ndarray | None = None  # [K next, C last]
    channel_gap_shift: np.ndarray | None = None  # [C]
    channel_amount_shift: np.ndarray | None = None  # [C]


def _array(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    """Convert a (nested) list, also an OmegaConf one, to a float array of ``shape``."""
    out = np.asarray(value, dtype=float)
    if out.shape != shape:
        raise ValueError(f"SimulatorConfig.{name} must have shape {shape}, got {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"SimulatorConfig.{name} must be finite")
    return out


def days_since_epoch(ts: pd.Timestamp | str) -> float:
    """Days since the Unix epoch of a timestamp."""
    return pd.Timestamp(ts).value / NS_PER_DAY


def process_params(config: SimulatorConfig) -> ProcessParams:
    """Validate ``config`` and return it as arrays."""
    n_seg, n_types = len(SEGMENTS), len(EVENT_TYPES)
    start, end = days_since_epoch(config.start), days_since_epoch(config.end)
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
    if not 0.0 <= config.anomaly_rate <= 1.0:
        raise ValueError(
            f"SimulatorConfig.anomaly_rate must lie in [0, 1], got {config.anomaly_rate}"
        )
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
    params = ProcessParams(
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
    return _with_channel(params, config) if config.categorical_channel else params


def _with_channel(params: ProcessParams, config: SimulatorConfig) -> ProcessParams:
    """``params`` with the channel's parameters, validated."""
    n_seg, n_types, n_channels = len(SEGMENTS), len(EVENT_TYPES), len(CHANNELS)
    probs = _array("channel_probs", config.channel_probs, (n_seg, n_channels))
    if (probs <= 0).any() or not np.allclose(probs.sum(axis=1), 1.0):
        raise ValueError("SimulatorConfig.channel_probs must be positive and each row sum to 1")
    if not config.channel_concentration > 0:
        raise ValueError("SimulatorConfig.channel_concentration must be > 0")
    type_logits = _array("channel_type_logits", config.channel_type_logits, (n_channels, n_types))
    return dataclasses.replace(
        params,
        channel_alpha=config.channel_concentration * probs,
        channel_type_logits=type_logits.T.copy(),
        channel_gap_shift=_array("channel_gap_shift", config.channel_gap_shift, (n_channels,)),
        channel_amount_shift=_array(
            "channel_amount_shift", config.channel_amount_shift, (n_channels,)
        ),
    )


# --------------------------------------------------------------------------------------
# The process: one function per factor, shared by the sampler and the oracle. ``seg`` is a
# per-row int array (sampling) or one segment id broadcast over all rows (oracle).
# ``last_channel`` (channel ids of the last events) is None in a world without channels.
# --------------------------------------------------------------------------------------


def _weekday(t: np.ndarray) -> np.ndarray:
    """Day of week (Monday = 0) of times in days since the epoch (a Thursday)."""
    return (np.floor(t).astype(np.int64) + 3) % 7


def next_type_logits(
    p: ProcessParams,
    seg: np.ndarray | int,
    last_type: np.ndarray,
    since_salary: np.ndarray,
    last_channel: np.ndarray | None = None,
) -> np.ndarray:
    """Unnormalised log-probabilities [K, n] of the next event's type."""
    base = p.type_logits[:, seg].reshape(len(EVENT_TYPES), -1)
    logits = base + p.transition_logits[:, last_type]
    if last_channel is not None:
        logits += p.channel_type_logits[:, last_channel]
    rhythm = expit((since_salary - p.salary_period) / p.salary_window)
    logits[SALARY_ID] += p.salary_rhythm[seg] * rhythm
    return logits


def next_gap_params(
    p: ProcessParams,
    seg: np.ndarray | int,
    last_type: np.ndarray,
    since_salary: np.ndarray,
    last_time: np.ndarray,
    last_channel: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal (mu, sigma) of the next gap in days, each [n]."""
    mu = (
        p.gap_log_median[seg]
        + p.gap_log_shift[last_type]
        + p.payday_shift * np.exp(-since_salary / p.payday_decay)
        + p.weekend_shift * (_weekday(last_time) >= 5)
    )
    if last_channel is not None:
        mu = mu + p.channel_gap_shift[last_channel]
    return mu, np.broadcast_to(p.gap_sigma[seg], mu.shape)


def next_amount_log_median(
    p: ProcessParams,
    seg: np.ndarray | int,
    event_type: np.ndarray,
    last_channel: np.ndarray | None = None,
) -> np.ndarray:
    """Log-median [n] of the next event's non-zero amount, given its type."""
    mu = p.amount_log_median[seg, event_type]
    return mu if last_channel is None else mu + p.channel_amount_shift[last_channel]


@dataclass(frozen=True)
class _Draw:
    """One sampled step per row: dormancy, then the would-be next event."""

    dormant: np.ndarray
    gap: np.ndarray
    event_type: np.ndarray
    amount: np.ndarray


def _draw_next(
    p: ProcessParams,
    seg: np.ndarray,
    last_type: np.ndarray,
    since_salary: np.ndarray,
    last_time: np.ndarray,
    rng: np.random.Generator,
    last_channel: np.ndarray | None = None,
) -> _Draw:
    """Sample dormancy, then the next (type, gap, amount) for every row."""
    n = seg.shape[0]
    u = rng.random((3, n))
    z = rng.standard_normal((2, n))
    logits = next_type_logits(p, seg, last_type, since_salary, last_channel)
    cdf = np.cumsum(np.exp(logits - logits.max(axis=0)), axis=0)
    event_type = (u[1] * cdf[-1] > cdf[:-1]).sum(axis=0)
    mu, sigma = next_gap_params(p, seg, last_type, since_salary, last_time, last_channel)
    amount_mu = next_amount_log_median(p, seg, event_type, last_channel)
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


def _rngs(seed: int) -> tuple[np.random.Generator, ...]:
    """Independent streams for the customers (segment, join), their events, their channels
    and the anomalies (spawned children do not depend on how many are spawned)."""
    return tuple(np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(4))


class _Channels:
    """Each customer's channel propensities and the channel of each of their events."""

    def __init__(self, p: ProcessParams, seg: np.ndarray, rng: np.random.Generator) -> None:
        self.rng = rng
        # a Dirichlet(alpha) draw per customer: normalised Gamma(alpha_k) draws
        gamma = rng.standard_gamma(p.channel_alpha[seg])
        self.cdf = np.cumsum(gamma / gamma.sum(axis=1, keepdims=True), axis=1)

    def draw(self, cust: np.ndarray) -> np.ndarray:
        """One channel id per row of ``cust`` (customer indices)."""
        u = self.rng.random(len(cust))[:, None]
        return np.minimum((u > self.cdf[cust]).sum(axis=1), len(CHANNELS) - 1)


def _draw_customers(
    p: ProcessParams, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
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
    p = process_params(config)
    seg, _ = _draw_customers(p, config.n_customers, _rngs(config.seed)[0])
    names = np.array(SEGMENTS, dtype=object)[seg]
    return pd.Series(
        names, index=pd.Index(_customer_ids(config.n_customers), name="customer_id"), name="segment"
    )


@dataclass(frozen=True)
class SimulatedWorld:
    """The event table and the truth per customer (``segment``, ``dormant_onset``: the time
    of the customer's last event when it went dormant after it, NaT when still active at
    ``end``), indexed by customer_id."""

    events: pd.DataFrame
    customers: pd.DataFrame


def simulate(config: SimulatorConfig) -> pd.DataFrame:
    """Simulate the world: the event table (customer_id, timestamp, event_type, amount,
    ``channel`` with ``config.categorical_channel``, ``anomaly`` with ``anomaly_rate`` > 0).

    Sorted by customer then time; deterministic given ``config.seed``. All active customers
    advance one event per step, so the cost is a few numpy calls per step.
    """
    return simulate_world(config).events


def simulate_world(config: SimulatorConfig) -> SimulatedWorld:
    """``simulate``'s events with the truth per customer (``SimulatedWorld``)."""
    p = process_params(config)
    customer_rng, rng, channel_rng, anomaly_rng = _rngs(config.seed)
    seg, join = _draw_customers(p, config.n_customers, customer_rng)
    all_seg = seg
    channels = _Channels(p, seg, channel_rng) if config.categorical_channel else None
    cust = np.arange(config.n_customers)
    t, anchor = join, join
    onset = np.full(config.n_customers, np.nan)
    last = np.full(cust.shape, _LOGIN)
    channel = None if channels is None else channels.draw(cust)
    chunks = [(cust, t, last, np.zeros(cust.shape), channel)]
    while cust.size:
        draw = _draw_next(p, seg, last, t - anchor, t, rng, channel)
        onset[cust[draw.dormant]] = t[draw.dormant]
        t_next = t + draw.gap
        keep = ~draw.dormant & (t_next < p.end)
        cust, seg, anchor = cust[keep], seg[keep], anchor[keep]
        t, last = t_next[keep], draw.event_type[keep]
        anchor = np.where(last == SALARY_ID, t, anchor)
        channel = None if channels is None else channels.draw(cust)
        chunks.append((cust, t, last, draw.amount[keep], channel))
    cust, t, types, amount, channel = (_concatenate(parts) for parts in zip(*chunks, strict=True))
    order = np.argsort(cust, kind="stable")  # each customer's events were emitted in time order
    cust, t, types, amount = cust[order], t[order], types[order], amount[order]
    channel = None if channel is None else channel[order]
    ids = _customer_ids(config.n_customers)
    frame = _event_frame(ids[cust], t, types, amount)
    if channel is not None:
        frame[CHANNEL_COLUMN] = np.array(CHANNELS, dtype=object)[channel]
    if config.anomaly_rate > 0:
        frame = _with_anomalies(p, frame, cust, t, all_seg, config.anomaly_rate, anomaly_rng,
                                channels)
    customers = pd.DataFrame(
        {
            "segment": np.array(SEGMENTS, dtype=object)[all_seg],
            "dormant_onset": pd.to_datetime(np.round(onset * NS_PER_DAY), unit="ns"),
        },
        index=pd.Index(ids, name="customer_id"),
    )
    return SimulatedWorld(frame, customers)


def _event_frame(ids: np.ndarray, t: np.ndarray, types: np.ndarray,
                 amount: np.ndarray) -> pd.DataFrame:
    ns = np.round(t * NS_PER_DAY).astype(np.int64)
    return pd.DataFrame(
        {
            "customer_id": ids,
            "timestamp": ns.view("datetime64[ns]"),
            "event_type": np.array(EVENT_TYPES, dtype=object)[types],
            "amount": amount,
        }
    )


def _with_anomalies(p: ProcessParams, frame: pd.DataFrame, cust: np.ndarray, t: np.ndarray,
                    seg: np.ndarray, rate: float, rng: np.random.Generator,
                    channels: _Channels | None) -> pd.DataFrame:
    """``frame`` (sorted by customer, then time) with foreign events inserted into gaps
    (step 5 of the module doc), flagged in ``ANOMALY_COLUMN``, sorted again."""
    inside = np.flatnonzero(cust[1:] == cust[:-1])  # gap between row i and row i + 1
    chosen = inside[rng.random(len(inside)) < rate]
    n = len(chosen)
    owner = cust[chosen]
    other = (seg[owner] + rng.integers(1, len(SEGMENTS), n)) % len(SEGMENTS)
    logits = p.type_logits[:, other]
    cdf = np.cumsum(np.exp(logits - logits.max(axis=0)), axis=0)
    types = (rng.random(n) * cdf[-1] > cdf[:-1]).sum(axis=0)
    amount = np.exp(next_amount_log_median(p, other, types)
                    + p.amount_sigma[types] * rng.standard_normal(n))
    amount = np.where(rng.random(n) < p.zero_prob[types], 0.0, amount)
    times = t[chosen] + rng.random(n) * (t[chosen + 1] - t[chosen])
    foreign = _event_frame(frame["customer_id"].to_numpy()[chosen], times, types, amount)
    if channels is not None:
        foreign[CHANNEL_COLUMN] = np.array(CHANNELS, dtype=object)[channels.draw(owner)]
    frame[ANOMALY_COLUMN] = False
    foreign[ANOMALY_COLUMN] = True
    merged = pd.concat([frame, foreign], ignore_index=True)
    return merged.sort_values(["customer_id", "timestamp"], kind="stable", ignore_index=True)


def _concatenate(parts: tuple[np.ndarray | None, ...]) -> np.ndarray | None:
    return None if parts[0] is None else np.concatenate(parts)


