"""The true distribution of each customer's next event, and draws from it, for checking the
oracle's forward filter against the simulator's own sampler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import logsumexp, softmax

from fintwin.data.features import NS_PER_DAY
from fintwin.data.oracle import _encode, _filter
from fintwin.data.simulator import (
    EVENT_TYPES,
    SEGMENTS,
    SimulatorConfig,
    _draw_next,
    next_gap_params,
    next_type_logits,
    process_params,
)


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
        log_f = stats.lognorm.logpdf(gap[:, None], s=self.gap_sigma, scale=np.exp(self.gap_mu))
        log_f = log_f + np.log1p(-self.dormant_prob_by_segment)
        with np.errstate(divide="ignore"):
            return logsumexp(np.log(self.segment_posterior) + log_f, axis=1)

    def survival(self, days: np.ndarray | float) -> np.ndarray:
        """P(no event within ``days`` after the last event), dormancy included [C]."""
        elapsed = np.broadcast_to(np.asarray(days, dtype=float), self.customer_id.shape)
        surv = stats.lognorm.sf(elapsed[:, None], s=self.gap_sigma, scale=np.exp(self.gap_mu))
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
    p = process_params(config)
    table = _encode(history, EVENT_TYPES, pd.Timestamp.max)
    fil = _filter(table, p)
    last = np.flatnonzero(table.is_last)
    n_seg, n_types = len(SEGMENTS), len(EVENT_TYPES)
    type_probs = np.empty((len(last), n_seg, n_types))
    gap_mu = np.empty((len(last), n_seg))
    for s in range(n_seg):
        logits = next_type_logits(p, s, table.type_id[last], fil.since_salary[last])
        type_probs[:, s] = softmax(logits, axis=0).T
        gap_mu[:, s], _ = next_gap_params(
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
    p = process_params(config)
    dist = next_event_distribution(history, config)
    rng = np.random.default_rng(seed)
    n = len(dist.customer_id)
    rep = np.repeat(np.arange(n), n_samples)
    cdf = np.cumsum(dist.segment_posterior[rep], axis=1)
    seg = (rng.random(len(rep))[:, None] * cdf[:, -1:] > cdf[:, :-1]).sum(axis=1)
    last_time = dist.last_timestamp.astype("datetime64[ns]").view(np.int64) / NS_PER_DAY
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
