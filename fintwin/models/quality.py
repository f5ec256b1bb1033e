"""Model quality on the test customers: plain baselines, gap calibration and, on simulated
data, the comparison with the true process.

All time NLLs follow the model's normalisation: (sum of -log densities of observed next
gaps + sum of -log survival of each customer's censored last gap) / number of observed next
events, on the test customers' calibration events.

On simulated data the model, the oracle and the history-free baseline
(``fintwin.data.oracle``) are scored on the same terms: for every test customer the events
inside the model's ``max_len`` window (each event after the window's first) plus the
censored gap after the last event. All three NLLs are (sum of -log p(type, gap, amount) over
scored events + sum of -log survival of censored gaps) / number of scored events, in nats.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from scipy import stats

from fintwin.data.datamodule import EventDataModule
from fintwin.data.features import customer_groups
from fintwin.data.oracle import fit_marginal_baseline, oracle_log_likelihood
from fintwin.data.sequences import (
    MIN_GAP_DAYS,
    calibration_events,
    fit_population_gaps,
    training_gaps,
)
from fintwin.data.simulator import CHANNEL_COLUMN, SimulatorConfig, simulate
from fintwin.models.heads import at_positions
from fintwin.models.module import TwinModule, observed_next_events


def _test_arrays(datamodule: EventDataModule) -> dict[str, np.ndarray]:
    batch = datamodule.sequences.batch(datamodule.splits["test"])
    valid = np.arange(batch["event_type"].shape[1])[None, :] < batch["length"].numpy()[:, None]
    arrays = {k: v.numpy() for k, v in batch.items()}
    arrays["valid"] = valid
    arrays["observed"] = valid & ~arrays["gap_censored"]
    return arrays


def gap_baselines(datamodule: EventDataModule) -> dict[str, float]:
    """Time NLL and MAE of two plain baselines on the test customers.

    ``own_mean``: exponential gaps with the mean of the customer's own previous gaps
    (population mean gap until a customer has one). ``population``: one log-normal gap
    distribution with a never-return probability, fitted on training customers. MAE point
    forecasts: the customer's own mean gap; the population's median gap (as the model's
    ``time_mae`` uses its median).
    """
    obs_train, cen_train = training_gaps(datamodule.sequences, datamodule.splits["train"])
    mu, sigma, p_dormant = fit_population_gaps(obs_train, cen_train)
    pop_mean = float(np.exp(mu + sigma**2 / 2))
    a = _test_arrays(datamodule)
    gap = np.maximum(a["next_gap"].astype(np.float64), MIN_GAP_DAYS)
    observed, censored = a["observed"], a["gap_censored"] & a["valid"]
    n_obs = max(int(observed.sum()), 1)

    seen = (a["delta_t"] > 0) & a["valid"]
    own_sum = np.cumsum(np.where(seen, a["delta_t"], 0.0), axis=1)
    own_count = np.cumsum(seen, axis=1)
    own_mean = np.where(own_count > 0, own_sum / np.maximum(own_count, 1), pop_mean)
    own_nll = (np.log(own_mean) + gap / own_mean)[observed].sum() + (gap / own_mean)[censored].sum()

    log_gap = np.log(gap)
    pop_obs = -(stats.norm.logpdf(log_gap, mu, sigma) - log_gap + np.log1p(-p_dormant))
    pop_cen = -np.log(p_dormant + (1 - p_dormant) * stats.norm.sf(log_gap, mu, sigma))
    return {
        "test/baseline_own_mean_time_nll": float(own_nll / n_obs),
        "test/baseline_own_mean_time_mae": float(np.abs(own_mean - gap)[observed].mean()),
        "test/baseline_population_time_nll": float(
            (pop_obs[observed].sum() + pop_cen[censored].sum()) / n_obs
        ),
        "test/baseline_population_time_mae": float(np.abs(np.exp(mu) - gap)[observed].mean()),
    }


def _test_batches(
    model: TwinModule, datamodule: EventDataModule, batch_size: int = 256
) -> Iterator[dict[str, torch.Tensor]]:
    """The test customers' padded batches, on the model's device."""
    index = datamodule.splits["test"]
    for lo in range(0, len(index), batch_size):
        batch = datamodule.sequences.batch(index[lo : lo + batch_size])
        yield {k: v.to(model.device) for k, v in batch.items()}


@torch.no_grad()
def model_event_log_likelihood(
    model: TwinModule, datamodule: EventDataModule
) -> dict[str, np.ndarray]:
    """Per-position log-likelihood terms of the model on the test customers ``[N, T]``."""
    model.eval()
    width = int(datamodule.sequences.lengths[datamodule.splits["test"]].max())
    parts: dict[str, list[np.ndarray]] = {}
    for batch in _test_batches(model, datamodule):
        terms = model.per_event_log_likelihood(batch)
        for name, value in terms.items():
            padded = np.zeros((value.shape[0], width), dtype=value.cpu().numpy().dtype)
            padded[:, : value.shape[1]] = value.cpu().numpy()
            parts.setdefault(name, []).append(padded)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


@torch.no_grad()
def gap_calibration(model: TwinModule, datamodule: EventDataModule) -> dict[str, float]:
    """Calibration of the gap distribution given a return on the observed test gaps.

    PIT = F(observed gap | return). ``time_pit_below_median``: share of PITs below 0.5
    (0.5 when calibrated); ``time_pit_ks``: largest distance between the PITs' empirical
    CDF and the uniform one (0 when calibrated).
    """
    model.eval()
    pits = []
    for batch in _test_batches(model, datamodule):
        observed = observed_next_events(batch)
        gap = at_positions(model.head_outputs(model(batch)).gap, observed)
        pits.append(gap.cdf_given_return(batch["next_gap"][observed]).double().cpu().numpy())
    pit = np.concatenate(pits)
    if len(pit) == 0:
        return {}
    return {
        "test/time_pit_below_median": float((pit < 0.5).mean()),
        "test/time_pit_ks": float(stats.kstest(pit, "uniform").statistic),
    }


def _customer_events(events: pd.DataFrame, customer_ids: np.ndarray) -> pd.DataFrame:
    return events[events["customer_id"].isin(set(customer_ids))].reset_index(drop=True)


def _scored_nll(frame: pd.DataFrame, scored_per_customer: pd.Series) -> float:
    """NLL per event of an oracle-style frame, keeping only each customer's last k events."""
    _, counts = customer_groups(frame["customer_id"].to_numpy())
    from_end = np.repeat(np.cumsum(counts), counts) - np.arange(len(frame)) - 1
    keep = from_end < np.repeat(scored_per_customer.to_numpy(), counts)
    events_ll = frame["log_p_event"].to_numpy()[keep & ~np.isnan(frame["log_p_event"].to_numpy())]
    censored = np.nansum(frame["log_p_censored"].to_numpy())
    return float(-(events_ll.sum() + censored) / max(len(events_ll), 1))


