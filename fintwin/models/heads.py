"""Output heads: each maps hidden states ``[..., H]`` to a distribution or prediction.

Factorisation (see the model contract): p(next type | h) * p(next gap | h) *
p(next amount | next type, h), with a dormancy probability (never another event) after
each event. Churn and horizon heads are direct predictions for a window of
``horizon_days`` after the event (the horizon head also for one that starts after a given
silence).

All distribution maths runs in float32 (head outputs are cast), so mixed precision
training only affects the encoder and the linear layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fintwin.data.features import MIN_GAP_DAYS

LOG_GAP_MIN = math.log(MIN_GAP_DAYS)
LOG_GAP_MAX = math.log(3650.0)  # component medians within ten years; longer = dormancy
LOG_SCALE_MIN = -5.0
LOG_SCALE_MAX = 0.7  # sigma <= 2 in log-days: a component's mean stays within 7.4x its median
QUANTILE_ITERATIONS = 5
QUANTILE_POINTS = 63
QUANTILE_SPAN = 9.0  # bisection bracket: component means -/+ this many standard deviations
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

Distribution = TypeVar("Distribution")


def at_positions(distribution: Distribution, mask: Tensor) -> Distribution:
    """The same distribution restricted to the positions where ``mask`` (``[B, T]``) is True.

    Every tensor field is indexed on its leading ``[B, T]`` dimensions, so per-position
    statistics (quantiles, means) can be computed on the positions that are scored only.
    """
    return replace(
        distribution,
        **{field.name: getattr(distribution, field.name)[mask] for field in fields(distribution)},
    )


def normal_log_prob(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-density of ``Normal(loc, exp(log_scale))`` at ``x``."""
    z = (x - loc) * torch.exp(-log_scale)
    return -0.5 * z * z - log_scale - LOG_SQRT_2PI


def normal_cdf(z: Tensor) -> Tensor:
    """Standard normal CDF written with ``erf`` (exports to ONNX)."""
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))


