"""Probabilistic scores of per-customer holdout forecasts: whole distributions, not means.

A model's forecast of a customer's holdout is a distribution; these scores compare it with the
one actual outcome, then average over customers.

Transactions (counts): a PMF matrix ``pmf`` of shape ``[customers, N + 1]`` over 0..N whose last
column is the tail, P(X >= N). Every score treats that tail as an atom at N, so a count y > N
is scored as the event "N or more" (its probability is P(X >= N), its RPS adds 1 per unit
beyond N, its PIT is 1). Distributions are built with N large enough that this changes nothing
material: the sample PMF puts no mass beyond its largest sample, the BG/NBD PMF is cut where
every customer's tail is below 1e-9.

Their keys carry the prefix ``txn_``.

- Log score: mean over customers of log P(X = y), positively oriented (higher is better; 0 for
  a sure and right forecast). Probabilities below ``LOG_FLOOR`` (1e-12, log -27.6) are raised to
  it so that one impossible outcome gives a finite, heavily penalised score; the share of
  customers floored is reported with it. A PMF estimated from S Monte Carlo paths
  (``sample_pmf``) scores below the distribution it estimates (log is concave, and an outcome
  rarer than 1 / S is often missed by the paths), by a margin that shrinks as S grows; compare
  it with an exact PMF at several S (bench/RESULTS.md: CDNOW at 100 to 1,000 paths).
- Ranked probability score (RPS, the CRPS of an integer-valued forecast): mean over customers
  of sum_k (F(k) - 1{y <= k})^2, lower is better; 0 for a sure and right forecast, |y - m| for
  a point mass at m.
- PIT: the non-randomised PIT of Czado, Gneiting and Held (2009, Biometrics 65, 1254-1261).
  A customer's PIT is uniform on [F(y - 1), F(y)] rather than one number; the mean PIT CDF is
  F_bar(u) = mean_i clip((u - F_i(y_i - 1)) / (F_i(y_i) - F_i(y_i - 1)), 0, 1), which is the
  identity for a calibrated forecaster. The histogram has the increments of F_bar over equal
  bins (as densities: 1 everywhere when calibrated); the KS distance is sup_u |F_bar(u) - u|,
  computed exactly (F_bar is piecewise linear). This is the expectation of the randomised PIT's
  histogram, without its sampling noise.
- Coverage of the central interval of level c (0.5, 0.8): with a = (1 - c) / 2, the interval
  [l, h] with l = min{k: F(k) >= a} and h = min{k: F(k) >= 1 - a} (the quantiles of levels a
  and 1 - a by the inverse CDF). ``cover50`` / ``cover80`` are the shares of actuals inside it
  (y is inside iff F(y) >= a and F(y - 1) < 1 - a). A count interval holds at least c of its
  distribution and often much more (a customer with P(0) = 0.9 has the 80% interval [0, 0]),
  so ``cover*_expected`` is what a calibrated model would cover: the mean of each model's own
  P(l <= X <= h). ``pit_cover50`` / ``pit_cover80`` are F_bar(1 - a) - F_bar(a), the coverage
  of the randomised central interval, exactly c for a calibrated forecaster.

Spend: per customer the PIT interval of the actual spend, the predictive CDF just below and at
it, ``F(s-)`` and ``F(s)`` (they differ at the atom of zero spend); for Monte Carlo samples,
the rank interval of ``rank_bounds``. The PIT and the interval coverage above need nothing else;
their keys carry the prefix ``spend_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOG_FLOOR = 1e-12
PIT_BINS = 10
LEVELS = (0.5, 0.8)
ATOM_WIDTH = 1e-9  # PIT intervals narrower than this are jumps (exact to this width)
PMF_TOLERANCE = 1e-6
SMOOTHING_PATHS = 1.0  # the Dirichlet-process concentration of `sample_pmf`
COUNT_KEYS = (
    "txn_log_score",
    "txn_log_floored",
    "txn_rps",
    "txn_pit_ks",
    "txn_cover50",
    "txn_cover80",
    "txn_cover50_expected",
    "txn_cover80_expected",
    "txn_pit_cover50",
    "txn_pit_cover80",
)
SPEND_KEYS = (
    "spend_pit_ks",
    "spend_cover50",
    "spend_cover80",
    "spend_pit_cover50",
    "spend_pit_cover80",
)
SCORE_KEYS = COUNT_KEYS + SPEND_KEYS


def check_pmf(pmf: np.ndarray, name: str = "pmf") -> np.ndarray:
    """``pmf`` as a float array ``[customers, N + 1]`` of non-negative rows summing to 1."""
    pmf = np.asarray(pmf, dtype=float)
    if pmf.ndim != 2 or pmf.shape[1] == 0:
        raise ValueError(f"{name}: expected a 2-D array [customers, N + 1], got shape {pmf.shape}")
    bad = np.flatnonzero(~np.isfinite(pmf).all(axis=1) | (pmf < 0).any(axis=1))
    if len(bad):
        raise ValueError(f"{name}: row {bad[0]} has a negative or non-finite probability")
    off = np.flatnonzero(np.abs(pmf.sum(axis=1) - 1.0) > PMF_TOLERANCE)
    if len(off):
        total = pmf[off[0]].sum()
        raise ValueError(f"{name}: row {off[0]} sums to {total:.9g}, not 1 ({len(off)} rows)")
    return pmf


def check_counts(counts: np.ndarray, n_customers: int, name: str = "actual counts") -> np.ndarray:
    """``counts`` as an int64 vector of ``n_customers`` non-negative whole numbers."""
    counts = np.asarray(counts)
    if counts.shape != (n_customers,):
        raise ValueError(f"{name}: expected shape ({n_customers},), got {counts.shape}")
    whole = np.isfinite(counts) & (counts >= 0) & (np.floor(counts) == counts)
    if not whole.all():
        row = int(np.flatnonzero(~whole)[0])
        raise ValueError(f"{name}: row {row} is {counts[row]!r}, not a count")
    return counts.astype(np.int64)


def pmf_at(pmf: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """P(X = y) of each row at its count, a count beyond N taking the tail's P(X >= N)."""
    column = np.minimum(counts, pmf.shape[1] - 1)
    return pmf[np.arange(len(pmf)), column]


