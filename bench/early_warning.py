"""Early warnings of live twins against simple rules, where the truth is known.

The synthetic bank (``fintwin.data.simulator``) with labelled anomalies (foreign events of
another segment, ``--anomaly-rate`` per gap between events) and each customer's true
dormancy onset. Customers are split at random: 60% train the twin (``python train.py
experiment=synthetic_lstm`` on their events; the anomaly flag never reaches the model), 20%
are validation customers, on which the churn rules' thresholds are chosen, and 20% are the
test customers the table reports. Validation and test customers' events (two years) are
replayed in time order through the live path (``LiveTwins.apply``, the code the Triton live
model runs, from empty states, one call per day), with an overdue sweep over the stored states
at the end of every day.

Unusual events (every event but a customer's first, scored before it is applied):

- twin: the event's tail probability under the twin's predictive distribution before it
  (Fisher's combination of its type, amount and timing tails, ``fintwin.live.alerts``);
  alert below the live model's configured ``alert_unusual_tail``;
- amount z-score: two-sided normal tail of ``log1p(amount)`` against the customer's earlier
  events (mean, standard deviation; needs two);
- type frequency: the share of the customer's earlier events (add-one smoothed over the
  vocabulary) whose type is no more frequent than the event's;
- z-score + type frequency: the smaller of the two.

Each baseline alerts at the same tail probability threshold as the twin. AUROC is over all
scored test events, ties counted half.

Churn (silence): at each daily sweep, the twin flags a customer whose silence has passed the
``level`` quantile of its predicted time to the next event (``alert_overdue_level``); the
baseline flags one whose silence exceeds ``k`` times its mean gap so far (needs two events).
An alert is right when the customer never acts again (true dormancy onset = its last event)
and wrong otherwise (it acts again, or is still active at the end); each silence alerts at
most once. Lead days of a dormant customer (onset + ``horizon_days`` before the end): the
days its first alert came before ``onset + horizon_days``, the day a "no event for
``horizon_days``" rule declares it churned (0 when no alert came before). For each method the
threshold is the one with the longest median lead on the VALIDATION customers among those
with precision >= ``--precision`` (so the methods are compared at equal precision); the table
shows what that threshold gives on the test customers, with the recall (dormant customers
alerted before onset + ``horizon_days``).

Run:  python bench/early_warning.py [--customers 2000] [--epochs 8] [--ckpt CKPT]
                                    [--anomaly-rate 0.02] [--precision 0.8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from machine_info import machine
from scipy.special import ndtr
from scipy.stats import rankdata

from fintwin.data.features import FEATURISER_KEY, NS_PER_DAY
from fintwin.data.simulator import ANOMALY_COLUMN, SimulatorConfig, simulate_world
from fintwin.live.alerts import OVERDUE_FIELDS, combined_tail, gap_cdf
from fintwin.live.events import read_events
from fintwin.live.repository import export_step_graph, live_metadata, write_live_model
from fintwin.live.store import open_store
from fintwin.live.twins import LiveTwins, open_live_twins
from fintwin.models.checkpoint import load_twin
from fintwin.models.module import QUANTILE_LEVELS

REPO = Path(__file__).resolve().parents[1]
NAME = "twin"
CUTOFF = "2023-06-30"  # the twin's calibration period ends here (its churn labels after)
LEVELS = 1 - np.logspace(-0.5, -5, 28)  # twin: overdue quantile levels tried
MULTIPLES = np.geomspace(1.5, 200, 28)  # baseline: k x mean gap tried
SPLIT = (0.6, 0.2, 0.2)  # train, validation, test customers


def train(events: pd.DataFrame, run_dir: Path, epochs: int, seed: int) -> Path:
    """Train the twin with ``train.py`` on ``events``; return its last checkpoint."""
    data = run_dir / "train_events.parquet"
    run_dir.mkdir(parents=True, exist_ok=True)
    events.to_parquet(data)
    command = [
        sys.executable, "train.py", "experiment=synthetic_lstm", f"seed={seed}",
        f"hydra.run.dir={run_dir}", f"data.source={data}", f"data.cutoff={CUTOFF}",
        "data.max_len=128", "model.encoder.hidden_size=64", f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null", "test=false",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return run_dir / "checkpoints" / "last.ckpt"


def live_repository(ckpt: Path, directory: Path) -> Path:
    """The twin's live model (step graph, config with default alert thresholds)."""
    twin = load_twin(ckpt)
    scratch = directory / "scratch"
    scratch.mkdir()
    graph, _, step = export_step_graph(twin, scratch)
    metadata = {FEATURISER_KEY: twin.spec.to_dict(), "quantiles": list(QUANTILE_LEVELS)}
    repo = directory / "repo"
    write_live_model(repo, NAME, twin.spec, graph, live_metadata(metadata, step), scratch)
    return repo


