"""Heads: the distributions are normalised and their summaries agree with the rollout's
samplers."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from fintwin.models.heads import (
    AmountDistribution,
    GapDistribution,
    TypeHead,
    at_positions,
    poisson_nll,
    tweedie_deviance,
)
from fintwin.twin.rollout import N_NOISE, sample_amount, sample_gap, sample_gap_beyond


@pytest.fixture
def gap() -> GapDistribution:
    """Three rows of a 3-component log-normal mixture with different dormancy."""
    return GapDistribution(
        log_weights=torch.log_softmax(
            torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), -1
        ),
        loc=torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.5, 3.0], [-1.0, 0.5, 2.5]]),
        log_scale=torch.tensor([[-0.5, 0.0, -1.0], [-0.2, -0.7, 0.1], [0.0, -0.3, -0.5]]),
        dormant_logit=torch.tensor([-2.0, 0.0, 1.5]),
    )


@pytest.fixture
def amount() -> AmountDistribution:
    """Two rows over a vocabulary of three types."""
    return AmountDistribution(
        zero_logit=torch.tensor([[0.0, -1.0, 2.0], [1.0, -3.0, 0.5]]),
        loc=torch.tensor([[3.0, 1.0, 0.0], [2.0, 4.0, 1.5]]),
        log_scale=torch.tensor([[-0.5, 0.0, -1.0], [-0.2, -0.7, -0.4]]),
    )


def _noise(rows: int, seed: int) -> torch.Tensor:
    """Uniforms for ``rows`` draws, laid out as the rollout draws them."""
    return torch.rand((rows, N_NOISE), generator=torch.Generator().manual_seed(seed))


def _apply(distribution, fn):
    """The same distribution type with ``fn`` applied to every parameter tensor."""
    return type(distribution)(*(fn(getattr(distribution, f.name)) for f in fields(distribution)))


def _integrate_over_log_gap(density_fn, low: float = -20.0, high: float = 20.0) -> torch.Tensor:
    """Trapezoid integral of a density in days, written as an integral over log(gap)."""
    log_gap = torch.linspace(low, high, 40001, dtype=torch.float64)
    gap = log_gap.exp()
    integrand = density_fn(gap.float().unsqueeze(-1).expand(-1, 3).contiguous()).double()
    return torch.trapezoid(integrand * gap.unsqueeze(-1), log_gap, dim=0)


def test_gap_density_integrates_to_one_minus_dormancy(gap):
    expanded = _apply(gap, lambda t: t.unsqueeze(0))
    total = _integrate_over_log_gap(lambda g: expanded.log_prob(g).exp())
    torch.testing.assert_close(total.float(), 1.0 - gap.dormant_prob, atol=1e-4, rtol=0)


def test_censored_survival_is_dormancy_plus_unobserved_tail(gap):
    elapsed = torch.tensor([0.5, 4.0, 30.0])
    expected = gap.dormant_prob + (1 - gap.dormant_prob) * (1 - gap.cdf_given_return(elapsed))
    torch.testing.assert_close(gap.log_survival(elapsed).exp(), expected, atol=1e-6, rtol=0)
    # Nothing can have happened within a vanishing elapsed time (gaps are clamped to 1e-3 d).
    tiny = gap.log_survival(torch.full((3,), 1e-6))
    torch.testing.assert_close(tiny, torch.zeros(3), atol=1e-6, rtol=0)


def test_quantiles_invert_the_cdf_and_match_the_rollout_sampler(gap):
    levels = torch.tensor([0.1, 0.5, 0.9])
    quantiles = gap.quantiles(levels)
    assert quantiles.shape == (3, 3)
    assert torch.all(quantiles[:, 1:] > quantiles[:, :-1])
    cdf = gap.cdf_given_return(quantiles.T.contiguous()).T
    torch.testing.assert_close(cdf, levels.expand(3, 3), atol=1e-5, rtol=0)
    n = 40000
    samples = sample_gap(gap, torch.arange(3).repeat(n), _noise(3 * n, seed=0)).view(n, 3)
    below = (samples.unsqueeze(-1) <= quantiles.double()).float().mean(0)
    torch.testing.assert_close(below, levels.expand(3, 3), atol=0.01, rtol=0)


def test_rollout_gap_samplers_match_the_mean_and_dormancy(gap):
    """Both gap samplers of the rollout; after a vanishing silence the first gap and the
    dormancy are those of the unconditioned distribution."""
    n = 200000
    rows = torch.arange(3).repeat(n)
    samples = sample_gap(gap, rows, _noise(3 * n, seed=1)).view(n, 3)
    torch.testing.assert_close(samples.mean(0).float(), gap.mean(), rtol=0.03, atol=0)
    first, p_dormant = sample_gap_beyond(gap, torch.full((3,), 1e-3), rows, _noise(3 * n, seed=2))
    torch.testing.assert_close(first.view(n, 3).mean(0).float(), gap.mean(), rtol=0.03, atol=0)
    torch.testing.assert_close(p_dormant[:3].float(), gap.dormant_prob, atol=1e-6, rtol=0)


def test_statistics_at_selected_positions_equal_the_full_ones_indexed(gap, amount):
    """``at_positions`` keeps only the masked rows of a ``[B, T]`` layout, in order."""
    mask = torch.tensor([[True, False, True], [False, True, False]])
    levels = torch.tensor([0.1, 0.5, 0.9])
    gap_grid = _apply(gap, lambda t: torch.stack([t, t.flip(0)]))  # [2, 3, ...]
    selected = at_positions(gap_grid, mask)
    assert selected.loc.shape == (3, 3) and selected.dormant_logit.shape == (3,)
    torch.testing.assert_close(selected.quantiles(levels), gap_grid.quantiles(levels)[mask])
    torch.testing.assert_close(selected.dormant_prob, gap.dormant_prob[[0, 2, 1]])
    amount_grid = _apply(amount, lambda t: torch.stack([torch.cat([t, t[:1]])] * 2))
    torch.testing.assert_close(at_positions(amount_grid, mask).mean(), amount_grid.mean()[mask])


def test_amount_distribution_is_normalised_per_type(amount):
    """Zero mass + integral of the positive density = 1 for every row and every type."""
    grid = 40001
    event_type = torch.arange(3).expand(grid, 2, 3)  # [G, row, type]
    per_point = _apply(amount, lambda t: t[None, :, None, :].expand(grid, 2, 3, 3))
    log_grid = torch.linspace(-25.0, 25.0, grid, dtype=torch.float64)
    values = log_grid.exp().float()[:, None, None].expand(grid, 2, 3)
    density = per_point.log_prob(values, event_type).exp().double()
    continuous = torch.trapezoid(density * log_grid.exp()[:, None, None], log_grid, dim=0)
    zero_mass = per_point.log_prob(torch.zeros(grid, 2, 3), event_type)[0].exp()
    torch.testing.assert_close(
        (continuous + zero_mass.double()).float(), torch.ones(2, 3), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(zero_mass, torch.sigmoid(amount.zero_logit))


def test_amount_mean_and_marginal_match_the_rollout_sampler(amount):
    n = 200000
    event_type = torch.tensor([0, 1, 2]).repeat(n // 3 + 1)[:n]
    samples = sample_amount(amount, torch.zeros(n, dtype=torch.long), event_type, _noise(n, seed=2))
    per_type = torch.stack([samples[event_type == k].mean() for k in range(3)])
    torch.testing.assert_close(per_type, amount.mean()[0], rtol=0.03, atol=0)
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(amount.marginal_mean(probs), (probs * amount.mean()).sum(-1))


def test_type_head_never_predicts_padding():
    head = TypeHead(hidden_size=4, vocab_size=5)
    probs = torch.softmax(head(torch.randn(3, 4) * 100.0), dim=-1)
    assert torch.all(probs[:, 0] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def _assert_minimised_at(loss_fn, target: torch.Tensor, log_mean: float) -> None:
    """``loss_fn(log prediction, target).mean()`` has its minimum at ``log_mean``."""
    at = torch.tensor(log_mean, requires_grad=True)
    loss = loss_fn(at.expand_as(target), target).mean()
    (grad,) = torch.autograd.grad(loss, at)
    assert abs(float(grad)) < 1e-4 * float(loss.detach())
    for shifted in (log_mean - 0.02, log_mean + 0.02):
        assert loss_fn(torch.tensor(shifted).expand_as(target), target).mean() > loss


def test_spend_and_count_losses_are_minimised_by_the_mean():
    """The best constant prediction under each loss is the sample mean (heavy-tailed spend)."""
    generator = torch.Generator().manual_seed(3)
    spend = torch.where(
        torch.rand(5000, generator=generator) < 0.4,
        torch.zeros(5000),
        torch.exp(torch.randn(5000, generator=generator) * 1.5 + 3.0),
    ).double()
    count = torch.poisson(torch.full((5000,), 2.5), generator=generator).double()
    _assert_minimised_at(tweedie_deviance, spend, math.log(spend.mean()))
    _assert_minimised_at(poisson_nll, count, math.log(count.mean()))
    assert tweedie_deviance(torch.tensor(math.log(7.0)), torch.tensor(7.0)).abs() < 1e-5