class TypeHead(nn.Module):
    """Categorical logits over the vocabulary; id 0 (padding) can never be predicted."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, vocab_size)
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[0] = True
        self.register_buffer("padding_mask", mask, persistent=False)

    def forward(self, hidden: Tensor) -> Tensor:
        """``[..., V]`` logits, with the padding logit at the float32 minimum."""
        logits = self.linear(hidden).float()
        return logits.masked_fill(self.padding_mask, torch.finfo(torch.float32).min)


@dataclass
class GapDistribution:
    """Log-normal mixture over the days to the next event, plus a dormancy probability.

    ``log(gap)`` given return is a mixture of normals (``log_weights``, ``loc``,
    ``log_scale``, each ``[..., M]``); ``dormant_logit`` ``[...]`` is the logit of never
    returning. Gaps are clamped to ``>= MIN_GAP_DAYS``.
    """

    log_weights: Tensor
    loc: Tensor
    log_scale: Tensor
    dormant_logit: Tensor

    @property
    def dormant_prob(self) -> Tensor:
        return torch.sigmoid(self.dormant_logit)

    def _standardised(self, gap: Tensor) -> Tensor:
        log_gap = torch.log(gap.float().clamp(min=MIN_GAP_DAYS)).unsqueeze(-1)
        return (log_gap - self.loc) * torch.exp(-self.log_scale)

    def log_density_given_return(self, gap: Tensor) -> Tensor:
        """``log f(gap)`` of the mixture (density in days), without dormancy."""
        log_gap = torch.log(gap.float().clamp(min=MIN_GAP_DAYS))
        component = normal_log_prob(log_gap.unsqueeze(-1), self.loc, self.log_scale)
        return torch.logsumexp(self.log_weights + component, dim=-1) - log_gap

    def log_prob(self, gap: Tensor) -> Tensor:
        """Log-density of an observed gap: ``log(1 - p_dormant) + log f(gap)``."""
        return F.logsigmoid(-self.dormant_logit) + self.log_density_given_return(gap)

    def log_survival_given_return(self, gap: Tensor) -> Tensor:
        """``log S(gap)`` of the mixture: log P(gap' > gap | return)."""
        tail = torch.special.log_ndtr(-self._standardised(gap))
        return torch.logsumexp(self.log_weights + tail, dim=-1)

    def log_survival(self, elapsed: Tensor) -> Tensor:
        """Censored term ``log(p_d + (1 - p_d) S(elapsed))``: no event up to ``elapsed``."""
        survived = F.logsigmoid(-self.dormant_logit) + self.log_survival_given_return(elapsed)
        return torch.logaddexp(F.logsigmoid(self.dormant_logit), survived)

    def dormant_after_silence(self, elapsed: Tensor) -> Tensor:
        """``P(dormant | no event for elapsed days) = p_d / (p_d + (1 - p_d) S(elapsed))``."""
        return torch.exp(F.logsigmoid(self.dormant_logit) - self.log_survival(elapsed))

    def cdf_given_return(self, gap: Tensor) -> Tensor:
        """``F(gap) = P(gap' <= gap | return)``."""
        return (self.log_weights.exp() * normal_cdf(self._standardised(gap))).sum(dim=-1)

    def mean(self) -> Tensor:
        """``E[gap | return] = sum_k w_k exp(loc_k + scale_k^2 / 2)``."""
        scale = torch.exp(self.log_scale)
        return torch.exp(torch.logsumexp(self.log_weights + self.loc + 0.5 * scale * scale, -1))

    def quantiles(self, levels: Tensor) -> Tensor:
        """``[..., Q]`` quantiles (given return) at ``levels`` ``[Q]``, found on log(gap).

        Bisection generalised to ``QUANTILE_POINTS`` interior points per iteration (each
        iteration shrinks the bracket ``QUANTILE_POINTS + 1`` times), with a fixed number of
        iterations and no data-dependent control flow, so it exports to ONNX. Uses
        ``F(y) < q  <=>  sum_k w_k erf((y - loc_k) / (sqrt(2) scale_k)) < 2q - 1``.
        """
        scale = torch.exp(self.log_scale)
        low = (self.loc - QUANTILE_SPAN * scale).amin(dim=-1, keepdim=True)
        width = (self.loc + QUANTILE_SPAN * scale).amax(dim=-1, keepdim=True) - low
        low = low.expand(*low.shape[:-1], levels.shape[0])
        inverse_scale = (1.0 / (math.sqrt(2.0) * scale))[..., None, None, :]
        offset = (self.loc[..., None, None, :]) * inverse_scale
        weights = self.log_weights.exp()[..., None, None, :]
        threshold = (2.0 * levels - 1.0).unsqueeze(-1)
        steps = QUANTILE_POINTS + 1
        fractions = torch.arange(1, steps, device=low.device, dtype=low.dtype) / steps
        for _ in range(QUANTILE_ITERATIONS):
            points = (low.unsqueeze(-1) + width.unsqueeze(-1) * fractions).unsqueeze(-1)
            erf_mix = (weights * torch.erf(points * inverse_scale - offset)).sum(dim=-1)
            width = width / steps
            low = low + (erf_mix < threshold).sum(dim=-1) * width
        return torch.exp(low + 0.5 * width).clamp(min=MIN_GAP_DAYS)


class TimeHead(nn.Module):
    """Intensity-free TPP head (Shchur et al., 2020): log-normal mixture + dormancy.

    ``loc_offset`` centres the component means (the mean log gap of the training data);
    the components start spread over ``loc_offset -/+ 1.5 loc_spread`` with that spread as
    their scale, and the dormancy probability at ``dormancy_init`` (the population fit), so
    training starts from the data's marginal gap distribution. (Length-bucketed batches
    still bias the dormancy upwards during training: see ``data.bucket_by_length``.)
    """

    def __init__(self, hidden_size: int, n_components: int = 8, loc_offset: float = 0.0,
                 loc_spread: float = 1.0, dormancy_init: float = 0.5) -> None:
        super().__init__()
        self.n_components = n_components
        self.loc_offset = loc_offset
        self.linear = nn.Linear(hidden_size, 3 * n_components + 1)
        m = n_components
        with torch.no_grad():
            self.linear.weight.mul_(0.1)
            self.linear.bias.zero_()
            self.linear.bias[m : 2 * m] = torch.linspace(-1.5, 1.5, m) * loc_spread
            self.linear.bias[2 * m : 3 * m] = math.log(max(loc_spread, 1e-3) * 2.0 / max(m, 1))
            p = min(max(dormancy_init, 1e-4), 1.0 - 1e-4)
            self.linear.bias[3 * m] = math.log(p / (1.0 - p))

    def forward(self, hidden: Tensor) -> GapDistribution:
        out = self.linear(hidden).float()
        m = self.n_components
        return GapDistribution(
            log_weights=torch.log_softmax(out[..., :m], dim=-1),
            loc=(out[..., m : 2 * m] + self.loc_offset).clamp(LOG_GAP_MIN, LOG_GAP_MAX),
            log_scale=out[..., 2 * m : 3 * m].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX),
            dormant_logit=out[..., 3 * m],
        )