@dataclass
class Replay:
    """What the live path answered: per replayed event (the table's row order) its tail
    probabilities, and per (sweep, stored state) the customer, its events applied, the
    sweep time, the silence's survival under the twin and the silence in days."""

    tails: np.ndarray
    sweeps: pd.DataFrame


def replay(twins: LiveTwins, events: pd.DataFrame) -> Replay:
    """Apply ``events`` day by day in time order, sweeping the stored states after each day."""
    ns = events["timestamp"].to_numpy("datetime64[ns]").view(np.int64)
    day = ns // NS_PER_DAY
    tails = np.full((len(events), 3), np.nan)
    sweeps = []
    order = np.argsort(ns, kind="stable")
    bounds = np.flatnonzero(np.diff(day[order])) + 1
    for rows in np.split(order, bounds):
        stamps = [f"{t // 10**9}.{t % 10**9:09d}" for t in ns[rows]]
        columns = {
            "customer_id": events["customer_id"].to_numpy(object)[rows],
            "timestamp": np.array(stamps, dtype=object),
            "event_type": events["event_type"].to_numpy(object)[rows],
            "amount": events["amount"].to_numpy(np.float32)[rows],
        }
        batch = read_events(columns, twins.spec)
        answers = twins.apply(batch)
        tails[rows[batch.rows]] = answers.tails
        sweeps.append(sweep_scores(twins, (day[rows[0]] + 1) * NS_PER_DAY))
    return Replay(tails, pd.concat(sweeps, ignore_index=True))


def sweep_scores(twins: LiveTwins, now_ns: int) -> pd.DataFrame:
    """Every stored state's silence at ``now_ns`` and its survival under the twin."""
    frames = []
    for batch in twins.store.states(twins.model, twins.version, OVERDUE_FIELDS):
        silence = (now_ns - batch.timestamp_ns) / NS_PER_DAY
        frames.append(pd.DataFrame({
            "customer_id": batch.keys,
            "seq": batch.seq,
            "sweep_ns": now_ns,
            "survival": gap_cdf(batch.arrays[OVERDUE_FIELDS[0]].astype(float), silence)[1],
            "silence": silence,
        }))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------ unusual events
