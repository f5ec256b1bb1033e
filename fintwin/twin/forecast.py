"""Holdout forecasts from a twin, in the form `fintwin.twin.evaluation` compares.

Each forecast is a DataFrame indexed by customer_id with `pred_txn` (expected transactions in
the holdout), `pred_spend` (expected spend) and `p_any` (P(at least one transaction)). The
holdout is (cutoff, holdout_end], both whole days, as in `fintwin.twin.evaluation`.

- `twin`: Monte Carlo rollouts (`fintwin.twin.rollout`). Transactions are distinct calendar
  days with an event (the evaluation's same-day merging), conditioned on the silence between
  each customer's last event and the cut-off.
- `twin_heads`: the direct heads at the last event, no simulation. The horizon head
  predicts the count and spend of events in the `horizon_days` (H) that follow the `c` days
  of silence between the last event and the cut-off (it is trained on windows after such
  silences, and clamps `c` to the longest one training saw). The holdout of W days assumes
  events keep that rate: `pred_txn = count * W / H`, `pred_spend = spend * W / H`, linear
  beyond H, counting events rather than distinct days. `p_any = p_alive * (1 - churn **
  (W / H))`: the churn head's P(no event within H after an event), as a Poisson process
  over W, weighted by `p_alive`, the time head's probability that the customer has not
  gone dormant given the silence (`P(alive | no event for c days) = (1 - p_d) S(c) / (p_d +
  (1 - p_d) S(c))`, as BG/NBD weighs its forecast by P(alive)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from fintwin.data.sequences import SequenceSet, calibration_events
from fintwin.models.encoders import gather_last
from fintwin.models.module import TwinModule
from fintwin.twin.evaluation import align_predictions, as_day, week_ends
from fintwin.twin.rollout import (
    RolloutResult,
    eval_mode,
    model_device,
    window_bounds,
)
from fintwin.twin.scores import HoldoutDistribution

HEADS_BATCH = 4096


def rollout_forecast(result: RolloutResult) -> pd.DataFrame:
    """Holdout forecast from rollouts: expected distinct event days, spend, P(any event)."""
    summary = result.summary
    return pd.DataFrame(
        {
            "pred_txn": summary["expected_transactions"],
            "pred_spend": summary["expected_spend"],
            "p_any": summary["p_active"],
            "p_alive": summary["p_alive"],
        },
        index=summary.index,
    )


def rollout_distribution(
    results: Sequence[RolloutResult], actual: pd.DataFrame
) -> HoldoutDistribution:
    """Each customer's predictive distribution of holdout transactions and spend from the paths
    of ``results`` (rollouts with ``keep_outcomes``; several, e.g. an ensemble's members, pool
    their paths), with the actuals (`holdout_actuals` output), rows in their order."""
    transactions, spend = [], []
    for result in results:
        if result.path_transactions is None or result.path_spend is None:
            raise ValueError("the rollout kept no path outcomes: run it with keep_outcomes=True")
        position = pd.DataFrame({"row": np.arange(len(result.summary))}, result.summary.index)
        rows = align_predictions(position, actual)["row"].to_numpy()
        transactions.append(result.path_transactions[rows])
        spend.append(result.path_spend[rows])
    return HoldoutDistribution.from_samples(
        np.concatenate(transactions, axis=1),
        np.concatenate(spend, axis=1),
        actual["txn"].to_numpy(),
        actual["spend"].to_numpy(float),
    )


@torch.inference_mode()
def heads_at_last_event(
    model: TwinModule, sequences: SequenceSet, elapsed: np.ndarray, batch_size: int = HEADS_BATCH
) -> dict[str, np.ndarray]:
    """Per customer (CPU arrays) at the last event, given ``elapsed`` days of silence since
    it: ``horizon_count`` and ``horizon_spend`` in the window after the silence,
    ``churn_prob`` (right after the event) and ``p_alive``."""
    device = model_device(model)
    parts: list[dict[str, np.ndarray]] = []
    with eval_mode(model):
        for first in range(0, len(sequences), batch_size):
            index = np.arange(first, min(first + batch_size, len(sequences)))
            batch = sequences.batch(index, with_targets=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            silence = torch.as_tensor(elapsed[index], dtype=torch.float32, device=device)
            heads = model.head_outputs(gather_last(model(batch), batch["length"]), silence)
            outputs = {
                "horizon_count": heads.horizon.count,
                "horizon_spend": heads.horizon.spend,
                "churn_prob": torch.sigmoid(heads.churn_logit),
                "p_alive": 1.0 - heads.gap.dormant_after_silence(silence),
            }
            parts.append({k: v.float().cpu().numpy() for k, v in outputs.items()})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def heads_forecast(
    model: TwinModule,
    sequences: SequenceSet,
    holdout_end: str | pd.Timestamp,
    horizon_days: float,
) -> pd.DataFrame:
    """Holdout forecast from the churn and horizon heads (see the module docstring)."""
    start, end = window_bounds(sequences, holdout_end)
    ratio = ((end - start) / pd.Timedelta(days=1)) / horizon_days
    heads = heads_at_last_event(model, sequences, sequences.days_since_last_event(start))
    churn = np.clip(heads["churn_prob"].astype(float), 0.0, 1.0)
    p_alive = np.clip(heads["p_alive"].astype(float), 0.0, 1.0)
    return pd.DataFrame(
        {
            "pred_txn": heads["horizon_count"].astype(float) * ratio,
            "pred_spend": heads["horizon_spend"].astype(float) * ratio,
            "p_any": p_alive * (1.0 - churn**ratio),
        },
        index=pd.Index(sequences.customer_ids, name="customer_id"),
    )


def holdout_week_ends(
    events: pd.DataFrame, cutoff: str | pd.Timestamp, holdout_end: str | pd.Timestamp
) -> pd.DatetimeIndex:
    """Week-end days after the cut-off of `weekly_tracking`'s grid (from the first event day)."""
    first = calibration_events(events, cutoff)["timestamp"].min().normalize()
    grid = week_ends(first, holdout_end)
    return grid[grid > as_day(cutoff, "cutoff")]


def rollout_cumulative(result: RolloutResult, days: pd.DatetimeIndex) -> pd.Series:
    """Expected cumulative transactions after the cut-off through each of ``days``.

    For `weekly_tracking`'s `holdout_cumulative`; ``days`` outside the window are left out.
    """
    cumulative = result.daily_transactions.cumsum()
    inside = days[(days >= cumulative.index[0]) & (days <= cumulative.index[-1])]
    return pd.Series(cumulative.reindex(inside).to_numpy(), index=inside)


def heads_cumulative(
    forecast: pd.DataFrame,
    cutoff: str | pd.Timestamp,
    holdout_end: str | pd.Timestamp,
    days: pd.DatetimeIndex,
) -> pd.Series:
    """The heads' total `pred_txn` spread evenly over the holdout, cumulated through ``days``."""
    cut, end = as_day(cutoff, "cutoff"), as_day(holdout_end, "holdout_end")
    inside = days[(days > cut) & (days <= end)]
    share = ((inside - cut) / (end - cut)).to_numpy(float)
    return pd.Series(forecast["pred_txn"].sum() * share, index=inside)