@dataclass
class AmountDistribution:
    """Zero-inflated log-normal amount per next event type, each tensor ``[..., V]``.

    ``p(amount = 0 | k) = sigmoid(zero_logit_k)``; otherwise ``log(amount) ~
    Normal(loc_k, exp(log_scale_k))``. The positive part is a density per currency unit.
    """

    zero_logit: Tensor
    loc: Tensor
    log_scale: Tensor

    def _at(self, values: Tensor, event_type: Tensor) -> Tensor:
        return values.gather(-1, event_type.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, amount: Tensor, event_type: Tensor) -> Tensor:
        """``log p(amount | event_type)`` (point mass at 0, density above)."""
        zero_logit = self._at(self.zero_logit, event_type)
        amount = amount.float()
        is_zero = amount <= 0.0
        log_amount = torch.log(amount.clamp(min=1e-12))
        positive = (
            F.logsigmoid(-zero_logit)
            + normal_log_prob(
                log_amount, self._at(self.loc, event_type), self._at(self.log_scale, event_type)
            )
            - log_amount
        )
        return torch.where(is_zero, F.logsigmoid(zero_logit), positive)

    def mean(self) -> Tensor:
        """``[..., V]`` expected amount given each next type."""
        scale = torch.exp(self.log_scale)
        return torch.sigmoid(-self.zero_logit) * torch.exp(self.loc + 0.5 * scale * scale)

    def marginal_mean(self, type_probs: Tensor) -> Tensor:
        """Expected next amount marginalised over the type: ``sum_k p(k) E[amount | k]``."""
        return (type_probs * self.mean()).sum(dim=-1)


class AmountHead(nn.Module):
    """Per-type zero-inflated log-normal parameters: a linear layer with ``3 * V`` outputs."""

    def __init__(self, hidden_size: int, vocab_size: int, loc_offset: float = 0.0) -> None:
        super().__init__()
        self.loc_offset = loc_offset
        self.linear = nn.Linear(hidden_size, 3 * vocab_size)
        self.vocab_size = vocab_size

    def forward(self, hidden: Tensor) -> AmountDistribution:
        zero_logit, loc, log_scale = (
            self.linear(hidden).float().unflatten(-1, (3, self.vocab_size)).unbind(dim=-2)
        )
        return AmountDistribution(
            zero_logit=zero_logit,
            loc=loc + self.loc_offset,
            log_scale=log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX),
        )