def baseline_tails(events: pd.DataFrame) -> pd.DataFrame:
    """Per event, the baselines' tail probabilities against the customer's earlier events
    (``events`` sorted by customer, then time)."""
    customer = events["customer_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, customer[1:] != customer[:-1]])
    sizes = np.diff(np.r_[starts, len(events)])
    n = np.arange(len(events)) - np.repeat(starts, sizes)  # the customer's earlier events

    def earlier(values: np.ndarray) -> np.ndarray:
        """Per row, the sum of ``values`` over the customer's earlier rows."""
        total = np.cumsum(values, axis=0) - values
        return total - np.repeat(total[starts], sizes, axis=0)

    x = np.log1p(events["amount"].to_numpy(float))
    mean = earlier(x) / np.maximum(n, 1)
    std = np.sqrt(np.maximum(earlier(x * x) / np.maximum(n, 1) - mean**2, 0.0))
    z = np.abs(x - mean) / np.maximum(std, 1e-6)
    amount = np.where(n >= 2, np.minimum(2 * ndtr(-z), 1.0), 1.0)
    codes = events["event_type"].astype("category").cat.codes.to_numpy()
    kinds = int(codes.max()) + 1
    share = (earlier(np.eye(kinds)[codes]) + 1) / (n[:, None] + kinds)  # add-one smoothed
    own = share[np.arange(len(events)), codes]
    kind = (share * (share <= own[:, None] * (1 + 1e-9))).sum(axis=1)
    return pd.DataFrame({"amount": amount, "type": np.minimum(kind, 1.0)}, index=events.index)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher: more likely positive), ties half."""
    ranks = rankdata(scores)
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def unusual_row(tail: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, str]:
    alerts = tail < threshold
    hits = int((alerts & labels).sum())
    return {
        "unusual AUROC": f"{auroc(-np.log(np.maximum(tail, 1e-300)), labels):.3f}",
        "unusual precision@threshold": f"{hits / max(int(alerts.sum()), 1):.3f}",
        "unusual recall@threshold": f"{hits / int(labels.sum()):.3f}",
    }


# ------------------------------------------------------------------ churn
@dataclass
class Truth:
    """Per customer: last event time, events, true dormancy onset (NaT: active at the end)."""

    last_ns: pd.Series
    events: pd.Series
    onset_ns: pd.Series


def first_alerts(sweeps: pd.DataFrame, flagged: np.ndarray) -> pd.DataFrame:
    """The first flagged sweep of each silence (customer, events applied)."""
    first = sweeps[flagged].groupby(["customer_id", "seq"], sort=False)["sweep_ns"].min()
    return first.reset_index()


def churn_metrics(alerts: pd.DataFrame, truth: Truth, customers: pd.Index, horizon_days: float,
                  end_ns: int) -> tuple[float, float, float]:
    """Precision, median lead days and recall of first-per-silence ``alerts``."""
    alerts = alerts[alerts["customer_id"].isin(customers)]
    final = alerts["seq"].to_numpy() == truth.events[alerts["customer_id"]].to_numpy()
    dormant = truth.onset_ns[alerts["customer_id"]].notna().to_numpy()
    right = final & dormant
    precision = right.sum() / max(len(alerts), 1)
    onset = truth.onset_ns[customers].dropna()
    deadline = onset + horizon_days * NS_PER_DAY
    judged = deadline[deadline <= end_ns]
    alerted = alerts[right].set_index("customer_id")["sweep_ns"]
    lead = (judged - alerted.reindex(judged.index)) / NS_PER_DAY
    lead = lead.clip(lower=0).fillna(0.0)
    return float(precision), float(lead.median()), float((lead > 0).mean())


def choose(candidates: list[tuple[float, pd.DataFrame]], truth: Truth, customers: pd.Index,
           horizon_days: float, end_ns: int, precision: float) -> float:
    """The threshold with the longest median lead (then recall) on ``customers`` among those
    with precision >= ``precision`` (the most precise one when none reaches it)."""
    scored = [(value, *churn_metrics(alerts, truth, customers, horizon_days, end_ns))
              for value, alerts in candidates]
    good = [s for s in scored if s[1] >= precision]
    if not good:
        return max(scored, key=lambda s: s[1])[0]
    return max(good, key=lambda s: (s[2], s[3]))[0]


def churn_row(alerts: pd.DataFrame, truth: Truth, customers: pd.Index, horizon_days: float,
              end_ns: int, label: str) -> dict[str, str]:
    precision, lead, recall = churn_metrics(alerts, truth, customers, horizon_days, end_ns)
    return {"churn lead days (median)": f"{lead:.1f}", "churn precision": f"{precision:.3f}",
            "churn recall": f"{recall:.3f}", "churn threshold": label}


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--anomaly-rate", type=float, default=0.02)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--ckpt", type=Path, help="take this twin instead of training one")
    parser.add_argument("--precision", type=float, default=0.8,
                        help="churn precision the thresholds are chosen for (validation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep the training run here")
    args = parser.parse_args()
    started = time.monotonic()
    world = simulate_world(SimulatorConfig(n_customers=args.customers, seed=args.seed,
                                           anomaly_rate=args.anomaly_rate))
    events = world.events
    ids = world.customers.index.to_numpy()
    shuffled = np.random.default_rng(args.seed).permutation(ids)
    cuts = np.cumsum(np.round(np.array(SPLIT) * len(ids)).astype(int))[:2]
    train_ids, val_ids, test_ids = (pd.Index(part) for part in np.split(shuffled, cuts))
    with tempfile.TemporaryDirectory(prefix="early_warning_") as scratch:
        directory = Path(scratch)
        ckpt = args.ckpt or train(events[events["customer_id"].isin(train_ids)],
                                  args.out or directory / "run", args.epochs, args.seed)
        trained = time.monotonic()
        repo = live_repository(ckpt, directory)
        replayed = events[events["customer_id"].isin(val_ids.union(test_ids))].reset_index(drop=True)
        with open_store(f"sqlite:///{directory / 'twins.db'}") as store:
            twins = open_live_twins(repo, f"{NAME}_live", store)
            result = replay(twins, replayed)
    replay_s = time.monotonic() - trained
    labels = replayed[ANOMALY_COLUMN].to_numpy(bool)
    scored = replayed.groupby("customer_id").cumcount().to_numpy() > 0
    test_rows = scored & replayed["customer_id"].isin(test_ids).to_numpy()
    baselines = baseline_tails(replayed)
    threshold = twins.alerts.unusual_tail
    unusual = {
        "twin": combined_tail(np.where(np.isnan(result.tails), 1.0, result.tails)),
        "amount z-score": baselines["amount"].to_numpy(),
        "type frequency": baselines["type"].to_numpy(),
        "z-score + type frequency": baselines.min(axis=1).to_numpy(),
    }

    group = replayed.groupby("customer_id")["timestamp"]
    onset = world.customers["dormant_onset"]
    onset_ns = np.where(onset.notna(), onset.to_numpy("datetime64[ns]").view(np.int64), np.nan)
    truth = Truth(last_ns=group.max().astype("int64"), events=group.size(),
                  onset_ns=pd.Series(onset_ns, index=onset.index))
    end_ns = pd.Timestamp(SimulatorConfig().end).value
    horizon = twins.spec.horizon_days
    sweeps = result.sweeps
    ns = replayed["timestamp"].to_numpy("datetime64[ns]").view(np.int64)
    first_ns = replayed.groupby("customer_id")["timestamp"].transform("min").astype("int64")
    mean_gap = ((ns - first_ns.to_numpy()) / NS_PER_DAY) / np.maximum(
        replayed.groupby("customer_id").cumcount().to_numpy(), 1)
    gaps = pd.Series(np.where(replayed.groupby("customer_id").cumcount() > 0, mean_gap, np.nan),
                     index=pd.MultiIndex.from_arrays([replayed["customer_id"],
                                                      replayed.groupby("customer_id").cumcount() + 1]))
    sweep_gap = gaps.reindex(pd.MultiIndex.from_arrays([sweeps["customer_id"], sweeps["seq"]]))
    sweep_gap = sweep_gap.to_numpy()
    twin_candidates = [(level, first_alerts(sweeps, sweeps["survival"].to_numpy() < 1 - level))
                       for level in LEVELS]
    rule_candidates = [(k, first_alerts(sweeps, sweeps["silence"].to_numpy() > k * sweep_gap))
                       for k in MULTIPLES]
    level = choose(twin_candidates, truth, val_ids, horizon, end_ns, args.precision)
    multiple = choose(rule_candidates, truth, val_ids, horizon, end_ns, args.precision)
    churn = {
        "twin": churn_row(dict(twin_candidates)[level], truth, test_ids, horizon, end_ns,
                          f"overdue level {level:.5f}"),
        "silence > k x mean gap": churn_row(dict(rule_candidates)[multiple], truth, test_ids,
                                             horizon, end_ns, f"k = {multiple:.1f}"),
    }
    configured = first_alerts(sweeps, sweeps["survival"].to_numpy() < 1 - twins.alerts.overdue_level)
    churn["twin (configured level)"] = churn_row(
        configured, truth, test_ids, horizon, end_ns,
        f"overdue level {twins.alerts.overdue_level} (config)")

    columns = ["method", "unusual AUROC", "unusual precision@threshold",
               "unusual recall@threshold", "churn lead days (median)", "churn precision",
               "churn recall", "churn threshold"]
    rows = []
    for method in [*unusual, *[m for m in churn if m not in unusual]]:
        row = {"method": method}
        if method in unusual:
            row |= unusual_row(unusual[method][test_rows], labels[test_rows], threshold)
        row |= churn.get(method, {})
        rows.append(row)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}")
    print(f"{len(test_ids):,} test customers ({int(test_rows.sum()):,} scored events, "
          f"{int(labels[test_rows].sum()):,} anomalies), {len(val_ids):,} validation customers; "
          f"unusual threshold: tail probability < {threshold}; churn thresholds chosen on the "
          f"validation customers for precision >= {args.precision}; horizon {horizon:g} days; "
          f"replay + daily sweeps {replay_s:.0f} s, total {time.monotonic() - started:.0f} s\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(columns) - 2) + ["---"]) + "|")
    for row in rows:
        print("| " + " | ".join(row.get(c, "-") for c in columns) + " |")
    part = pd.DataFrame(result.tails[test_rows & labels], columns=["type", "amount", "timing"])
    print("\nanomalies below the threshold by part (twin): "
          + json.dumps({c: int((part[c] < threshold).sum()) for c in part}))


if __name__ == "__main__":
    main()
