"""Model vs the simulator's true process vs a history-free baseline, on the same terms.

For every test customer the model scores the events inside its ``max_len`` window (each
event after the window's first) plus the censored gap after the last event; the oracle and
the marginal baseline are restricted to exactly those events and terms. All three NLLs are
(sum of -log p(type, gap, amount) over scored events + sum of -log survival of censored
gaps) / number of scored events, in nats.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fintwin.data.datamodule import EventDataModule
from fintwin.data.features import customer_groups
from fintwin.data.sequences import calibration_events
from fintwin.data.simulator import SimulatorConfig, fit_marginal_baseline, oracle_log_likelihood
from fintwin.models.module import TwinModule
from fintwin.models.quality import model_event_log_likelihood


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


def oracle_comparison(model: TwinModule, datamodule: EventDataModule) -> dict[str, float]:
    """``test/model_nll``, ``test/oracle_nll``, ``test/marginal_nll`` and ``test/oracle_skill``."""
    config = datamodule.simulator or SimulatorConfig()
    end = datamodule.sequences.observation_end
    calib = calibration_events(datamodule.events, datamodule.cutoff)
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