class ChurnHead(nn.Module):
    """Logit of P(no event within ``horizon_days`` after the event)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden).float().squeeze(-1)


@dataclass
class HorizonPrediction:
    """Log of the expected count and of the expected spend within the horizon, ``[...]``."""

    log_count: Tensor
    log_spend: Tensor

    @property
    def count(self) -> Tensor:
        return torch.exp(self.log_count)

    @property
    def spend(self) -> Tensor:
        return torch.exp(self.log_spend)


class HorizonHead(nn.Module):
    """Expected number of events (Poisson, log link) and spend (Tweedie, log link) over the
    ``horizon_days`` that start ``elapsed`` days after the event, given no event in between.

    At ``elapsed = 0`` this is the window right after the event (the served output); at the
    silence between a customer's last event and a cut-off it forecasts the window after the
    cut-off. ``elapsed`` is clamped to ``max_elapsed``, the longest silence the training
    targets start after (``scaling["horizon_max_elapsed"]``; unclamped when absent), so a
    forecast never extrapolates the silence beyond what training saw. ``spend_unit`` (a
    typical amount, e.g. ``exp`` of the mean ``log1p(amount)``) scales the spend so the raw
    output and the spend loss are of order one.
    """

    def __init__(
        self,
        hidden_size: int,
        spend_unit: float = 1.0,
        tweedie_power: float = 1.5,
        horizon_days: float = 90.0,
        max_elapsed: float = math.inf,
    ) -> None:
        super().__init__()
        self.log_spend_unit = math.log(spend_unit)
        self.tweedie_power = tweedie_power
        self.horizon_days = horizon_days
        self.register_buffer("max_elapsed", torch.tensor(max_elapsed), persistent=False)
        width = max(hidden_size // 2, 8)
        self.net = nn.Sequential(
            nn.Linear(hidden_size + 2, width), nn.GELU(), nn.Linear(width, 2)
        )

    def elapsed_features(self, elapsed: Tensor) -> Tensor:
        """``[..., 2]``: log1p of the (clamped) silence in days and its share of the horizon."""
        elapsed = torch.minimum(elapsed.float().clamp(min=0.0), self.max_elapsed)
        return torch.stack([torch.log1p(elapsed), elapsed / self.horizon_days], dim=-1)

    def forward(self, hidden: Tensor, elapsed: Tensor | None = None) -> HorizonPrediction:
        """Predictions at hidden states ``[..., H]`` after ``elapsed`` ``[...]`` days (0 if None)."""
        if elapsed is None:
            elapsed = hidden.new_zeros(hidden.shape[:-1])
        features = self.elapsed_features(elapsed).to(hidden.dtype)
        raw = self.net(torch.cat([hidden, features], dim=-1)).float().clamp(-20.0, 20.0)
        log_count, log_spend = raw.unbind(dim=-1)
        return HorizonPrediction(log_count=log_count, log_spend=log_spend + self.log_spend_unit)

    def losses(
        self, prediction: HorizonPrediction, count: Tensor, spend: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Elementwise Poisson NLL of ``count`` and Tweedie deviance of ``spend`` (in units)."""
        unit_log_spend = prediction.log_spend - self.log_spend_unit
        unit_spend = spend.float() * math.exp(-self.log_spend_unit)
        return (
            poisson_nll(prediction.log_count, count.float()),
            tweedie_deviance(unit_log_spend, unit_spend, self.tweedie_power),
        )


def poisson_nll(log_rate: Tensor, count: Tensor) -> Tensor:
    """Elementwise Poisson negative log-likelihood ``rate - count * log_rate`` (no constant)."""
    return torch.exp(log_rate) - count * log_rate


def tweedie_deviance(log_mean: Tensor, target: Tensor, power: float = 1.5) -> Tensor:
    """Elementwise Tweedie unit deviance (``1 < power < 2``) with a log link.

    Compound Poisson-gamma: a point mass at zero plus a heavy right tail, the usual choice
    for spend. Zero when the mean equals the target; gradients scale like ``mean^(1-p)``.
    """
    one, two = 1.0 - power, 2.0 - power
    target = target.clamp(min=0.0)
    return 2.0 * (
        target.pow(two) / (one * two)
        - target * torch.exp(one * log_mean) / one
        + torch.exp(two * log_mean) / two
    )