def _world_events(datamodule: EventDataModule, config: SimulatorConfig) -> pd.DataFrame:
    """The events the oracle scores: the data module's, or, when the world's channel is not
    declared to the model (so not read), the world simulated again with it."""
    events = datamodule.events
    if config.categorical_channel and CHANNEL_COLUMN not in events:
        return simulate(config)
    return events


def oracle_comparison(model: TwinModule, datamodule: EventDataModule) -> dict[str, float]:
    """``test/model_nll``, ``test/oracle_nll``, ``test/marginal_nll`` and ``test/oracle_skill``."""
    config = datamodule.simulator or SimulatorConfig()
    end = datamodule.sequences.observation_end
    calib = calibration_events(_world_events(datamodule, config), datamodule.cutoff)
    ids = datamodule.sequences.customer_ids
    test_ids, train_ids = ids[datamodule.splits["test"]], ids[datamodule.splits["train"]]
    test_events = _customer_events(calib, test_ids)

    terms = model_event_log_likelihood(model, datamodule)
    model_ll = terms["type"] + terms["gap"] + terms["amount"] + terms["censored"]
    n_scored = terms["observed"].sum(axis=1)
    model_nll = float(-model_ll.sum() / max(n_scored.sum(), 1))

    scored = pd.Series(n_scored, index=test_ids).sort_index()
    oracle_nll = _scored_nll(oracle_log_likelihood(test_events, config, observation_end=end), scored)
    baseline = fit_marginal_baseline(_customer_events(calib, train_ids), end)
    marginal_nll = _scored_nll(baseline.log_likelihood(test_events, end), scored)
    return {
        "test/model_nll": model_nll,
        "test/oracle_nll": oracle_nll,
        "test/marginal_nll": marginal_nll,
        "test/oracle_skill": (marginal_nll - model_nll) / (marginal_nll - oracle_nll),
    }


def quality_report(model: TwinModule, datamodule: EventDataModule) -> dict[str, float]:
    """Baseline comparisons and gap calibration for metrics.json (oracle terms on simulated
    data)."""
    metrics = gap_baselines(datamodule) | gap_calibration(model, datamodule)
    if datamodule.source == "synthetic":
        metrics.update(oracle_comparison(model, datamodule))
    return metrics