def count_pit_bounds(pmf: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(F(y - 1), F(y))`` of each row at its count (the CDF is 1 from N on)."""
    pmf = check_pmf(pmf)
    counts = check_counts(counts, len(pmf))
    cdf = np.cumsum(pmf, axis=1)
    cdf[:, -1] = 1.0
    rows = np.arange(len(pmf))
    upper = cdf[rows, np.minimum(counts, pmf.shape[1] - 1)]
    below = counts - 1
    lower = np.where(below >= 0, cdf[rows, np.clip(below, 0, pmf.shape[1] - 1)], 0.0)
    return lower, upper


def log_score(pmf: np.ndarray, counts: np.ndarray, floor: float = LOG_FLOOR) -> tuple[float, float]:
    """Mean log P(X = y) (higher is better), probabilities floored at ``floor``; and the share
    of customers whose probability was floored."""
    pmf = check_pmf(pmf)
    p = pmf_at(pmf, check_counts(counts, len(pmf)))
    return float(np.mean(np.log(np.maximum(p, floor)))), float(np.mean(p < floor))


def ranked_probability_score(pmf: np.ndarray, counts: np.ndarray) -> float:
    """Mean over rows of sum_k (F(k) - 1{y <= k})^2 (lower is better), the tail an atom at N."""
    pmf = check_pmf(pmf)
    counts = check_counts(counts, len(pmf))
    cdf = np.cumsum(pmf[:, :-1], axis=1)
    step = counts[:, None] <= np.arange(pmf.shape[1] - 1)[None, :]
    beyond = np.maximum(counts - (pmf.shape[1] - 1), 0)
    return float(np.mean(((cdf - step) ** 2).sum(axis=1) + beyond))


def _check_bounds(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    if lower.shape != upper.shape or lower.ndim != 1 or len(lower) == 0:
        raise ValueError(
            f"PIT bounds: expected two non-empty vectors of one length, got {lower.shape} and "
            f"{upper.shape}"
        )
    bad = ~((0.0 <= lower) & (lower <= upper) & (upper <= 1.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"PIT bounds: row {row} has F(y-) = {lower[row]!r}, F(y) = {upper[row]!r}; "
            "expected 0 <= F(y-) <= F(y) <= 1"
        )
    return lower, upper


def _cumulative(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` sorted and the running sums of ``values`` in that order (0 first)."""
    order = np.argsort(keys, kind="stable")
    return keys[order], np.concatenate([[0.0], np.cumsum(values[order])])


def pit_cdf(lower: np.ndarray, upper: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The mean non-randomised PIT CDF F_bar at ``u`` (see the module docstring).

    Row i adds 0 below ``lower[i]``, rises linearly to 1 at ``upper[i]`` and stays 1; rows
    narrower than ``ATOM_WIDTH`` jump at ``upper[i]``. Exact, by sorted running sums.
    """
    lower, upper = _check_bounds(lower, upper)
    u = np.asarray(u, dtype=float)
    full = np.searchsorted(np.sort(upper), u, side="right")  # rows with F(y) <= u
    spread = upper - lower > ATOM_WIDTH
    a, b = lower[spread], upper[spread]
    slope = 1.0 / (b - a)
    partial = np.zeros_like(u)
    for keys, side, sign in ((a, "left", 1.0), (b, "right", -1.0)):  # a < u, minus b <= u
        sorted_keys, slopes = _cumulative(keys, slope)
        _, offsets = _cumulative(keys, a * slope)
        k = np.searchsorted(sorted_keys, u, side=side)
        partial += sign * (u * slopes[k] - offsets[k])
    return (full + partial) / len(lower)


def pit_ks(lower: np.ndarray, upper: np.ndarray) -> float:
    """KS distance of the mean PIT CDF from uniform: sup_u |F_bar(u) - u|.

    F_bar is linear between the bounds' values and jumps only at narrow rows' ``upper``, so the
    supremum is at a knot, from the value there or the left limit.
    """
    lower, upper = _check_bounds(lower, upper)
    knots = np.unique(np.concatenate([lower, upper, [0.0, 1.0]]))
    right = pit_cdf(lower, upper, knots)
    atoms = np.sort(upper[upper - lower <= ATOM_WIDTH])
    jumps = np.searchsorted(atoms, knots, "right") - np.searchsorted(atoms, knots, "left")
    left = right - jumps / len(lower)
    return float(max(np.abs(right - knots).max(), np.abs(left - knots).max()))


def pit_histogram(lower: np.ndarray, upper: np.ndarray, bins: int = PIT_BINS) -> np.ndarray:
    """Densities of the mean PIT over ``bins`` equal bins of [0, 1] (all 1 when calibrated);
    the first bin holds the atoms at 0."""
    cdf = pit_cdf(lower, upper, np.linspace(0.0, 1.0, bins + 1))
    cdf[0] = 0.0
    return np.diff(cdf) * bins


def interval_coverage(lower: np.ndarray, upper: np.ndarray, level: float) -> float:
    """Share of actuals inside the central ``level`` interval [q(a), q(1 - a)], a = (1 - level)
    / 2: F(y) >= a and F(y-) < 1 - a."""
    lower, upper = _check_bounds(lower, upper)
    tail = (1.0 - level) / 2.0
    return float(np.mean((upper >= tail) & (lower < 1.0 - tail)))


def pit_coverage(lower: np.ndarray, upper: np.ndarray, level: float) -> float:
    """Mass of the mean PIT in the central ``level`` of [0, 1]: the coverage of the randomised
    central interval (``level`` when calibrated)."""
    tail = (1.0 - level) / 2.0
    low, high = pit_cdf(lower, upper, np.array([tail, 1.0 - tail]))
    return float(high - low)


def expected_coverage(pmf: np.ndarray, level: float) -> float:
    """Mean over rows of the model's own probability of its central ``level`` interval."""
    pmf = check_pmf(pmf)
    tail = (1.0 - level) / 2.0
    cdf = np.cumsum(pmf, axis=1)
    cdf[:, -1] = 1.0
    low = np.argmax(cdf >= tail, axis=1)
    high = np.argmax(cdf >= 1.0 - tail, axis=1)
    rows = np.arange(len(pmf))
    below = np.where(low > 0, cdf[rows, np.maximum(low - 1, 0)], 0.0)
    return float(np.mean(cdf[rows, high] - below))


def sample_pmf(samples: np.ndarray, concentration: float = SMOOTHING_PATHS) -> np.ndarray:
    """Per-row PMF of whole-number Monte Carlo samples ``[customers, S]``, smoothed.

    The posterior predictive of a Dirichlet process whose base measure is the pooled sample
    distribution of all rows: ``(n_k + c * pooled_k) / (S + c)``, as if each customer had
    ``c`` more paths drawn from the whole cohort's. With c = 1 and S = 100 it moves under 1% of
    a customer's mass (so RPS, PIT and coverage barely change), but a count the customer's own
    paths never reached keeps the probability a random customer's path gives it instead of 0
    (a log score of minus infinity). Counts beyond every sample keep probability 0: the matrix
    has one column more than the largest sample, an empty tail.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.size == 0:
        raise ValueError(f"samples: expected a non-empty [customers, S] array, got {samples.shape}")
    counts = check_counts(samples.ravel(), samples.size, "samples").reshape(samples.shape)
    width = int(counts.max()) + 2
    rows = np.repeat(np.arange(len(counts)), counts.shape[1])
    histogram = np.bincount(rows * width + counts.ravel(), minlength=len(counts) * width)
    histogram = histogram.reshape(len(counts), width).astype(float)
    pooled = histogram.sum(axis=0) / histogram.sum()
    return (histogram + concentration * pooled) / (counts.shape[1] + concentration)


def rank_bounds(samples: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PIT interval of each row's actual among its Monte Carlo samples ``[customers, S]``.

    The actual's rank: k samples below it and k' at or below it, spread over [k / (S + 1),
    (k' + 1) / (S + 1)] (the verification rank histogram's bins, ties shared). When the actual
    is exchangeable with the samples (a perfect model), the PIT is exactly uniform; the
    empirical CDF's F(s) would put atoms of 1 / (S + 1) at 0 and 1. The interval coverage of
    these bounds is that of the interval between order statistics (S = 100, 80%: the actual
    above the 10th and below the 91st of the sorted samples, 81 of the 101 ranks).
    """
    samples, actual = np.asarray(samples, dtype=float), np.asarray(actual, dtype=float)
    if samples.ndim != 2 or samples.shape[1] == 0 or actual.shape != (len(samples),):
        raise ValueError(
            f"samples {samples.shape} and actuals {actual.shape}: expected [customers, S] and "
            "[customers]"
        )
    below = (samples < actual[:, None]).sum(axis=1)
    at_or_below = (samples <= actual[:, None]).sum(axis=1)
    ranks = samples.shape[1] + 1
    return below / ranks, (at_or_below + 1) / ranks


def level_name(level: float) -> str:
    """``"80"`` for 0.8, as in the coverage keys."""
    return f"{100 * level:.0f}"


def _pit_scores(prefix: str, lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    """PIT KS distance and both coverages at each of ``LEVELS``, keys prefixed."""
    scores = {f"{prefix}_pit_ks": pit_ks(lower, upper)}
    for level in LEVELS:
        name = level_name(level)
        scores[f"{prefix}_cover{name}"] = interval_coverage(lower, upper, level)
        scores[f"{prefix}_pit_cover{name}"] = pit_coverage(lower, upper, level)
    return scores


@dataclass(frozen=True)
class HoldoutDistribution:
    """One model's predictive distributions of each customer's holdout outcomes, with the actuals.

    ``txn_pmf`` ``[customers, N + 1]`` (last column P(X >= N)) and the actual counts ``txn``;
    ``spend_lower`` / ``spend_upper``: the spend CDF just below and at the actual spend.
    """

    txn_pmf: np.ndarray
    txn: np.ndarray
    spend_lower: np.ndarray
    spend_upper: np.ndarray

    @classmethod
    def from_samples(
        cls, txn_samples: np.ndarray, spend_samples: np.ndarray, txn: np.ndarray, spend: np.ndarray
    ) -> HoldoutDistribution:
        """From Monte Carlo paths ``[customers, S]`` (``sample_pmf``, ``rank_bounds``)."""
        return cls(sample_pmf(txn_samples), np.asarray(txn), *rank_bounds(spend_samples, spend))

    def txn_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(F(y - 1), F(y))`` at the actual counts."""
        return count_pit_bounds(self.txn_pmf, self.txn)

    def scores(self) -> dict[str, float]:
        """Every score, keyed as ``SCORE_KEYS``."""
        mean_log, floored = log_score(self.txn_pmf, self.txn)
        scores = {
            "txn_log_score": mean_log,
            "txn_log_floored": floored,
            "txn_rps": ranked_probability_score(self.txn_pmf, self.txn),
            **_pit_scores("txn", *self.txn_bounds()),
            **_pit_scores("spend", self.spend_lower, self.spend_upper),
        }
        for level in LEVELS:
            scores[f"txn_cover{level_name(level)}_expected"] = expected_coverage(
                self.txn_pmf, level
            )
        return {key: scores[key] for key in SCORE_KEYS}

    def pit_histograms(self, bins: int = PIT_BINS) -> dict[str, np.ndarray]:
        """Mean-PIT densities over ``bins`` bins: ``txn`` and ``spend``."""
        return {
            "txn": pit_histogram(*self.txn_bounds(), bins),
            "spend": pit_histogram(self.spend_lower, self.spend_upper, bins),
        }
